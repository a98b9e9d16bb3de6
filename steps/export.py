"""export: log the PyTorch flavor and convert it to ONNX, check both against the checkpoint, then register
them (alias candidate), and an INT8 ONNX model when it loses at most a point."""

import contextlib

import mlflow
import numpy as np
import torch

from cifar10_cnn import (
    cards,
    checkpoints,
    cores,
    entry_points,
    evaluation,
    export,
    hardware,
    mlmodel,
    models,
    params,
    registry,
    tracking,
)
from cifar10_cnn import constants as C
from cifar10_cnn.data import nhwc
from cifar10_cnn.errors import CheckFailed, UserError
from cifar10_cnn.progress import say


def run(train_run_id: str, evaluate_run_id: str, model_name: str, int8: str = "true") -> None:
    model_name = params.model_name(model_name)
    int8 = params.BOOLEAN("int8", int8)
    train_run_id = params.run_id("train_run_id", train_run_id)
    evaluate_run_id = params.run_id("evaluate_run_id", evaluate_run_id)
    if not tracking.running_beside(evaluate_run_id, "evaluate"):  # checked now; if main runs it beside us, later
        evaluation_of(train_run_id, evaluate_run_id)
    train_run, net, config = checkpoints.trained(train_run_id)
    ingest_run_id = train_run.data.params["ingest_run_id"]
    dataset = tracking.dataset_of(ingest_run_id, ("train", "test") if int8 else ("test",))
    images = nhwc(dataset.test_images)
    model = models.RawPixelClassifier(net).eval()
    share = torch.get_num_threads()  # this step's share of the cores (main runs evaluate beside it)

    # One torch.export trace serves both flavors: MLflow traces the network into the PyTorch flavor
    # (a pt2 program), and the ONNX model is converted from that program as loaded back from its file.
    pytorch_info = mlmodel.log_pytorch(model, images[:4], dataset.class_names)
    program = mlmodel.pytorch_program(pytorch_info)
    proto = export.to_onnx(program, torch.from_numpy(images[:8]))
    # Both, as logged, must compute what the checkpoint does, on every test image: one pass of each, kept for
    # every check. The torch pass takes the whole machine once evaluate is done; ONNX Runtime keeps this
    # step's share, so that float and INT8 are timed on as many threads.
    float_onnx = export.onnx_predictor(export.session(proto, threads=share))
    onnx_logits = export.outputs(float_onnx, images)
    pytorch_logits = export.outputs(cores.taking_freed("export", export.torch_predictor(program.module())), images)
    float_accuracy = export.accuracy(onnx_logits, dataset.test_labels)
    quantized = quantize(proto, dataset, images, share) if int8 else None
    # What follows needs the evaluate run's results (main runs it beside this step: it gets our cores while
    # we wait): the checkpoint's logits, which the parity checks compare with (so a failed check is only
    # known after quantizing, and still before anything is registered), and the accuracy for the cards.
    # INT8's speed is timed against float's once no other step shares the machine.
    cores.free("export")
    eval_run = evaluation_of(train_run_id, evaluate_run_id)
    reference = checkpoint_logits(eval_run, model, images)
    onnx_parity, pytorch_parity = export.parity(reference, onnx_logits), export.parity(reference, pytorch_logits)
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
    # The float flavors' scores, as they run here: their predictions are the reference's (parity). Evaluate's
    # own figures, where it ran on a GPU (TF32 convolutions), can differ on a few images.
    served = evaluation.evaluate(torch.from_numpy(reference), torch.from_numpy(dataset.test_labels), C.NUM_CLASSES)

    mlflow.set_tag(C.TAG_PYTORCH_MODEL_URI, pytorch_info.model_uri)
    onnx_info = mlmodel.log_onnx(proto, C.ONNX_MODEL_NAME, images[:4], onnx_logits[:4], dataset.class_names)
    onnx_path = local_model_file(onnx_info.model_id, "model.onnx")
    mlflow.set_tags({C.TAG_ONNX_MODEL_URI: onnx_info.model_uri, C.TAG_ONNX_PATH: onnx_path})
    int8_model = log_int8(*quantized, float_onnx, dataset, images, float_accuracy) if int8 else None

    # Register every flavor with the same tags and a model card each, under the registry's lock, after
    # repairing what an interrupted registration may have left (registry.py says how a crash is survived).
    export_run_id = mlflow.active_run().info.run_id
    ingest_run = mlflow.get_run(ingest_run_id)
    tags = {"ingest_run_id": ingest_run_id, "train_run_id": train_run_id, "evaluate_run_id": evaluate_run_id,
            "export_run_id": export_run_id,
            "pipeline_run_id": mlflow.get_run(export_run_id).data.tags.get(C.TAG_PARENT_RUN, ""),
            "test_accuracy": f"{served.accuracy:.4f}",
            "dataset_sha256": ingest_run.data.tags.get(C.TAG_SHA256, ""), "model": config.model,
            "onnx_max_abs_diff": f"{onnx_parity.max_abs_diff:.2e}",
            **({"study": train_run.data.tags[C.TAG_STUDY]} if C.TAG_STUDY in train_run.data.tags else {})}
    names = registry.Names(model_name)
    facts = cards.card_facts(train_run, config, served, ingest_run, dataset.class_names, onnx_parity,
                             {k: tags[f"{k}_run_id"] for k in ("pipeline", "ingest", "train", "evaluate", "export")})

    def entry(info, name: str, flavor: str, extra_tags: dict | None = None, **card_facts) -> registry.Entry:
        version_tags = {k: v for k, v in {**tags, "flavor": flavor, **(extra_tags or {})}.items() if v is not None}
        return registry.Entry(info, version_tags, lambda version: cards.model_card(
            name=name, version=version, flavor=flavor, **{**facts, **card_facts}))

    int8_entry = None if int8_model is None else int8_to_register(int8_model, names.int8, entry, tags["test_accuracy"])
    client = mlflow.MlflowClient()
    with tracking.store_lock(registry.LOCK) as locked:
        for change in registry.repair(client, names, locked):
            say("export", f"repaired an interrupted registration: {change}")
        try:
            versions = registry.publish(client, names, entry(pytorch_info, names.pytorch, "pytorch"),
                                        entry(onnx_info, names.onnx, "onnx"), int8_entry)
        except BaseException:
            with contextlib.suppress(Exception):  # under the lock: what it wrote is tagged orphan now
                registry.repair(client, names, locked)  # (on a server: by a later repair, once this run FAILED)
            raise
    mlflow.set_tags({C.TAG_REGISTERED.format(flavor=flavor): f"{name}/{versions[name]}"
                     for flavor, name in (("pytorch", names.pytorch), ("onnx", names.onnx), ("onnx_int8", names.int8))
                     if name in versions})
    registered = ", ".join(f"{name} v{versions[name]}" for name in (names.pytorch, names.onnx, names.int8)
                           if name in versions)
    say("export", f"registered {registered}, alias @{C.CANDIDATE_ALIAS}")


