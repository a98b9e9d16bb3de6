"""ingest: find or fetch CIFAR-10 (binary layout), validate it, log it as this run's dataset. Needs no torch."""

import tempfile
import warnings
from pathlib import Path

import mlflow

from cifar10_cnn import constants as C
from cifar10_cnn import data as datalib
from cifar10_cnn import entry_points, params, plots, sources, tracking
from cifar10_cnn.progress import say


def run(data: str, expected_records: str) -> None:
    expected = params.expected_records(expected_records)
    source = sources.resolve_source(data, sources.cache_dir())
    say("ingest", f"reading {source.path}")
    dataset = datalib.read(source, expected)
    digest = dataset.digest()
    with tempfile.TemporaryDirectory() as tmp:
        datalib.save(dataset, Path(tmp) / C.DATASET_DIR, digest)
        tracking.log_artifacts_whole(str(Path(tmp) / C.DATASET_DIR), C.DATASET_DIR)
    for split, context in (("train", "training"), ("test", "testing")):
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        # Our own digest: MLflow's default hashes only the first 10,000 values.
        ds = mlflow.data.from_numpy(images, targets=labels, source=dataset_source(source.origin),
                                    name=f"cifar10-{split}", digest=digest[:32])
        tracking.log_input(ds, context, {"sha256": digest, "records": str(len(labels))})
    sizes = dataset.sizes()
    mlflow.set_tags({C.TAG_SOURCE: source.origin, C.TAG_SHA256: digest,
                     C.TAG_SOURCE_SHA256: sources.source_digest(source)})
    mlflow.log_metrics({"train_records": sizes["train"], "test_records": sizes["test"]})
    counts = {"classes": list(dataset.class_names), "train": dataset.class_counts("train"),
              "test": dataset.class_counts("test")}
    mlflow.log_dict(counts, "class_counts.json")
    mlflow.log_image(plots.sample_grid(dataset.train_images, dataset.train_labels, dataset.class_names),
                     "samples.png")
    say("ingest", f"{sizes['train']:,} train / {sizes['test']:,} test images, sha256 {digest[:16]}…")


def dataset_source(origin: str):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    if origin.startswith(("http://", "https://")):
        return HTTPDatasetSource(origin)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about itself
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return resolve_dataset_source(Path(origin).as_uri())


def main(argv=None):
    args = entry_points.parser("ingest", __doc__).parse_args(argv)
    tracking.run_step("ingest", run, **vars(args))


if __name__ == "__main__":
    main()
