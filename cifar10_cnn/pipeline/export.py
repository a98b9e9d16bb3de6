"""export: ONNX export with parity checks, then registration of both flavors with matching tags."""

from __future__ import annotations

import mlflow
import onnx
import onnxruntime
import torch
from mlflow.models import infer_signature

from .. import constants as C
from .. import export, mlmodel, models, params, registry, tracking
from ..errors import CheckFailed, UserError
from .common import dataset_of, model_metadata, nhwc, say
from .train import trained


def run(train_run_id: str, evaluate_run_id: str, model_name: str, int8: str = "true") -> None:
    model_name = params.model_name(model_name)
    int8 = params.boolean("int8", int8)
    train_run, net, config = trained(params.run_id("train_run_id", train_run_id))
    eval_run = tracking.upstream(params.run_id("evaluate_run_id", evaluate_run_id), "evaluate")
    if eval_run.data.params.get("train_run_id") != train_run_id:
        raise UserError(f"evaluate run {evaluate_run_id} evaluated train run "
                        f"{eval_run.data.params.get('train_run_id')}, not {train_run_id}")
    ingest_run_id = train_run.data.params["ingest_run_id"]
    dataset = dataset_of(ingest_run_id, ("train", "test") if int8 else ("test",))
    images = nhwc(dataset.test_images)
    model = models.RawPixelClassifier(net).eval()

    # ONNX: export, check, and compare with PyTorch on every test image.
    proto = export.to_onnx(model, torch.from_numpy(images[:8]))
    reference = export.torch_predictor(model)
    onnx_parity = export.compare(reference, export.onnx_predictor(export.session(proto)), images)
    # The PyTorch flavor as logged (a torch.export program) must compute what the checkpoint does.
    pytorch_uri = train_run.data.tags[C.TAG_PYTORCH_MODEL_URI]
    logged = export.torch_predictor(mlflow.pytorch.load_model(pytorch_uri))
    pytorch_parity = export.compare(reference, logged, images)
    mlflow.log_metrics({"onnx_max_abs_diff": onnx_parity.max_abs_diff, "onnx_max_abs_logit": onnx_parity.max_abs_logit,
                        "onnx_argmax_mismatches": onnx_parity.argmax_mismatches,
                        "pytorch_flavor_max_abs_diff": pytorch_parity.max_abs_diff,
                        "parity_images": onnx_parity.images})
    for flavor, parity in (("ONNX", onnx_parity), ("logged PyTorch", pytorch_parity)):
        if not parity.ok:
            raise CheckFailed(
                f"{flavor} model disagrees with the checkpoint: max |logit diff| {parity.max_abs_diff:.2e} "
                f"(tolerance {parity.tolerance:.1e} for logits up to {parity.max_abs_logit:.3g}), "
                f"{parity.argmax_mismatches} of {parity.images} predictions differ; nothing was registered"
            )
    say("export", f"ONNX parity on {onnx_parity.images:,} test images: max |logit diff| "
                   f"{onnx_parity.max_abs_diff:.1e}, {onnx_parity.argmax_mismatches} differing predictions")

    example = images[:4]
    logits = reference(example)
    # An explicit signature: with only a uint8 example, MLflow's JSON round trip turns it into int64
    # and the model would be logged with no signature at all.
    onnx_info = mlmodel.log_onnx(
        proto, C.ONNX_MODEL_NAME, infer_signature(example, logits), example, dataset.class_names,
        model_metadata(dataset.class_names),
        [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}", f"mlflow=={mlflow.__version__}"],
    )
    onnx_path = local_model_file(onnx_info.model_id, "model.onnx")
    mlflow.set_tags({C.TAG_ONNX_MODEL_URI: onnx_info.model_uri, "cifar10.onnx_path": onnx_path})

    int8_model = quantize(proto, dataset, images) if int8 else None  # before anything is registered

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
    client = mlflow.MlflowClient()
    client.set_model_version_tag(model_name, pt_version.version, "onnx_version", onnx_version.version)
    ingest_run = mlflow.get_run(ingest_run_id)
    card = {
        "model": config.model, "num_parameters": int(train_run.data.params.get("num_parameters", 0)),
        "train_params": train_run.data.params, "source": ingest_run.data.tags.get("cifar10.source", "?"),
        "sha256": tags["dataset_sha256"],
        "sizes": {k: int(ingest_run.data.metrics.get(f"{k}_records", 0)) for k in ("train", "test")},
        "test_accuracy": accuracy, "test_loss": eval_run.data.metrics["test_loss"],
        "per_class": {c: eval_run.data.metrics.get(f"test_accuracy_{c}", float("nan")) for c in dataset.class_names},
        "onnx_max_abs_diff": onnx_parity.max_abs_diff, "onnx_mismatches": onnx_parity.argmax_mismatches,
        "parity_images": onnx_parity.images,
        "run_ids": {k: tags[f"{k}_run_id"] for k in ("pipeline", "ingest", "train", "evaluate", "export")},
    }
    for name, version, flavor in ((model_name, pt_version.version, "pytorch"),
                                  (onnx_name, onnx_version.version, "onnx")):
        text = registry.model_card(name=name, version=str(version), flavor=flavor, **card)
        client.update_model_version(name, version, description=text)
    mlflow.set_tags({"cifar10.registered.pytorch": f"{model_name}/{pt_version.version}",
                     "cifar10.registered.onnx": f"{onnx_name}/{onnx_version.version}"})
    say("export", f"registered {model_name} v{pt_version.version} and {onnx_name} v{onnx_version.version}, "
                   f"alias @{C.CANDIDATE_ALIAS}")
    if int8_model is not None:
        register_int8(int8_model, onnx_name + C.INT8_REGISTERED_SUFFIX,
                      {**tags, "flavor": "onnx-int8", "pytorch_version": pt_version.version,
                       "onnx_version": onnx_version.version})


