"""predict: score a folder of image files, or the test images of a CIFAR-10 archive, with a logged or
registered model, in a run of its own: predictions.csv, the count per class and the errors; for an
archive also the accuracy, beside the registered version's own test_accuracy tag (an acceptance test
of that version from outside the training pipeline)."""

import tempfile
from collections import Counter
from pathlib import Path

import mlflow

from cifar10_cnn import constants as C
from cifar10_cnn import data as datalib
from cifar10_cnn import entry_points, predict, registry, sources, tracking
from cifar10_cnn import images as imagelib
from cifar10_cnn.errors import UserError
from cifar10_cnn.progress import say


def run(model_uri: str, images: str) -> None:
    source = Path(str(images).strip()).expanduser()
    if not str(images).strip() or not source.exists():
        raise UserError(f"images: {source.resolve()} does not exist")
    archive = sources.cifar10_at(source)  # else a folder (or file) of images
    paths = [] if archive else imagelib.files_under(source)
    if not archive and not paths:
        raise UserError(f"images: {source.resolve()} holds no files to score")
    model = predict.load_model(model_uri)
    class_names = (model.metadata.metadata or {}).get("class_names")
    if not class_names:
        raise UserError(f"{model_uri} is not a model of this project (its MLmodel lists no class_names)")
    version = registry.version_of_uri(mlflow.MlflowClient(), model_uri)
    if version is not None:
        mlflow.log_params({"model_name": version.name, "model_version": version.version})
    say("predict", f"model {model_uri}" + (f" = {version.name} v{version.version}" if version is not None else ""))

    if archive is not None:  # the test batch, labels and all
        dataset = datalib.read(archive, expected=None, splits=("test",))
        names = [f"{C.TEST_BATCH}[{i}]" for i in range(len(dataset.test_labels))]
        truths = [dataset.class_names[i] for i in dataset.test_labels]
        say("predict", f"scoring the {len(names):,} test images of {archive.path}")
        results = predict.classify_pixels(datalib.nhwc(dataset.test_images), names, model.predict, truths)
    else:
        say("predict", f"scoring {len(paths):,} file(s) under {source}")
        results = predict.classify(paths, model.predict)

    errors = [r for r in results if r.error]
    for r in errors[:10]:
        say("predict", f"skipped {r.error}")
    if len(errors) == len(results):
        raise UserError(f"images: none of the {len(results)} file(s) under {source} is an image it can read "
                        f"(first: {errors[0].error})")
    counts = Counter(r.label for r in results if r.label)
    with tempfile.TemporaryDirectory() as tmp:
        predict.write_csv(results, class_names, Path(tmp) / "predictions.csv")
        mlflow.log_artifact(str(Path(tmp) / "predictions.csv"))
    mlflow.log_dict({"counts": {n: counts.get(n, 0) for n in class_names},
                     "errors": [r.error for r in errors]}, "summary.json")
    mlflow.log_metrics({"images": len(results), "errors": len(errors),
                        **{f"count_{n}": counts.get(n, 0) for n in class_names}})
    line = f"{len(results) - len(errors):,} image(s) classified, {len(errors)} error(s)"
    if archive is not None:
        accuracy = sum(r.label == r.truth for r in results) / len(results)
        mlflow.log_metric("test_accuracy", accuracy)
        line += f"; test accuracy {accuracy:.2%}"
        if version is not None and "test_accuracy" in version.tags:
            line += f" (v{version.version}'s test_accuracy tag: {float(version.tags['test_accuracy']):.2%})"
    say("predict", line)
    run_id = mlflow.active_run().info.run_id
    say("predict", f"predictions.csv and summary.json in run {run_id}: "
                   f"mlflow artifacts download -r {run_id} -a predictions.csv -d .")


def main(argv=None):
    args = entry_points.parser("predict", __doc__).parse_args(argv)
    tracking.run_step("predict", run, **vars(args))


if __name__ == "__main__":
    main()
