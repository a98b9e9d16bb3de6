"""Promotion: move `champion` only to a version at least as good, on every flavor together (aliases, not
stages). Under the store's lock where it has one; without (a tracking server), one promotion at a time by
a marker on the registered model (registry.TAG_PROMOTING), which repair respects meanwhile."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import registry
from .errors import UserError


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    noop: bool = False  # the candidate already is the champion: nothing to change or record


def decide(candidate_accuracy: float, champion_accuracy: float | None, same_version: bool, force: bool,
           other_test_set: str = "") -> Decision:
    """The promotion gate, as a pure function of the two test accuracies (and, when they were measured on
    different test sets, `other_test_set` saying so: then they do not compare, and only force moves it)."""
    if same_version:
        return Decision(False, "already the champion", noop=True)
    if champion_accuracy is None:
        return Decision(True, f"no champion yet; candidate test accuracy {candidate_accuracy:.4f}")
    if other_test_set:
        return Decision(force, f"{'forced: ' if force else ''}{other_test_set}, so test accuracy "
                               f"{candidate_accuracy:.4f} and the champion's {champion_accuracy:.4f} do not compare")
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


def promote(client: MlflowClient, names: registry.Names, ref: str,
            force: bool = False) -> tuple[Decision, str, str | None]:
    """Point `champion` of the three registered models at the versions one training run made, if the gate
    allows.

    The replaced versions get the alias `previous`, so rolling back is one more promotion (`previous`,
    forced). Returns the decision, the candidate's version and the replaced version, if any. Every
    check runs before the first alias moves: a refused or invalid promotion changes no alias; the
    aliases move as publish moves them (the PyTorch one last).
    """
    candidate = _version(client, names.pytorch, ref)
    accuracy = _accuracy(candidate, names.pytorch)
    twins = [(_version(client, name, candidate.tags.get(tag, "?")), flavor) for (name, tag), flavor
             in zip(names.twins(), ("onnx", "onnx-int8"), strict=True)
             if tag in candidate.tags or tag == registry.ONNX_VERSION]
    for version, flavor in ((candidate, "pytorch"), *twins):
        if not registry.complete(version):
            raise UserError(f"{version.name} v{version.version} was not registered whole "
                            f"({version.tags.get(registry.TAG_ORPHAN, 'no model card')}); refusing to promote it")
        if version.tags.get("train_run_id") != candidate.tags.get("train_run_id"):
            raise UserError(f"{version.name} v{version.version} was not trained by the same run as "
                            f"{names.pytorch} v{candidate.version}; refusing to pair them")
        if version.tags.get("flavor", flavor) != flavor:  # e.g. -P model_name=NAME-onnx named the ONNX model
            raise UserError(f"{version.name} v{version.version} is a {version.tags['flavor']} model, not the "
                            f"{flavor} one this promotion needs there; give the PyTorch model's name")
    twins = [version for version, _ in twins]
    committed = candidate.tags.get(registry.TAG_REGISTRATION) == registry.COMMITTED or (
        registry.TAG_REGISTRATION not in candidate.tags  # registered before the tag was, by an export that ended
        and registry.export_status(client, candidate) in ("FINISHED", None) and "export_run_id" in candidate.tags)
    if not committed:  # cards written, but no alias moved
        raise UserError(f"{names.pytorch} v{candidate.version}: no alias ever reached the versions its export "
                        "registered (that export was interrupted, or is still registering); refusing to promote it")
    champion = registry.by_alias(client, names.pytorch, registry.CHAMPION)
    data = {v.tags.get("dataset_sha256") for v in (candidate, champion) if v is not None}
    decision = decide(accuracy, _accuracy(champion, names.pytorch) if champion else None,
                      champion is not None and str(champion.version) == str(candidate.version), force,
                      "scored on other data (dataset_sha256 differs)" if len(data) > 1 else "")
    if decision.noop:  # leave the tags that say why it became champion as they are
        return decision, str(candidate.version), None
    outcome = "promoted" if decision.promote else "refused"
    for version in (candidate, *twins):
        client.set_model_version_tag(version.name, str(version.version), "promotion", f"{outcome}: {decision.reason}")
    if not decision.promote:
        return decision, str(candidate.version), None
    replaced = None
    if champion is not None:
        registry.move(client, names, registry.PREVIOUS, champion)
        client.set_model_version_tag(names.pytorch, str(champion.version), "replaced_by", str(candidate.version))
        replaced = str(champion.version)
    registry.move(client, names, registry.CHAMPION, candidate)
    return decision, str(candidate.version), replaced


@contextlib.contextmanager
def one_at_a_time(client: MlflowClient, names: registry.Names, run_id: str, settle_s: float = 1.0):
    """Without the store's lock: refuse while another promotion's marker is fresh, else set ours, and after
    `settle_s` (long enough for a racing promotion's marker to land) go on only if ours is still there."""
    def refuse(other: str):
        raise UserError(f"promote run {other} is promoting {names.pytorch} right now; run again when it is done "
                        f"(a marker it left by dying expires after {registry.PROMOTING_STALE_S:g} s)")

    if (other := registry.promoting(client, names)) not in (None, run_id):
        refuse(other)
    client.set_registered_model_tag(names.pytorch, registry.TAG_PROMOTING, f"{run_id} {time.time():.3f}")
    time.sleep(settle_s)
    if (other := registry.promoting(client, names)) != run_id:
        refuse(other)
    try:
        yield
    finally:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model_tag(names.pytorch, registry.TAG_PROMOTING)