def evaluation_of(train_run_id: str, evaluate_run_id: str):
    """The FINISHED evaluate run of this train run; waited for while the pipeline still runs it beside export."""
    run = tracking.upstream(evaluate_run_id, "evaluate", wait_in_pipeline=True)
    if run.data.params.get("train_run_id") != train_run_id:
        raise UserError(f"evaluate run {evaluate_run_id} evaluated train run "
                        f"{run.data.params.get('train_run_id')}, not {train_run_id}")
    return run


def checkpoint_logits(eval_run, model, images: np.ndarray) -> np.ndarray:
    """The checkpoint's float32 logits of the test images: the evaluate run's, where it computed them on the
    CPU (the same checkpoint and images; saves a pass), else computed now by `model`."""
    run_id = eval_run.info.run_id
    if eval_run.data.params.get("eval_device") != "cpu" or C.TEST_LOGITS_PATH not in {
            a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}:
        # a GPU's kernels (TF32 convolutions) are not the CPU's, and older evaluate runs logged no logits
        return export.outputs(cores.taking_freed("export", export.torch_predictor(model)), images)
    with tracking.artifact(run_id, C.TEST_LOGITS_PATH) as path:
        try:
            logits = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise CheckFailed(f"evaluate run {run_id}'s {C.TEST_LOGITS_PATH} is not a readable array ({exc}); "
                              "nothing was registered") from None
    if logits.shape != (len(images), C.NUM_CLASSES) or logits.dtype != np.float32:
        raise CheckFailed(f"evaluate run {run_id}'s {C.TEST_LOGITS_PATH} holds {logits.dtype} {logits.shape}, "
                          f"not float32 ({len(images)}, {C.NUM_CLASSES}); nothing was registered")
    return logits