def quantize(proto, dataset, test_images):
    """INT8 model, logged with its accuracy drop and speed-up. Returns its ModelInfo and accuracy drop."""
    calibration = nhwc(dataset.train_images[: C.INT8_CALIBRATION_IMAGES])
    quantized = export.quantize_int8(proto, calibration)
    float_onnx = export.onnx_predictor(export.session(proto))
    int8_onnx = export.onnx_predictor(export.session(quantized))
    float_accuracy = export.accuracy(float_onnx, test_images, dataset.test_labels)
    int8_accuracy = export.accuracy(int8_onnx, test_images, dataset.test_labels)
    drop = 100 * (float_accuracy - int8_accuracy)  # percentage points
    batch = test_images[:256]
    speedup = {n: export.median_seconds(float_onnx, batch[:n], 30) / export.median_seconds(int8_onnx, batch[:n], 30)
               for n in (1, len(batch))}
    mlflow.log_metrics({"onnx_test_accuracy": float_accuracy, "int8_test_accuracy": int8_accuracy,
                        "int8_accuracy_drop_points": drop, "int8_speedup_batch1": speedup[1],
                        f"int8_speedup_batch{len(batch)}": speedup[len(batch)]})
    example = test_images[:4]
    info = mlmodel.log_onnx(
        quantized, C.ONNX_INT8_MODEL_NAME, infer_signature(example, int8_onnx(example)), example,
        dataset.class_names, model_metadata(dataset.class_names),
        [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}", f"mlflow=={mlflow.__version__}"],
    )
    say("export", f"INT8: test accuracy {int8_accuracy:.2%} vs float {float_accuracy:.2%} (drop {drop:.2f} points); "
                   f"speed {speedup[len(batch)]:.2f}x float at batch {len(batch)}, {speedup[1]:.2f}x at batch 1")
    return info, drop


def register_int8(int8_model, registered_name: str, tags: dict) -> None:
    info, drop = int8_model
    if drop > C.INT8_MAX_DROP_POINTS:
        mlflow.set_tag("cifar10.registered.onnx_int8",
                       f"not registered: drop {drop:.2f} > {C.INT8_MAX_DROP_POINTS} points")
        say("export", f"INT8 model not registered: it loses {drop:.2f} points (limit {C.INT8_MAX_DROP_POINTS})")
        return
    version = registry.register(info.model_uri, registered_name,
                                {**tags, "int8_accuracy_drop_points": f"{drop:.2f}"}, C.CANDIDATE_ALIAS)
    mlflow.set_tag("cifar10.registered.onnx_int8", f"{registered_name}/{version.version}")
    say("export", f"registered {registered_name} v{version.version} (loses {drop:.2f} points), "
                   f"alias @{C.CANDIDATE_ALIAS}")


def local_model_file(model_id: str, filename: str) -> str:
    location = mlflow.get_logged_model(model_id).artifact_location
    if location.startswith("file://"):
        location = location[len("file://"):]
    return f"{location.rstrip('/')}/{filename}"
