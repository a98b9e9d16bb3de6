"""Promotion: champion moves only to a version at least as good, both flavors together, with a record."""

import pytest
from mlflow import MlflowClient

from cifar10_cnn import promotion, registry
from cifar10_cnn.errors import UserError
from steps import promote as promote_step


def register_pair(client, tmp_path, accuracy, run="r", tags_ok=True, data="d"):
    """A PyTorch and an ONNX version of one (pretend) training run, tagged as the export step does."""
    for name in ("m", "m-onnx"):
        try:
            client.get_registered_model(name)
        except Exception:
            client.create_registered_model(name)
    tags = {"train_run_id": run * 32, "dataset_sha256": data}
    if tags_ok:
        tags["test_accuracy"] = f"{accuracy:.4f}"
    onnx_v = client.create_model_version("m-onnx", str(tmp_path), tags={**tags, "flavor": "onnx"}, description="card")
    pt = client.create_model_version("m", str(tmp_path), tags={
        **tags, "flavor": "pytorch", "onnx_version": str(onnx_v.version),
        registry.TAG_REGISTRATION: registry.COMMITTED}, description="card")
    return str(pt.version), str(onnx_v.version)


def aliases(client):
    return {n: dict(client.get_registered_model(n).aliases) for n in ("m", "m-onnx")}


def test_decide():
    assert promotion.decide(0.6, None, False, False).promote
    assert promotion.decide(0.6, 0.6, False, False).promote  # at least as good
    assert not promotion.decide(0.59, 0.6, False, False).promote
    forced = promotion.decide(0.59, 0.6, False, True)
    assert forced.promote and forced.reason.startswith("forced")
    assert promotion.decide(0.7, 0.6, True, False).noop  # already champion
    other = promotion.decide(0.7, 0.6, False, False, "measured on another test set")
    assert not other.promote and "do not compare" in other.reason
    assert promotion.decide(0.7, 0.6, False, True, "measured on another test set").reason.startswith("forced")


def test_first_then_better_then_worse_then_forced_then_rollback(store, tmp_path, capsys):
    client = MlflowClient()
    v1 = register_pair(client, tmp_path, 0.60, run="a")
    v2 = register_pair(client, tmp_path, 0.62, run="b")
    v3 = register_pair(client, tmp_path, 0.55, run="c")

    promote_step.main(["--version", v1[0], "--model-name", "m"])
    assert aliases(client) == {"m": {"champion": int(v1[0])}, "m-onnx": {"champion": int(v1[1])}}
    promote_step.main(["--version", v1[0], "--model-name", "m"])  # again: a no-op that keeps the record
    assert "is already the champion; nothing changed" in capsys.readouterr().out
    assert client.get_model_version("m", v1[0]).tags["promotion"].startswith("promoted: no champion yet")

    promote_step.main(["--version", v2[0], "--model-name", "m"])
    assert aliases(client) == {"m": {"champion": int(v2[0]), "previous": int(v1[0])},
                               "m-onnx": {"champion": int(v2[1]), "previous": int(v1[1])}}
    assert client.get_model_version("m", v2[0]).tags["promotion"].startswith("promoted: test accuracy 0.6200 >=")
    assert "roll back with `mlflow run . -e promote -P version=previous -P force=true`" in capsys.readouterr().out

    before = aliases(client)
    with pytest.raises(SystemExit) as exit_:
        promote_step.main(["--version", v3[0], "--model-name", "m"])
    assert exit_.value.code == 2
    assert "not promoting m v3: test accuracy 0.5500 < champion's 0.6200; aliases unchanged" in capsys.readouterr().err
    assert aliases(client) == before
    assert client.get_model_version("m-onnx", v3[1]).tags["promotion"].startswith("refused")

    promote_step.main(["--version", "previous", "--model-name", "m", "--force", "true"])  # rollback
    assert aliases(client)["m"] == {"champion": int(v1[0]), "previous": int(v2[0])}
    assert client.get_model_version("m", v1[0]).tags["promotion"].startswith("promoted: forced: test accuracy 0.6000 <")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--version", "99"], "registered model 'm' has no version '99'"),
        (["--version", "nobody"], "registered model 'm' has no version 'nobody'"),
        (["--version", "1", "--force", "maybe"], "force must be true or false, got 'maybe'"),
        (["--version", "-1"], "version must be a version number or an alias"),
    ],
)
def test_bad_promotions_change_nothing(store, tmp_path, capsys, argv, message):
    client = MlflowClient()
    v1 = register_pair(client, tmp_path, 0.60)
    promote_step.main(["--version", v1[0], "--model-name", "m"])
    before = aliases(client)
    with pytest.raises(SystemExit):
        promote_step.main([*argv, "--model-name", "m"])
    assert message in capsys.readouterr().err
    assert aliases(client) == before