def quantize(proto, dataset, test_images, threads: int):
    """The INT8 model of `proto`, calibrated on training images, its ONNX Runtime predictor (`threads`) and
    its scores on the test images."""
    calibration = nhwc(dataset.train_images[: C.INT8_CALIBRATION_IMAGES])
    quantized = export.quantize_int8(proto, calibration)
    int8_onnx = export.onnx_predictor(export.session(quantized, threads=threads))
    scored = evaluation.evaluate(torch.from_numpy(export.outputs(int8_onnx, test_images)),
                                 torch.from_numpy(dataset.test_labels), C.NUM_CLASSES)
    return quantized, int8_onnx, scored, len(calibration)


def log_int8(quantized, int8_onnx, scored, calibration_images: int, float_onnx, dataset, test_images,
             float_accuracy: float):
    """The INT8 model logged with its accuracy drop and its speed-up over float (`float_onnx`), timed now.
    Returns its ModelInfo and what was measured."""
    drop = 100 * (float_accuracy - scored.accuracy)  # percentage points
    batch = test_images[:256]
    speedup = {n: export.median_seconds(float_onnx, batch[:n], reps) / export.median_seconds(int8_onnx, batch[:n], reps)
               for n, reps in ((1, 20), (len(batch), 5))}
    mlflow.log_metrics({"onnx_test_accuracy": float_accuracy, "int8_test_accuracy": scored.accuracy,
                        "int8_accuracy_drop_points": drop, "int8_speedup_batch1": speedup[1],
                        f"int8_speedup_batch{len(batch)}": speedup[len(batch)]})
    info = mlmodel.log_onnx(quantized, C.ONNX_INT8_MODEL_NAME, test_images[:4], int8_onnx(test_images[:4]),
                            dataset.class_names)
    say("export", f"INT8: test accuracy {scored.accuracy:.2%} vs float {float_accuracy:.2%} (drop {drop:.2f} "
                   f"points); speed {speedup[len(batch)]:.2f}x float at batch {len(batch)}, "
                   f"{speedup[1]:.2f}x at batch 1")
    measured = {"accuracy": scored.accuracy, "loss": scored.loss,
                "per_class": dict(zip(dataset.class_names, scored.per_class_accuracy, strict=True)),
                "quantized": {"calibration_images": calibration_images, "machine": hardware.describe(
                    hardware.cpu_capabilities()), "float_accuracy": float_accuracy, "drop_points": drop,
                              "speedup_batch1": speedup[1], "speedup_batch256": speedup[len(batch)]}}
    return info, measured


def int8_to_register(int8_model, registered_name: str, entry, float_test_accuracy: str):
    """The INT8 model's registry.Entry if it loses at most INT8_MAX_DROP_POINTS, with its own accuracy and
    card (the float model's accuracy beside it); None, and a tag saying why, if it loses more."""
    info, measured = int8_model
    drop = measured["quantized"]["drop_points"]
    if drop > C.INT8_MAX_DROP_POINTS:
        mlflow.set_tag(C.TAG_REGISTERED.format(flavor="onnx_int8"),
                       f"not registered: drop {drop:.2f} > {C.INT8_MAX_DROP_POINTS} points")
        say("export", f"INT8 model not registered: it loses {drop:.2f} points (limit {C.INT8_MAX_DROP_POINTS})")
        return None
    return entry(info, registered_name, "onnx-int8",
                 {"test_accuracy": f"{measured['accuracy']:.4f}", "float_test_accuracy": float_test_accuracy,
                  "int8_accuracy_drop_points": f"{drop:.2f}", "onnx_max_abs_diff": None},  # the float model's
                 test_accuracy=measured["accuracy"], test_loss=measured["loss"], per_class=measured["per_class"],
                 quantized=measured["quantized"])


def local_model_file(model_id: str, filename: str) -> str:
    location = mlflow.get_logged_model(model_id).artifact_location
    if location.startswith("file://"):
        location = location[len("file://"):]
    return f"{location.rstrip('/')}/{filename}"


def main(argv=None):
    args = entry_points.parser("export", __doc__).parse_args(argv)
    tracking.run_step("export", run, **vars(args))


if __name__ == "__main__":
    main()
