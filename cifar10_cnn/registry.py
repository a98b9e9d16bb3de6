"""Model Registry: one registered model per flavor, versions matched by tags, aliases instead of stages."""

from __future__ import annotations

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient


def register(model_uri: str, name: str, tags: dict, alias: str | None) -> ModelVersion:
    """Register `model_uri` as a new version of `name` (created if missing), tag it, point `alias` at it."""
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    if alias:
        MlflowClient().set_registered_model_alias(name, alias, version.version)
    return version


def model_card(
    *, name: str, version: str, flavor: str, model: str, num_parameters: int, train_params: dict,
    source: str, sha256: str, sizes: dict, test_accuracy: float, test_loss: float, per_class: dict,
    onnx_max_abs_diff: float, onnx_mismatches: int, parity_images: int, run_ids: dict,
) -> str:
    """The description shown for a registered version in `mlflow ui`: what it is, how good, how to use it."""
    uri = f"models:/{name}/{version}"
    load = ("mlflow.pytorch.load_model" if flavor == "pytorch" else "mlflow.pyfunc.load_model")
    hyper = ", ".join(f"{k} {train_params[k]}" for k in ("epochs", "batch_size", "learning_rate", "seed")
                      if k in train_params)
    classes = ", ".join(f"{c} {100 * a:.1f} %" for c, a in per_class.items())
    return "\n".join([
        f"**{model}** ({num_parameters:,} parameters), {flavor} flavor.",
        "",
        f"* **Test accuracy {100 * test_accuracy:.2f} %** (loss {test_loss:.4f}) "
        f"on {sizes.get('test', '?'):,} test images.",
        f"* Per class: {classes}.",
        f"* ONNX parity: max |logit difference| {onnx_max_abs_diff:.1e} over {parity_images:,} test images, "
        f"{onnx_mismatches} differing predictions.",
        f"* Data: `{source}`, sha256 `{sha256}`, {sizes.get('train', '?'):,} train / {sizes.get('test', '?'):,} test.",
        f"* Training: Adam, {hyper}, on {train_params.get('train_device', '?')}.",
        "* Runs: " + ", ".join(f"{k} `{v}`" for k, v in run_ids.items() if v) + ".",
        "",
        "Input `images`: uint8 RGB `[batch, 32, 32, 3]` (NHWC, raw pixels; normalization is inside the model). "
        "Output `logits`: float32 `[batch, 10]`; softmax gives class probabilities, in the class order of the "
        "model's metadata.",
        "",
        f"Load: `{load}(\"{uri}\")`. Serve: `mlflow models serve -m {uri} --env-manager local -p 5001`.",
    ])
