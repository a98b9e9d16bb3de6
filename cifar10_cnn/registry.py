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
from . import tracking

ONNX_VERSION, INT8_VERSION, PYTORCH_VERSION = "onnx_version", "int8_version", "pytorch_version"  # version tags
TAG_ORPHAN = "orphan"  # on a version an interrupted export left behind: why no alias will point at it
TAG_REGISTRATION, COMMITTED = "registration", "committed"  # on a PyTorch version whose set an alias reached
CHAMPION, PREVIOUS = "champion", "previous"
ALIASES = (C.CANDIDATE_ALIAS, CHAMPION, PREVIOUS)
LOCK = "registry"  # tracking.store_lock's name for a registration or promotion
# on the registered PyTorch model, while a promotion moves aliases without the lock (a tracking server):
# '<promote run id> <Unix seconds>'; repair leaves twins' aliases alone meanwhile, other promotions wait
TAG_PROMOTING = "promoting"
PROMOTING_STALE_S = 120.0  # a marker older than this was left by a promotion that died mid-way


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
       that has ended, and no promotion is under way: either may be between its alias moves at this moment.
    2. Every set a PyTorch alias points at is marked committed (TAG_REGISTRATION on its PyTorch version;
       publish marks its own set, and this catches a kill between the commit and the mark).
    3. Versions of an interrupted export, unaliased and in no committed set, tagged TAG_ORPHAN: without
       the lock only those of an export run that ended FAILED or KILLED; versions that no export made
       (no `export_run_id`) are left alone.
    """
    changed = []
    for alias in ALIASES:
        head = by_alias(client, names.pytorch, alias)
        for name, tag in names.twins():
            want = head.tags.get(tag) if head else None
            have = by_alias(client, name, alias)
            if (str(have.version) if have else None) == want or (not locked and have is not None and (
                    export_status(client, have) in ("RUNNING", None) or promoting(client, names) is not None)):
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
            status = export_status(client, version)
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


def export_status(client: MlflowClient, version: ModelVersion) -> str | None:
    """The status of the export run that made `version`; None when unknown (no tag, or the store says nothing)."""
    run_id = version.tags.get("export_run_id")
    if not run_id:
        return None
    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


def by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` names; None when the model or the alias does not exist (other errors raise: a store
    that cannot answer must not look like an alias to remove)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _drop_alias(client: MlflowClient, name: str, alias: str) -> None:
    if by_alias(client, name, alias) is not None:
        client.delete_registered_model_alias(name, alias)


def version_of_uri(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    """The registered version a `models:/NAME/VERSION` (or `@ALIAS`, `/latest`) URI names; None for other URIs."""
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    uri = model_uri.strip()
    if not uri.startswith("models:/"):
        return None
    found = get_model_name_and_version(client, uri)  # (model id,) for models:/<id>: not a registered version
    return client.get_model_version(*found) if len(found) == 2 else None


def registered_by(export_tags: dict) -> list[str]:
    """What an export run registered, 'NAME vN (@alias, ...)', with the aliases as they are now (a reused
    export's `candidate` may have moved on since; a version deleted since says so)."""
    def shown(version) -> str:
        if version is None:
            return " (deleted)"
        return f" (@{', @'.join(sorted(version.aliases))})" if version.aliases else ""

    return [f"{name} v{number}{shown(v)}" for name, number, v in tracking.registered_versions(export_tags)]


def promoting(client: MlflowClient, names: Names) -> str | None:
    """The run id of the promotion under way on `names` (TAG_PROMOTING, fresh), or None."""
    import time

    marker = client.get_registered_model(names.pytorch).tags.get(TAG_PROMOTING, "")
    run_id, _, since = marker.partition(" ")
    try:
        return run_id if time.time() - float(since) < PROMOTING_STALE_S else None
    except ValueError:
        return None
