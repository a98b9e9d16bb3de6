"""Registration that a crash cannot half-do: the registry client dies at its k-th call, for every k."""

from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from cifar10_cnn import constants as C
from cifar10_cnn import registry
from steps import promote as promote_step

NAMES = registry.Names("m")
MODELS = (NAMES.pytorch, NAMES.onnx, NAMES.int8)


class Died(Exception):
    """What the dying client raises: the process is gone from here on."""


class Dying:
    """An MlflowClient that dies at its `k`-th call: that call and every later one raise (a SIGKILL after
    call k-1). With `k` None it only counts."""

    def __init__(self, k: int | None):
        self.client, self.k, self.calls = MlflowClient(), k, 0

    def __getattr__(self, name):
        method = getattr(self.client, name)

        def call(*args, **kwargs):
            self.calls += 1
            if self.k is not None and self.calls >= self.k:
                raise Died(f"call {self.calls}: {name}")
            return method(*args, **kwargs)

        return call


def publish(client, accuracy: float, int8: bool = True) -> str:
    """One training run's three models (pretend logged models), registered by an export run that ends
    FAILED if the registration dies. Returns the train run's id."""
    with mlflow.start_run() as export_run:
        train_run = "t" + export_run.info.run_id[1:]
        tags = {"train_run_id": train_run, "export_run_id": export_run.info.run_id, "test_accuracy": f"{accuracy}"}
        model = SimpleNamespace(model_uri=export_run.info.artifact_uri, run_id=export_run.info.run_id, model_id=None)

        def entry(flavor):
            return registry.Entry(model, {**tags, "flavor": flavor}, lambda version: f"card of {flavor} v{version}")

        try:
            registry.publish(client, NAMES, entry("pytorch"), entry("onnx"), entry("onnx-int8") if int8 else None)
        except Died:
            mlflow.end_run("FAILED")
    return train_run


def alias_table(client) -> dict:
    return {(name, alias): client.get_model_version_by_alias(name, alias)
            for name in MODELS for alias in registry.ALIASES
            if alias in client.get_registered_model(name).aliases}


def assert_aliases_whole(client, one_run: bool):
    """Every alias on a complete version; with `one_run`, each alias on the set of one training run."""
    table = alias_table(client)
    assert all(registry.complete(v) for v in table.values()), {k: v.tags for k, v in table.items()}
    if not one_run:
        return
    for alias in registry.ALIASES:
        head = table.get((NAMES.pytorch, alias))
        for name, tag in NAMES.twins():
            twin = table.get((name, alias))
            if head is None or tag not in head.tags:
                assert twin is None, (name, alias)
            else:
                assert str(twin.version) == head.tags[tag] and twin.tags["train_run_id"] == head.tags["train_run_id"]


def test_a_registration_killed_after_any_call_leaves_whole_aliases_and_promote_works(store, capsys):
    client = MlflowClient()
    first = publish(client, 0.5)
    promote_step.main(["--model-name", "m"])  # champion: the first run's set
    publish(client, 0.6, int8=False)  # candidate: a set without INT8 (it lost too much)
    promote_step.main(["--model-name", "m"])  # champion moves; the first set becomes previous
    counting = Dying(None)
    publish(counting, 0.7)
    calls = counting.calls
    assert calls >= 12  # three models, created, linked, carded, aliased
    promote_step.main(["--model-name", "m"])
    capsys.readouterr()

    def state():
        return {key: v.version for key, v in alias_table(client).items()}

    def written_by(train_run):
        return [v for name in MODELS
                for v in client.search_model_versions(f"name = '{name}' and tags.train_run_id = '{train_run}'")]

    for k in range(1, calls + 1):
        before = state()
        train_run = publish(Dying(k), 0.8)
        assert_aliases_whole(client, one_run=False)  # at once: no alias on a half-written version
        promote_step.main(["--model-name", "m"])  # repairs, then promotes the candidate if it is better
        assert_aliases_whole(client, one_run=True)
        written = written_by(train_run)
        if client.get_model_version_by_alias("m", "candidate").tags["train_run_id"] == train_run:
            # Killed after the PyTorch alias moved (the commit), before the commit's mark: the set is whole
            # and stays the candidate, and promote took it.
            assert k == calls and not any(registry.TAG_ORPHAN in v.tags for v in written)
            assert client.get_model_version_by_alias("m", "champion").tags["train_run_id"] == train_run
            committed = train_run
            continue
        assert state() == before, k  # rolled back to the set the PyTorch alias names
        for version in written:  # what the killed export wrote is tagged, and no alias points at it
            assert not version.aliases and "export run" in version.tags[registry.TAG_ORPHAN], (k, version.name)
        assert ("repaired an interrupted registration" in capsys.readouterr().out) == bool(written), k
    # The committed set of a FAILED export run is never called an orphan, not even once no alias is left on it.
    for accuracy in (0.9, 0.95):
        publish(client, accuracy)
        promote_step.main(["--model-name", "m"])
    assert all(not v.aliases and registry.TAG_ORPHAN not in v.tags for v in written_by(committed))
    assert client.get_model_version_by_alias(NAMES.pytorch, "previous").tags["train_run_id"] != first


def test_promote_refuses_an_orphan(store, capsys):
    client = MlflowClient()
    train_run = publish(Dying(10), 0.9)
    registry.repair(client, NAMES, locked=True)
    (orphan,) = client.search_model_versions(f"name = 'm' and tags.train_run_id = '{train_run}'")
    with pytest.raises(SystemExit):
        promote_step.main(["--model-name", "m", "--version", str(orphan.version)])
    assert f"m v{orphan.version} was not registered whole (registration interrupted" in capsys.readouterr().err


def test_what_an_export_registered_is_shown_with_its_aliases_as_they_are_now(store, tmp_path):
    client = MlflowClient()
    client.create_registered_model("m")
    client.create_model_version("m", str(tmp_path))
    client.set_registered_model_alias("m", "champion", "1")
    tags = {C.TAG_REGISTERED.format(flavor="pytorch"): "m/1", C.TAG_REGISTERED.format(flavor="onnx"): "m-onnx/3",
            C.TAG_REGISTERED.format(flavor="onnx_int8"): "not registered: drop 2.00 > 1.0 points"}
    assert registry.registered_by(tags) == ["m v1 (@champion)", "m-onnx v3 (deleted)"]
