"""Model cards: the description of a registered version in `mlflow ui`, every fact read from the runs that made it."""

from __future__ import annotations

import contextlib
import math

from . import constants as C


def card_facts(train_run, config, scored, ingest_run, class_names, parity, run_ids: dict) -> dict:
    """What model_card says about a version, read from the runs that made it, `config`, the resolved recipe
    its checkpoint holds (the train run's params say 'auto' where `-e train` was given it), and `scored`,
    the float flavors' evaluation.Evaluation on the test images."""
    from dataclasses import asdict

    return {
        "model": config.model,
        "num_parameters": int(train_run.data.params.get("num_parameters", 0)),
        "train_params": {**train_run.data.params, **{k: str(v) for k, v in asdict(config).items()}},
        "source": ingest_run.data.tags.get(C.TAG_SOURCE, "?"),
        "sha256": ingest_run.data.tags.get(C.TAG_SHA256, ""),
        "sizes": {k: int(ingest_run.data.metrics.get(f"{k}_records", 0)) for k in ("train", "test")},
        "test_accuracy": scored.accuracy, "test_loss": scored.loss,
        "per_class": dict(zip(class_names, scored.per_class_accuracy, strict=True)),
        "onnx_max_abs_diff": parity.max_abs_diff, "onnx_mismatches": parity.argmax_mismatches,
        "parity_images": parity.images, "run_ids": run_ids,
        "tuned": {key: train_run.data.tags[tag] for key, tag in (
            ("study", C.TAG_STUDY), ("study_run_id", C.TAG_STUDY_RUN), ("trials", C.TAG_STUDY_TRIALS),
            ("best_trial", C.TAG_STUDY_BEST_TRIAL), ("best_val_accuracy", C.TAG_STUDY_BEST))
            if tag in train_run.data.tags} or None,
    }


def model_card(
    *, name: str, version: str, flavor: str, model: str, num_parameters: int, train_params: dict,
    source: str, sha256: str, sizes: dict, test_accuracy: float, test_loss: float, per_class: dict,
    onnx_max_abs_diff: float, onnx_mismatches: int, parity_images: int, run_ids: dict,
    quantized: dict | None = None, tuned: dict | None = None,
) -> str:
    """The description shown for a registered version in `mlflow ui`: what it is, how good, how to use it."""
    uri = f"models:/{name}/{version}"
    load = ("mlflow.pytorch.load_model" if flavor == "pytorch" else "mlflow.pyfunc.load_model")
    trained = {**train_params, "epochs": train_params.get("epochs_planned", train_params.get("epochs")),
               "precision": train_params.get("precision_used", train_params.get("precision"))}  # after auto/budget
    with contextlib.suppress(KeyError, ValueError, ZeroDivisionError):  # a budget's last epoch may be partial
        per_epoch = int(train_params.get("steps_per_epoch") or math.ceil(  # older runs: the usual count
            int(train_params["train_records"]) / int(train_params["batch_size"])))
        if (steps := int(train_params["train_steps"])) != int(trained["epochs"]) * per_epoch:
            trained["epochs"] = f"{steps / per_epoch:.2f} ({steps:,} steps)"
    hyper = ", ".join(f"{k} {trained[k]}" for k in ("epochs", "batch_size", "learning_rate", "lr_schedule",
                                                    "precision", "seed") if trained.get(k) is not None)
    optimizer = {"sgd": "SGD (Nesterov)", "adam": "Adam",
                 "muon": "Muon (conv filters) + SGD (Nesterov)"}.get(train_params.get("optimizer"), "?")
    classes = ", ".join(f"{c} {100 * a:.1f} %" for c, a in per_class.items())
    return "\n".join([
        f"**{model}** ({num_parameters:,} parameters), {flavor} flavor.",
        "",
        f"* **Test accuracy {100 * test_accuracy:.2f} %** (loss {test_loss:.4f}) "
        f"on {sizes.get('test', '?'):,} test images.",
        f"* Per class: {classes}.",
        (f"* ONNX parity: max |logit difference| {onnx_max_abs_diff:.1e} over {parity_images:,} test images, "
         f"{onnx_mismatches} differing predictions." if quantized is None else
         f"* INT8: quantized from the float ONNX model (ONNX Runtime static quantization, QDQ, per-channel "
         f"7-bit weights, calibrated on {quantized['calibration_images']:,} training images). Accuracy and speed "
         f"measured with ONNX Runtime on {quantized['machine']}: {100 * test_accuracy:.2f} % against the float "
         f"model's {100 * quantized['float_accuracy']:.2f} % (drop {quantized['drop_points']:.2f} points); "
         f"{quantized['speedup_batch256']:.2f}x the float model's speed at batch 256, "
         f"{quantized['speedup_batch1']:.2f}x at batch 1."),
        f"* Data: `{source}`, sha256 `{sha256}`, {sizes.get('train', '?'):,} train / {sizes.get('test', '?'):,} test.",
        f"* Training: {optimizer}, {hyper}, on {train_params.get('train_device', '?')}.",
        *([f"* Tuned: the parameters of trial {tuned['best_trial']} of study `{tuned['study']}` (run "
           f"`{tuned['study_run_id']}`, {tuned['trials']} trials), chosen on held-out training images (accuracy "
           f"{100 * float(tuned['best_val_accuracy']):.2f} %), then trained on all of them; the test images "
           "scored this model only."] if tuned else []),
        "* Runs: " + ", ".join(f"{k} `{v}`" for k, v in run_ids.items() if v) + ".",
        "",
        "Input `images`: uint8 RGB `[batch, 32, 32, 3]` (NHWC, raw pixels; normalization is inside the model). "
        "Output `logits`: float32 `[batch, 10]`; softmax gives class probabilities, in the class order of the "
        "model's metadata.",
        "",
        f"Load: `{load}(\"{uri}\")`. Serve: `mlflow models serve -m {uri} --env-manager local -p 5001`.",
    ])
