"""Model Registry: one registered model per flavor, versions matched by tags, aliases instead of stages."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import constants as C
from .errors import UserError


def register(model, name: str, tags: dict, alias: str | None) -> ModelVersion:
    """Register the logged `model` (a ModelInfo) as a new version of `name` (created if missing), tag it,
    point `alias` at it. Through the client: mlflow.register_model prints two lines per version to
    stderr, which the export step's own line says again."""
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):  # made by an earlier run: fine
            raise
    version = client.create_model_version(name, model.model_uri, run_id=model.run_id,
                                          tags={k: str(v) for k, v in tags.items()}, model_id=model.model_id)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def card_facts(train_run, eval_run, ingest_run, class_names, parity, run_ids: dict) -> dict:
    """What model_card says about a version, all read from the runs that made it."""
    return {
        "model": train_run.data.params.get("model", "?"),
        "num_parameters": int(train_run.data.params.get("num_parameters", 0)),
        "train_params": train_run.data.params, "source": ingest_run.data.tags.get(C.TAG_SOURCE, "?"),
        "sha256": ingest_run.data.tags.get(C.TAG_SHA256, ""),
        "sizes": {k: int(ingest_run.data.metrics.get(f"{k}_records", 0)) for k in ("train", "test")},
        "test_accuracy": eval_run.data.metrics["test_accuracy"], "test_loss": eval_run.data.metrics["test_loss"],
        "per_class": {c: eval_run.data.metrics.get(f"test_accuracy_{c}", float("nan")) for c in class_names},
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


# --- promotion: move `champion` only to a version at least as good, both flavors together -------------

CHAMPION, PREVIOUS = "champion", "previous"


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    noop: bool = False  # the candidate already is the champion: nothing to change or record


def decide(candidate_accuracy: float, champion_accuracy: float | None, same_version: bool, force: bool) -> Decision:
    """The promotion gate, as a pure function of the two test accuracies."""
    if same_version:
        return Decision(False, "already the champion", noop=True)
    if champion_accuracy is None:
        return Decision(True, f"no champion yet; candidate test accuracy {candidate_accuracy:.4f}")
    if candidate_accuracy >= champion_accuracy:
        return Decision(True, f"test accuracy {candidate_accuracy:.4f} >= champion's {champion_accuracy:.4f}")
    if force:
        return Decision(True, f"forced: test accuracy {candidate_accuracy:.4f} < champion's {champion_accuracy:.4f}")
    return Decision(False, f"test accuracy {candidate_accuracy:.4f} < champion's {champion_accuracy:.4f}")


def _accuracy(version: ModelVersion, name: str) -> float:
    try:
        return float(version.tags["test_accuracy"])
    except (KeyError, ValueError):
        raise UserError(f"{name} v{version.version} has no test_accuracy tag; only versions registered by the "
                        "export step can be promoted") from None


def _version(client: MlflowClient, name: str, ref: str) -> ModelVersion:
    """A version by number or by alias ('candidate', 'previous', ...)."""
    try:
        if ref.isdigit():
            return client.get_model_version(name, ref)
        return client.get_model_version_by_alias(name, ref)
    except MlflowException:
        raise UserError(f"registered model {name!r} has no version {ref!r}") from None


def version_of_uri(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    """The registered version a `models:/NAME/VERSION` (or `@ALIAS`, `/latest`) URI names; None for other URIs."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    uri = model_uri.strip()
    if not uri.startswith("models:/"):
        return None
    found = get_model_name_and_version(client, uri)  # (model id,) for models:/<id>: not a registered version
    return client.get_model_version(*found) if len(found) == 2 else None


def promote(
    client: MlflowClient, name: str, ref: str, onnx_name: str, force: bool = False
) -> tuple[Decision, str, str | None]:
    """Point `champion` of `name` and `onnx_name` at the versions one training run made, if the gate allows.

    The replaced versions get the alias `previous`, so rolling back is one more promotion (`previous`,
    forced). Returns the decision, the candidate's version and the replaced version, if any. Every
    check runs before the first alias moves: a refused or invalid promotion changes no alias.
    """
    candidate = _version(client, name, ref)
    accuracy = _accuracy(candidate, name)
    onnx_candidate = _version(client, onnx_name, candidate.tags.get("onnx_version", "?"))
    if onnx_candidate.tags.get("train_run_id") != candidate.tags.get("train_run_id"):
        raise UserError(f"{onnx_name} v{onnx_candidate.version} was not trained by the same run as "
                        f"{name} v{candidate.version}; refusing to pair them")
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    decision = decide(accuracy, _accuracy(champion, name) if champion else None,
                      champion is not None and str(champion.version) == str(candidate.version), force)
    if decision.noop:  # leave the tags that say why it became champion as they are
        return decision, str(candidate.version), None
    outcome = "promoted" if decision.promote else "refused"
    for model, version in ((name, candidate.version), (onnx_name, onnx_candidate.version)):
        client.set_model_version_tag(model, str(version), "promotion", f"{outcome}: {decision.reason}")
    if not decision.promote:
        return decision, str(candidate.version), None
    replaced = None
    if champion is not None:
        onnx_champion = client.get_model_version_by_alias(onnx_name, CHAMPION)
        client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(onnx_name, PREVIOUS, onnx_champion.version)
        client.set_model_version_tag(name, str(champion.version), "replaced_by", str(candidate.version))
        replaced = str(champion.version)
    client.set_registered_model_alias(onnx_name, CHAMPION, onnx_candidate.version)
    client.set_registered_model_alias(name, CHAMPION, candidate.version)
    return decision, str(candidate.version), replaced
