"""Resume after a kill, step reuse, and two users at once on one store. Slow: real processes."""

import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from cifar10_cnn import constants as C
from steps import ingest, train
from tests.conftest import PROJECT_DIR, isolate, runs_env

pytestmark = pytest.mark.slow

MLFLOW = str(Path(sys.executable).parent / "mlflow")
TRAIN = ["--epochs", "8", "--batch-size", "2", "--seed", "5", "--device", "cpu"]  # ~0.5 s an epoch


def train_process(*argv: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "steps.train", *argv], cwd=PROJECT_DIR, env=runs_env(),
                                stdout=out, stderr=subprocess.STDOUT)


def train_runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`cifar10.step` = 'train'", order_by=["attributes.start_time ASC"])


def weights(run_id: str) -> dict:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=C.CHECKPOINT_PATH)
    return torch.load(path, weights_only=True)["state_dict"]


def losses(run_id: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, "train_loss"), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, archive):
    """A store with an ingest run and one uninterrupted train run: the reference every resume must match."""
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as mp:
        previous = mlflow.get_tracking_uri()
        isolate(root, mp)
        ingest.main(["--data", str(archive), "--expected-records", "any"])
        ingest_id = mlflow.search_runs(search_all_experiments=True, output_format="list")[0].info.run_id
        reference = train_process("--ingest-run-id", ingest_id, *TRAIN, log=root / "reference.log")
        assert reference.wait(timeout=300) == 0, (root / "reference.log").read_text()[-2000:]
        yield ingest_id, train_runs()[-1].info.run_id
        mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_resumes_to_the_same_result(trained_once, tmp_path, capsys, sig):
    ingest_id, reference_id = trained_once
    log = tmp_path / "killed.log"
    victim = train_process("--ingest-run-id", ingest_id, *TRAIN, log=log)
    deadline = time.monotonic() + 120
    while "Epoch [3/8]" not in log.read_text():
        assert victim.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    victim.send_signal(sig)
    victim.wait(timeout=60)
    killed = train_runs()[-1]
    assert killed.info.run_id != reference_id
    assert killed.info.status == ("RUNNING" if sig == signal.SIGKILL else "KILLED")  # SIGKILL cannot be caught
    tagged = int(MlflowClient().get_run(killed.info.run_id).data.tags[C.TAG_LAST_CHECKPOINT])
    assert 2 <= tagged < 8  # epoch 3's line was printed; its checkpoint may or may not have been logged
    # The kill can land between a checkpoint's upload and its tag, so the newest file is what counts.
    saved = max(int(Path(f.path).stem.split("_")[1])
                for f in MlflowClient().list_artifacts(killed.info.run_id, C.EPOCH_CHECKPOINT_DIR))
    assert tagged <= saved <= tagged + 1

    if sig == signal.SIGKILL:  # and the newest checkpoint was cut short: resume falls back to the one before
        name = f"{C.EPOCH_CHECKPOINT_DIR}/{C.EPOCH_CHECKPOINT.format(epoch=saved)}"
        newest = Path(urllib.parse.urlparse(killed.info.artifact_uri).path) / name  # the file in the store itself
        newest.write_bytes(newest.read_bytes()[:1000])
    if sig == signal.SIGTERM:  # other parameters than the killed run's: refused, the run stays resumable
        with pytest.raises(SystemExit) as exit_:
            train.main(["--ingest-run-id", ingest_id, "--resume-run-id", killed.info.run_id, "--epochs", "9"])
        assert exit_.value.code == 2
        assert f"resume_run_id {killed.info.run_id} was trained with epochs=8, not epochs=9" in capsys.readouterr().err
    resumed = train_process("--ingest-run-id", ingest_id, "--resume-run-id", killed.info.run_id,
                            log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    resumed_run = max(train_runs(), key=lambda r: r.info.start_time)
    assert resumed_run.info.status == "FINISHED"
    assert resumed_run.data.tags["cifar10.resumed_from"].startswith(killed.info.run_id)
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert "resuming train run" in resumed_log
    if sig == signal.SIGKILL:
        assert f"skipping unusable checkpoint {C.EPOCH_CHECKPOINT_DIR}/{C.EPOCH_CHECKPOINT.format(epoch=saved)}" \
            in resumed_log and f"after epoch {saved - 1}" in resumed_run.data.tags["cifar10.resumed_from"]
    assert MlflowClient().get_run(killed.info.run_id).info.status == "KILLED"  # ended, never left RUNNING
    # The same losses epoch by epoch and the same weights as the run that was never interrupted.
    assert losses(resumed_run.info.run_id) == losses(reference_id)
    ours, theirs = weights(resumed_run.info.run_id), weights(reference_id)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_refuses_a_finished_run(trained_once, capsys):
    ingest_id, finished = trained_once
    with pytest.raises(SystemExit) as exit_:
        train.main(["--ingest-run-id", ingest_id, "--resume-run-id", finished])
    assert exit_.value.code == 2
    assert f"resume_run_id {finished} FINISHED already; nothing to resume" in capsys.readouterr().err


# --- two users, one store ------------------------------------------------------------------------------


def recipe(*params: str, cwd: Path, log: Path) -> subprocess.Popen:
    args = [MLFLOW, "run", str(cwd), "--env-manager", "local"]
    for p in params:
        args += ["-P", p]
    with log.open("w") as out:
        return subprocess.Popen(args, env=runs_env(), stdout=out, stderr=subprocess.STDOUT)


def test_two_recipes_and_two_promotions_at_once_on_one_sqlite_store(store, archive, tmp_path):
    common = [f"data={archive}", "expected_records=any", "epochs=1", "model_name=shared", "int8=false"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    first, second = (recipe(*common, f"seed={seed}", cwd=PROJECT_DIR, log=log) for seed, log in zip((1, 2), logs,
                                                                                                     strict=True))
    assert first.wait(timeout=600) == 0, logs[0].read_text()[-3000:]
    assert second.wait(timeout=600) == 0, logs[1].read_text()[-3000:]
    assert not any("database is locked" in log.read_text() for log in logs)
    client = MlflowClient()
    for name in ("shared", "shared-onnx"):
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        assert len({v.tags["train_run_id"] for v in versions}) == 2  # one each, nothing shared or lost

    promotions = [subprocess.Popen([MLFLOW, "run", str(PROJECT_DIR), "--env-manager", "local", "-e", "promote",
                                    "-P", "model_name=shared", "-P", f"version={v}"], env=runs_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for v in (1, 2)]
    results = [p.wait(timeout=300) for p in promotions]
    assert 0 in results  # whoever came first promoted; the other promoted too or was refused by the gate
    champion = client.get_model_version_by_alias("shared", "champion")
    onnx_champion = client.get_model_version_by_alias("shared-onnx", "champion")
    assert champion.tags["train_run_id"] == onnx_champion.tags["train_run_id"]  # the flavors never mix
    if results == [0, 0]:  # both promoted, one after the other: the loser of the race is now @previous
        previous = client.get_model_version_by_alias("shared", "previous")
        assert {str(champion.version), str(previous.version)} == {"1", "2"}


# --- step reuse ----------------------------------------------------------------------------------------


@pytest.fixture
def clean_checkout(tmp_path) -> Path:
    """This project's files as one git commit: a known code version, whatever the working tree holds."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_DIR,
                           capture_output=True, text=True, check=True).stdout.split()
    copy = tmp_path / "project"
    for name in files:
        if (PROJECT_DIR / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_DIR / name, copy / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(copy)]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + cmd, check=True)
    return copy


def parent_runs() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["attributes.start_time ASC"],
                              filter_string="tags.`mlflow.project.entryPoint` = 'main'")


def test_ingest_survives_another_run_logging_the_same_dataset_at_the_same_moment(store, archive, monkeypatch):
    """What two recipes started together hit: MLflow checks for the dataset row, then inserts it, and the
    slower run failed on the unique constraint. Here the first insert of each split loses that race."""
    real, lost = mlflow.log_input, []

    def racing(dataset, context=None, tags=None):
        if dataset.name not in lost:
            lost.append(dataset.name)
            real(dataset, context=context, tags=tags)  # the other run's row is now in the store ...
            raise mlflow.exceptions.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                                    "datasets.experiment_id, datasets.name, datasets.digest")
        return real(dataset, context=context, tags=tags)  # ... and logging again just links to it

    monkeypatch.setattr(mlflow, "log_input", racing)
    ingest.main(["--data", str(archive), "--expected-records", "any"])
    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.info.status == "FINISHED" and lost == ["cifar10-train", "cifar10-test"]
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["cifar10-test", "cifar10-train"]


def test_ingest_does_not_retry_other_store_errors(store, archive, monkeypatch):
    def broken(dataset, context=None, tags=None):
        broken.calls += 1
        raise mlflow.exceptions.MlflowException("disk I/O error")

    broken.calls = 0
    monkeypatch.setattr(mlflow, "log_input", broken)
    with pytest.raises(mlflow.exceptions.MlflowException, match="disk I/O error"):
        ingest.main(["--data", str(archive), "--expected-records", "any"])
    assert broken.calls == 1
    assert mlflow.search_runs(search_all_experiments=True, output_format="list")[0].info.status == "FAILED"


def test_main_reuses_identical_steps_and_reruns_what_changed(store, archive, clean_checkout, tmp_path):
    common = {"data": archive, "expected_records": "any", "epochs": 1, "model_name": "reuse", "int8": "false"}

    def run(*extra):
        log = tmp_path / f"run{len(parent_runs())}.log"
        given = {**common, **dict(e.split("=") for e in extra)}
        done = recipe(*(f"{k}={v}" for k, v in given.items()), cwd=clean_checkout, log=log)
        assert done.wait(timeout=600) == 0, log.read_text()[-3000:]
        return parent_runs()[-1], log.read_text()

    first, _ = run()
    assert first.data.tags[C.TAG_REUSED] == "none"
    second, out = run()
    assert second.data.tags[C.TAG_REUSED] == "ingest,train,evaluate,export"
    for step in ("ingest", "train", "evaluate", "export"):
        assert second.data.tags[f"cifar10.{step}_run_id"] == first.data.tags[f"cifar10.{step}_run_id"]
        assert f"step {step}: reusing FINISHED run {first.data.tags[f'cifar10.{step}_run_id']}" in out
    assert second.data.metrics["test_accuracy"] == first.data.metrics["test_accuracy"]
    assert len(MlflowClient().search_model_versions("name = 'reuse'")) == 1  # nothing registered twice
    third, _ = run("epochs=2")  # train changed: ingest is reused, everything after it runs again
    assert third.data.tags[C.TAG_REUSED] == "ingest"
    assert third.data.tags["cifar10.train_run_id"] != first.data.tags["cifar10.train_run_id"]
    assert third.data.tags["cifar10.evaluate_run_id"] != first.data.tags["cifar10.evaluate_run_id"]
    assert len(MlflowClient().search_model_versions("name = 'reuse'")) == 2
