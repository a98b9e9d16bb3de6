"""Model Registry: one registered model per flavor (PyTorch, ONNX, ONNX INT8), versions of one training run
matched by tags, aliases instead of stages, and registration that a crash cannot half-do.

The registry has no transactions, so the order of the calls carries the guarantee (`publish`):

1. every version of a set is written whole before any alias moves: created with its tags (ONNX first,
   then INT8 naming it, then PyTorch naming both), then the tags pointing back, then the cards. The card
   is written last, so a version with a card is complete;
2. the aliases move last, INT8's and ONNX's first and PyTorch's last: the PyTorch alias is the commit.

A crash before the commit leaves the PyTorch alias on the previous set; `repair`, which export and
promote run first (under the store's lock), puts the ONNX and INT8 aliases back on the versions that the
PyTorch alias's version names, and tags the versions an interrupted export left outside every committed
set (TAG_ORPHAN). A set an alias has reached is committed for good (TAG_REGISTRATION), whatever became
of its export run afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import constants as C
from .errors import UserError

ONNX_VERSION, INT8_VERSION, PYTORCH_VERSION = "onnx_version", "int8_version", "pytorch_version"  # version tags
TAG_ORPHAN = "orphan"  # on a version an interrupted export left behind: why no alias will point at it
TAG_REGISTRATION, COMMITTED = "registration", "committed"  # on a PyTorch version whose set an alias reached
CHAMPION, PREVIOUS = "champion", "previous"
ALIASES = (C.CANDIDATE_ALIAS, CHAMPION, PREVIOUS)
LOCK = "registry"  # tracking.store_lock's name for a registration or promotion


@dataclass(frozen=True)
class Names:
    """The three registered models of one model name."""
    pytorch: str

    @property
    def onnx(self) -> str:
        return self.pytorch + C.ONNX_REGISTERED_SUFFIX

    @property
    def int8(self) -> str:
        return self.onnx + C.INT8_REGISTERED_SUFFIX

    def twins(self):
        """The registered models whose aliases follow the PyTorch one's, with the tag that names their version."""
        return ((self.onnx, ONNX_VERSION), (self.int8, INT8_VERSION))


@dataclass(frozen=True)
class Entry:
    """One version to register: a logged model (a ModelInfo), its tags, and its card given its version number."""
    model: object
    tags: dict
    card: object  # Callable[[str], str]


def publish(client: MlflowClient, names: Names, pytorch: Entry, onnx: Entry, int8: Entry | None,
            alias: str = C.CANDIDATE_ALIAS) -> dict[str, str]:
    """Register one training run's models and point `alias` at them, in the order the module's docstring
    gives. Returns the version of each registered name."""
    for name in (names.pytorch, names.onnx, *([names.int8] if int8 else [])):
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):  # made by an earlier run: fine
                raise

    def create(name: str, entry: Entry, **links) -> str:
        version = client.create_model_version(name, entry.model.model_uri, run_id=entry.model.run_id,
                                              tags={k: str(v) for k, v in {**entry.tags, **links}.items()},
                                              model_id=entry.model.model_id)
        return str(version.version)

    versions = {names.onnx: create(names.onnx, onnx)}
    if int8:
        versions[names.int8] = create(names.int8, int8, **{ONNX_VERSION: versions[names.onnx]})
    links = {ONNX_VERSION: versions[names.onnx], **({INT8_VERSION: versions[names.int8]} if int8 else {})}
    versions[names.pytorch] = create(names.pytorch, pytorch, **links)
    for name in [n for n in (names.onnx, names.int8) if n in versions]:
        client.set_model_version_tag(name, versions[name], PYTORCH_VERSION, versions[names.pytorch])
    for name, entry in ((names.int8, int8), (names.onnx, onnx), (names.pytorch, pytorch)):
        if entry:
            client.update_model_version(name, versions[name], description=entry.card(versions[name]))
    move(client, names, alias, client.get_model_version(names.pytorch, versions[names.pytorch]))
    client.set_model_version_tag(names.pytorch, versions[names.pytorch], TAG_REGISTRATION, COMMITTED)
    return versions


def move(client: MlflowClient, names: Names, alias: str, pytorch: ModelVersion) -> None:
    """Point `alias` at the set whose PyTorch version is `pytorch`: the twins first, the PyTorch alias last
    (a twin without a version in the set loses the alias)."""
    for name, tag in names.twins():
        if tag in pytorch.tags:
            client.set_registered_model_alias(name, alias, pytorch.tags[tag])
        else:
            _drop_alias(client, name, alias)
    client.set_registered_model_alias(names.pytorch, alias, pytorch.version)