def test_a_version_without_metrics_cannot_be_promoted(store, tmp_path, capsys):
    client = MlflowClient()
    v1 = register_pair(client, tmp_path, 0.6, tags_ok=False)
    with pytest.raises(SystemExit):
        promote_step.main(["--version", v1[0], "--model-name", "m"])
    assert "m v1 has no test_accuracy tag" in capsys.readouterr().err
    assert aliases(client) == {"m": {}, "m-onnx": {}}


def test_unpaired_flavors_are_refused(store, tmp_path):
    client = MlflowClient()
    v1 = register_pair(client, tmp_path, 0.6, run="a")
    client.set_model_version_tag("m-onnx", v1[1], "train_run_id", "x" * 32)
    with pytest.raises(UserError, match="was not trained by the same run"):
        promotion.promote(client, registry.Names("m"), v1[0])
    assert aliases(client) == {"m": {}, "m-onnx": {}}


def test_what_promote_refuses_to_pair_or_compare(store, tmp_path):
    client, names = MlflowClient(), registry.Names("m")
    champion = register_pair(client, tmp_path, 0.6, run="a")
    promotion.promote(client, names, champion[0])
    other_data = register_pair(client, tmp_path, 0.7, run="b", data="another archive")
    decision, _, _ = promotion.promote(client, names, other_data[0])  # a higher figure, on other test images
    assert not decision.promote and "scored on other data" in decision.reason
    wrong_flavor = register_pair(client, tmp_path, 0.7, run="c")
    client.set_model_version_tag("m-onnx", wrong_flavor[1], "flavor", "pytorch")  # a PyTorch model in the ONNX slot
    with pytest.raises(UserError, match="is a pytorch model, not the onnx one"):
        promotion.promote(client, names, wrong_flavor[0])
    interrupted = register_pair(client, tmp_path, 0.7, run="d")  # its export was killed before any alias
    client.delete_model_version_tag("m", interrupted[0], registry.TAG_REGISTRATION)
    killed = client.create_run("0").info.run_id  # on a server, a SIGKILLed export stays RUNNING
    client.set_model_version_tag("m", interrupted[0], "export_run_id", killed)
    with pytest.raises(UserError, match="no alias ever reached"):
        promotion.promote(client, names, interrupted[0])
    client.set_terminated(killed, "FINISHED")  # registered by an export that ended, before the tag existed
    assert promotion.promote(client, names, interrupted[0])[0].promote
    assert aliases(client)["m"] == {"champion": int(interrupted[0]), "previous": int(champion[0])}


def test_without_a_lock_promotions_take_turns_and_repair_waits_for_one(store, tmp_path):
    """On a tracking server (no lock): a promotion marks the registered model while it moves aliases, so a
    second one is refused and an export's repair does not move a twin's alias back meanwhile."""
    client, names = MlflowClient(), registry.Names("m")
    first, second = register_pair(client, tmp_path, 0.6, run="a"), register_pair(client, tmp_path, 0.7, run="b")
    promotion.promote(client, names, first[0])
    export = client.create_run("0").info.run_id  # the second set's export ended long ago
    client.set_terminated(export, "FINISHED")
    client.set_model_version_tag("m-onnx", second[1], "export_run_id", export)
    with promotion.one_at_a_time(client, names, "a" * 32, settle_s=0):
        with pytest.raises(UserError, match=f"promote run {'a' * 32} is promoting m right now"):
            with promotion.one_at_a_time(client, names, "b" * 32, settle_s=0):
                pass
        client.set_registered_model_alias("m-onnx", "champion", second[1])  # mid-way: the twin moved first
        assert registry.repair(client, names, locked=False) == []  # left to the promotion under way
    assert registry.promoting(client, names) is None  # the marker is gone with it
    assert registry.repair(client, names, locked=False) == [f"m-onnx@champion -> {first[1]}"]  # a dead one's: undone
