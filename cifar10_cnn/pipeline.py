"""What each entry point does. The scripts in steps/ parse their arguments and call one of these
inside `tracking.run_step`, which owns the MLflow run's start, status and exit code.

Steps hand results to each other only through the tracking store: a step receives the run id of the
step before it and reads that run's artifacts, params and tags.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime
import torch
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.models import infer_signature

from . import constants as C
from . import data as datalib
from . import evaluation, export, models, params, plots, registry, tracking, training
from .errors import CheckFailed, UserError


def cache_dir() -> Path:
    return Path(os.environ.get(C.CACHE_DIR_ENV, C.DEFAULT_CACHE_DIR))


def _say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def _base_version(version: str) -> str:
    return version.split("+")[0]  # '2.14.1+cu130' -> '2.14.1': local labels don't resolve on PyPI


def _nhwc(images_nchw: np.ndarray) -> np.ndarray:
    """Stored NCHW uint8 -> the NHWC uint8 that the logged models take."""
    return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))


# --- ingest ------------------------------------------------------------------------------------------


def ingest(data: str, expected_records: str) -> None:
    expected = params.expected_records(expected_records)
    source = datalib.resolve_source(data, cache_dir())
    _say("ingest", f"reading {source.path}")
    dataset = datalib.read(source, expected)
    digest = dataset.digest()
    with tempfile.TemporaryDirectory() as tmp:
        datalib.save(dataset, Path(tmp) / C.DATASET_DIR, digest)
        mlflow.log_artifacts(str(Path(tmp) / C.DATASET_DIR), C.DATASET_DIR)
    for split, context in (("train", "training"), ("test", "testing")):
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        # Our own digest: MLflow's default hashes only the first 10,000 values.
        ds = mlflow.data.from_numpy(images, targets=labels, source=_dataset_source(source.origin),
                                    name=f"cifar10-{split}", digest=digest[:32])
        mlflow.log_input(ds, context=context, tags={"sha256": digest, "records": str(len(labels))})
    sizes = dataset.sizes()
    mlflow.set_tags({"cifar10.source": source.origin, "cifar10.sha256": digest})
    mlflow.log_metrics({"train_records": sizes["train"], "test_records": sizes["test"]})
    counts = {"classes": list(dataset.class_names), "train": dataset.class_counts("train"),
              "test": dataset.class_counts("test")}
    mlflow.log_dict(counts, "class_counts.json")
    mlflow.log_figure(plots.sample_grid(dataset.train_images, dataset.train_labels, dataset.class_names),
                      "samples.png")
    _say("ingest", f"{sizes['train']:,} train / {sizes['test']:,} test images, sha256 {digest[:16]}…")


def _dataset_source(origin: str):
    if origin.startswith(("http://", "https://")):
        return HTTPDatasetSource(origin)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about itself
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return resolve_dataset_source(Path(origin).as_uri())


def _dataset_of(ingest_run_id: str, splits: tuple[str, ...]) -> datalib.Cifar10:
    tracking.upstream(ingest_run_id, "ingest")
    return datalib.load(tracking.artifact(ingest_run_id, C.DATASET_DIR), splits)


# --- train -------------------------------------------------------------------------------------------


def train(ingest_run_id: str, epochs: str, batch_size: str, learning_rate: str, seed: str, device: str) -> None:
    config = training.TrainConfig(
        epochs=params.positive_int("epochs", epochs),
        batch_size=params.positive_int("batch_size", batch_size),
        learning_rate=params.positive_float("learning_rate", learning_rate),
        seed=params.non_negative_int("seed", seed),
    )
    target = training.select_device(params.choice("device", device, params.DEVICES))
    ingest_run_id = params.run_id("ingest_run_id", ingest_run_id)
    dataset = _dataset_of(ingest_run_id, ("train", "test"))

    training.seed_everything(config.seed)
    net = models.build(config.model)
    n_params = models.count_parameters(net)
    tracking.log_new_params({**asdict(config), "num_parameters": n_params, "train_device": target,
                             "train_records": len(dataset.train_labels)})
    mlflow.set_tag("cifar10.sha256", mlflow.get_run(ingest_run_id).data.tags.get("cifar10.sha256", ""))
    _say("train", f"{config.model}, {n_params:,} parameters, {len(dataset.train_labels):,} images on {target}; "
                  f"{config.epochs} epochs, batch {config.batch_size}, Adam lr {config.learning_rate}")

    def on_epoch(r: training.EpochResult) -> None:
        mlflow.log_metrics({"train_loss": r.loss, "train_accuracy": r.accuracy, "epoch_seconds": r.seconds,
                            "train_images_per_s": r.images_per_s}, step=r.epoch)
        _say("train", f"Epoch [{r.epoch}/{config.epochs}], Loss: {r.loss:.4f}, Accuracy: {r.accuracy:.2%}, "
                      f"{r.seconds:.1f}s ({r.images_per_s:,.0f} img/s)")

    history = training.train(net, torch.from_numpy(dataset.train_images),
                             torch.from_numpy(dataset.train_labels).long(), config, target, on_epoch)
    net.cpu().eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(C.CHECKPOINT_PATH).name
        torch.save(training.checkpoint(net, config, {}, history), path)
        mlflow.log_artifact(str(path), str(Path(C.CHECKPOINT_PATH).parent))
    info = _log_pytorch_flavor(models.RawPixelClassifier(net).eval(), dataset)
    mlflow.set_tag(C.TAG_PYTORCH_MODEL_URI, info.model_uri)
    _say("train", f"logged the PyTorch model as {info.model_uri}")


def _model_metadata(class_names) -> dict:
    return {"class_names": list(class_names), "input": f"{C.SERVING_INPUT}: uint8 RGB [batch, 32, 32, 3] (NHWC)",
            "output": f"{C.SERVING_OUTPUT}: float32 [batch, {C.NUM_CLASSES}], softmax gives probabilities"}


def _log_pytorch_flavor(model: torch.nn.Module, dataset: datalib.Cifar10):
    # pt2 (torch.export) wants a numpy example with a batch >= 2, else the batch size is fixed at 1.
    example = _nhwc(dataset.test_images[:4] if len(dataset.test_images) >= 2 else dataset.train_images[:4])
    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        model, name=C.PYTORCH_MODEL_NAME, signature=infer_signature(example, logits), input_example=example,
        pip_requirements=[f"torch=={_base_version(torch.__version__)}", f"mlflow=={mlflow.__version__}"],
        metadata=_model_metadata(dataset.class_names),
    )


def _trained(train_run_id: str):
    """The train run, its network rebuilt from the checkpoint (eval mode, CPU), and its config."""
    run = tracking.upstream(train_run_id, "train")
    path = tracking.artifact(train_run_id, C.CHECKPOINT_PATH)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint of train run {train_run_id} is unreadable ({path}): {exc}") from None
    net, config = training.rebuild(ckpt)
    return run, net, config


# --- evaluate ----------------------------------------------------------------------------------------


def evaluate(train_run_id: str, device: str) -> None:
    target = training.select_device(params.choice("device", device, params.DEVICES))
    train_run, net, config = _trained(params.run_id("train_run_id", train_run_id))
    ingest_run_id = train_run.data.params["ingest_run_id"]
    dataset = _dataset_of(ingest_run_id, ("test",))
    tracking.log_new_params({"model": config.model, "eval_device": target, "ingest_run_id": ingest_run_id})

    model = models.RawPixelClassifier(net).to(target).eval()
    images = torch.from_numpy(dataset.test_images).to(target).permute(0, 2, 3, 1)  # NHWC view, as served
    logits = evaluation.predict_logits(model, images)
    result = evaluation.evaluate(logits, torch.from_numpy(dataset.test_labels), C.NUM_CLASSES)

    names = dataset.class_names
    mlflow.log_metrics({"test_loss": result.loss, "test_accuracy": result.accuracy,
                        **{f"test_accuracy_{n}": a for n, a in zip(names, result.per_class_accuracy, strict=True)}})
    mlflow.log_dict({"classes": list(names), "per_class_accuracy": result.per_class_accuracy,
                     "confusion": result.confusion.tolist()}, "evaluation.json")
    mlflow.log_figure(plots.confusion_matrix(result.confusion, names), "confusion_matrix.png")
    _say("evaluate", f"test loss {result.loss:.4f}, test accuracy {result.accuracy:.2%} "
                     f"on {len(dataset.test_labels):,} images")


# --- export and registration -------------------------------------------------------------------------


def export_and_register(train_run_id: str, evaluate_run_id: str, model_name: str) -> None:
    model_name = params.model_name(model_name)
    train_run, net, config = _trained(params.run_id("train_run_id", train_run_id))
    eval_run = tracking.upstream(params.run_id("evaluate_run_id", evaluate_run_id), "evaluate")
    if eval_run.data.params.get("train_run_id") != train_run_id:
        raise UserError(f"evaluate run {evaluate_run_id} evaluated train run "
                        f"{eval_run.data.params.get('train_run_id')}, not {train_run_id}")
    ingest_run_id = train_run.data.params["ingest_run_id"]
    dataset = _dataset_of(ingest_run_id, ("test",))
    images = _nhwc(dataset.test_images)
    model = models.RawPixelClassifier(net).eval()

    # ONNX: export, check, and compare with PyTorch on every test image.
    proto = export.to_onnx(model, torch.from_numpy(images[:8]))
    reference = export.torch_predictor(model)
    onnx_parity = export.compare(reference, export.onnx_predictor(export.session(proto)), images)
    # The PyTorch flavor as logged (a torch.export program) must compute what the checkpoint does.
    pytorch_uri = train_run.data.tags[C.TAG_PYTORCH_MODEL_URI]
    logged = export.torch_predictor(mlflow.pytorch.load_model(pytorch_uri))
    pytorch_parity = export.compare(reference, logged, images)
    mlflow.log_metrics({"onnx_max_abs_diff": onnx_parity.max_abs_diff,
                        "onnx_argmax_mismatches": onnx_parity.argmax_mismatches,
                        "pytorch_flavor_max_abs_diff": pytorch_parity.max_abs_diff,
                        "parity_images": onnx_parity.images})
    for flavor, parity in (("ONNX", onnx_parity), ("logged PyTorch", pytorch_parity)):
        if parity.argmax_mismatches or parity.max_abs_diff > C.ONNX_MAX_ABS_DIFF:
            raise CheckFailed(
                f"{flavor} model disagrees with the checkpoint: max |logit diff| {parity.max_abs_diff:.2e} "
                f"(tolerance {C.ONNX_MAX_ABS_DIFF:.0e}), {parity.argmax_mismatches} of {parity.images} "
                "predictions differ; nothing was registered"
            )
    _say("export", f"ONNX parity on {onnx_parity.images:,} test images: max |logit diff| "
                   f"{onnx_parity.max_abs_diff:.1e}, {onnx_parity.argmax_mismatches} differing predictions")

    example = images[:4]
    logits = reference(example)
    # An explicit signature: with only a uint8 example, MLflow's JSON round trip turns it into int64
    # and the model would be logged with no signature at all.
    onnx_info = mlflow.onnx.log_model(
        proto, name=C.ONNX_MODEL_NAME, signature=infer_signature(example, logits), input_example=example,
        save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"],
        pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                          f"mlflow=={mlflow.__version__}"],
        metadata=_model_metadata(dataset.class_names),
    )
    onnx_path = _local_model_file(onnx_info.model_id, "model.onnx")
    mlflow.set_tags({C.TAG_ONNX_MODEL_URI: onnx_info.model_uri, "cifar10.onnx_path": onnx_path})

    accuracy = eval_run.data.metrics["test_accuracy"]
    export_run_id = mlflow.active_run().info.run_id
    parent = mlflow.get_run(export_run_id).data.tags.get("mlflow.parentRunId", "")
    tags = {"ingest_run_id": ingest_run_id, "train_run_id": train_run_id, "evaluate_run_id": evaluate_run_id,
            "export_run_id": export_run_id, "pipeline_run_id": parent, "test_accuracy": f"{accuracy:.4f}",
            "dataset_sha256": mlflow.get_run(ingest_run_id).data.tags.get("cifar10.sha256", ""),
            "model": config.model, "onnx_max_abs_diff": f"{onnx_parity.max_abs_diff:.2e}"}
    onnx_name = model_name + C.ONNX_REGISTERED_SUFFIX
    pt_version = registry.register(pytorch_uri, model_name, {**tags, "flavor": "pytorch"}, C.CANDIDATE_ALIAS)
    onnx_version = registry.register(onnx_info.model_uri, onnx_name,
                                     {**tags, "flavor": "onnx", "pytorch_version": pt_version.version},
                                     C.CANDIDATE_ALIAS)
    mlflow.MlflowClient().set_model_version_tag(model_name, pt_version.version, "onnx_version", onnx_version.version)
    mlflow.set_tags({"cifar10.registered.pytorch": f"{model_name}/{pt_version.version}",
                     "cifar10.registered.onnx": f"{onnx_name}/{onnx_version.version}"})
    _say("export", f"registered {model_name} v{pt_version.version} and {onnx_name} v{onnx_version.version}, "
                   f"alias @{C.CANDIDATE_ALIAS}")


def _local_model_file(model_id: str, filename: str) -> str:
    location = mlflow.get_logged_model(model_id).artifact_location
    if location.startswith("file://"):
        location = location[len("file://"):]
    return f"{location.rstrip('/')}/{filename}"


# --- main: the four steps as nested runs -------------------------------------------------------------

PROJECT_DIR = Path(__file__).resolve().parent.parent


def check_main_params(p: dict) -> dict:
    """Every check that needs no data and no training, so a bad parameter fails in seconds."""
    checked = {
        "epochs": params.positive_int("epochs", p["epochs"]),
        "batch_size": params.positive_int("batch_size", p["batch_size"]),
        "learning_rate": params.positive_float("learning_rate", p["learning_rate"]),
        "seed": params.non_negative_int("seed", p["seed"]),
        "device": params.choice("device", p["device"], params.DEVICES),
        "model_name": params.model_name(p["model_name"]),
    }
    params.expected_records(p["expected_records"])
    training.select_device(checked["device"])
    datalib.resolve_source(p["data"], cache_dir(), fetch=False)
    data = str(p["data"]).strip()
    if data != "auto" and "://" not in data:  # children run in the project folder: pass an absolute path
        data = str(Path(data).expanduser().resolve())
    return {**checked, "data": data, "expected_records": str(p["expected_records"]).strip()}


def main(**raw) -> None:
    p = check_main_params(raw)
    if not (PROJECT_DIR / "MLproject").is_file():
        raise UserError(f"{PROJECT_DIR} has no MLproject; run main from a checkout of the project")
    # Children run `python` from PATH (env_manager=local): make it this interpreter, whatever PATH says.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id

    def step(entry_point: str, parameters: dict) -> str:
        _say("main", f"step {entry_point} …")
        try:
            submitted = mlflow.projects.run(
                str(PROJECT_DIR), entry_point, parameters={k: str(v) for k, v in parameters.items()},
                env_manager="local", experiment_id=experiment_id, run_name=entry_point, synchronous=True,
            )
        except mlflow.exceptions.ExecutionException:
            raise UserError(f"step {entry_point} failed; its error is printed above") from None
        mlflow.set_tag(f"cifar10.{entry_point}_run_id", submitted.run_id)
        return submitted.run_id

    ingest_id = step("ingest", {"data": p["data"], "expected_records": p["expected_records"]})
    train_id = step("train", {"ingest_run_id": ingest_id, "epochs": p["epochs"], "batch_size": p["batch_size"],
                              "learning_rate": p["learning_rate"], "seed": p["seed"], "device": p["device"]})
    evaluate_id = step("evaluate", {"train_run_id": train_id, "device": p["device"]})
    export_id = step("export", {"train_run_id": train_id, "evaluate_run_id": evaluate_id,
                                "model_name": p["model_name"]})

    metrics = mlflow.get_run(evaluate_id).data.metrics
    mlflow.log_metrics({"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"]})
    export_tags = mlflow.get_run(export_id).data.tags
    print(summary(parent.info.run_id, {"ingest": ingest_id, "train": train_id, "evaluate": evaluate_id,
                                       "export": export_id}, metrics, export_tags), flush=True)


def summary(parent_id: str, run_ids: dict, metrics: dict, export_tags: dict) -> str:
    line = "=" * 80
    registered = ", ".join(
        f"{export_tags[f'cifar10.registered.{f}'].replace('/', ' v')} (@{C.CANDIDATE_ALIAS})"
        for f in ("pytorch", "onnx")
    )
    steps = ", ".join(f"{name} {rid}" for name, rid in run_ids.items())
    return "\n".join([
        line, "CIFAR-10 CNN pipeline finished", line,
        f"  test accuracy : {metrics['test_accuracy']:.2%}",
        f"  test loss     : {metrics['test_loss']:.4f}",
        f"  ONNX model    : {export_tags.get('cifar10.onnx_path', '?')}",
        f"  parent run    : {parent_id}",
        f"  step runs     : {steps}",
        f"  registered    : {registered}",
        f"  tracking      : {mlflow.get_tracking_uri()}",
        "  browse with   : mlflow ui   (in this folder; or --backend-store-uri <tracking URI>)",
        line,
    ])