def repair(client: MlflowClient, names: Names, locked: bool) -> list[str]:
    """Undo what an interrupted publish or promotion left. Returns what it changed.

    1. Each twin's alias back on the version the PyTorch alias's version names. Without the store's lock
       (`locked` False: a tracking server), only where the twin's alias is on a version of an export run
       that has ended: another export may be between its alias moves at this moment.
    2. Every set a PyTorch alias points at is marked committed (TAG_REGISTRATION on its PyTorch version;
       publish marks its own set, and this catches a kill between the commit and the mark).
    3. Versions of an interrupted export, unaliased and in no committed set, tagged TAG_ORPHAN: without
       the lock only those of an export run that ended FAILED or KILLED; versions that no export made
       (no `export_run_id`) are left alone.
    """
    changed = []
    for alias in ALIASES:
        head = _by_alias(client, names.pytorch, alias)
        for name, tag in names.twins():
            want = head.tags.get(tag) if head else None
            have = _by_alias(client, name, alias)
            if (str(have.version) if have else None) == want or (
                    not locked and have is not None and _export_status(client, have) in ("RUNNING", None)):
                continue
            if want:
                client.set_registered_model_alias(name, alias, want)
            else:
                _drop_alias(client, name, alias)
            changed.append(f"{name}@{alias} -> {want or 'removed'}")
        if head is not None and head.tags.get(TAG_REGISTRATION) != COMMITTED:
            client.set_model_version_tag(names.pytorch, str(head.version), TAG_REGISTRATION, COMMITTED)
    versions = {name: _versions(client, name) for name in (names.pytorch, names.onnx, names.int8)}
    committed = {str(v.version) for v in versions[names.pytorch] if v.tags.get(TAG_REGISTRATION) == COMMITTED}
    for name, found in versions.items():
        for version in found:
            head = str(version.version) if name == names.pytorch else version.tags.get(PYTORCH_VERSION)
            if version.aliases or TAG_ORPHAN in version.tags or head in committed \
                    or "export_run_id" not in version.tags:
                continue
            status = _export_status(client, version)
            if status in ("FAILED", "KILLED") or (locked and (status not in ("FINISHED", None)
                                                              or not version.description)):
                client.set_model_version_tag(name, version.version, TAG_ORPHAN, (
                    f"registration interrupted (export run {version.tags['export_run_id']} "
                    f"{(status or 'unknown').lower()}); no alias points at it"))
                changed.append(f"{name} v{version.version} orphan")
    return changed


def complete(version: ModelVersion) -> bool:
    """Written whole by publish: its card is its last write."""
    return bool(version.description) and TAG_ORPHAN not in version.tags


def _versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    try:
        return client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []


def _export_status(client: MlflowClient, version: ModelVersion) -> str | None:
    """The status of the export run that made `version`; None when unknown (no tag, or the store says nothing)."""
    run_id = version.tags.get("export_run_id")
    if not run_id:
        return None
    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


def _by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` names; None when the model or the alias does not exist (other errors raise: a store
    that cannot answer must not look like an alias to remove)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _drop_alias(client: MlflowClient, name: str, alias: str) -> None:
    if _by_alias(client, name, alias) is not None:
        client.delete_registered_model_alias(name, alias)


# --- promotion: move `champion` only to a version at least as good, every flavor together ------------

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


def version_of_uri(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    """The registered version a `models:/NAME/VERSION` (or `@ALIAS`, `/latest`) URI names; None for other URIs."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    uri = model_uri.strip()
    if not uri.startswith("models:/"):
        return None
    found = get_model_name_and_version(client, uri)  # (model id,) for models:/<id>: not a registered version
    return client.get_model_version(*found) if len(found) == 2 else None


def promote(client: MlflowClient, names: Names, ref: str, force: bool = False) -> tuple[Decision, str, str | None]:
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
             in zip(names.twins(), ("onnx", "onnx-int8"), strict=True) if tag in candidate.tags or tag == ONNX_VERSION]
    for version, flavor in ((candidate, "pytorch"), *twins):
        if not complete(version):
            raise UserError(f"{version.name} v{version.version} was not registered whole "
                            f"({version.tags.get(TAG_ORPHAN, 'no model card')}); refusing to promote it")
        if version.tags.get("train_run_id") != candidate.tags.get("train_run_id"):
            raise UserError(f"{version.name} v{version.version} was not trained by the same run as "
                            f"{names.pytorch} v{candidate.version}; refusing to pair them")
        if version.tags.get("flavor", flavor) != flavor:  # e.g. -P model_name=NAME-onnx named the ONNX model
            raise UserError(f"{version.name} v{version.version} is a {version.tags['flavor']} model, not the "
                            f"{flavor} one this promotion needs there; give the PyTorch model's name")
    twins = [version for version, _ in twins]
    if candidate.tags.get(TAG_REGISTRATION) != COMMITTED:  # cards written, but no alias moved
        raise UserError(f"{names.pytorch} v{candidate.version}: no alias ever reached the versions its export "
                        "registered (that export was interrupted, or is still registering); refusing to promote it")
    champion = _by_alias(client, names.pytorch, CHAMPION)
    data = {v.tags.get("dataset_sha256") for v in (candidate, champion) if v is not None}
    decision = decide(accuracy, _accuracy(champion, names.pytorch) if champion else None,
                      champion is not None and str(champion.version) == str(candidate.version), force,
                      "measured on another test set (dataset_sha256 differs)" if len(data) > 1 else "")
    if decision.noop:  # leave the tags that say why it became champion as they are
        return decision, str(candidate.version), None
    outcome = "promoted" if decision.promote else "refused"
    for version in (candidate, *twins):
        client.set_model_version_tag(version.name, str(version.version), "promotion", f"{outcome}: {decision.reason}")
    if not decision.promote:
        return decision, str(candidate.version), None
    replaced = None
    if champion is not None:
        move(client, names, PREVIOUS, champion)
        client.set_model_version_tag(names.pytorch, str(champion.version), "replaced_by", str(candidate.version))
        replaced = str(champion.version)
    move(client, names, CHAMPION, candidate)
    return decision, str(candidate.version), replaced


def registered_by(client: MlflowClient, export_tags: dict) -> list[str]:
    """What an export run registered, 'NAME vN (@alias, ...)', with the aliases as they are now (a reused
    export's `candidate` may have moved on since). INT8: none where it was off or lost too much."""
    found = [export_tags.get(C.TAG_REGISTERED.format(flavor=f), "") for f in ("pytorch", "onnx", "onnx_int8")]
    versions = [client.get_model_version(*value.split("/")) for value in found if "/" in value]
    return [f"{v.name} v{v.version}" + (f" (@{', @'.join(sorted(v.aliases))})" if v.aliases else "") for v in versions]
