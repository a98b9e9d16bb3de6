"""Resume after a kill, and two runs logging the same dataset at once. (Two whole recipes at once on one
store, and step reuse: test_end_to_end.py.)"""

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
from cifar10_cnn import heartbeat, tracking
from steps import ingest, train
from tests.conftest import PROJECT_DIR, isolate, runs_env

pytestmark = pytest.mark.slow

TRAIN = ["--epochs", "5", "--batch-size", "2", "--seed", "5", "--device", "cpu"]  # ~0.5 s an epoch


def train_process(*argv: str, log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", "steps.train", *argv], cwd=PROJECT_DIR, env=runs_env(),
                                stdout=out, stderr=subprocess.STDOUT)


def train_runs() -> list:  # oldest first
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`cifar10.step` = 'train'", order_by=["attributes.start_time ASC"])


def weights(run_id: str) -> dict:
    with tracking.artifact(run_id, C.CHECKPOINT_PATH) as path:
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
        train.main(["--ingest-run-id", ingest_id, *TRAIN])  # in this process: a train run is one either way
        yield ingest_id, train_runs()[-1].info.run_id
        mlflow.set_tracking_uri(previous)


def test_killed_training_resumes_to_the_same_result(trained_once, tmp_path, capsys):
    """SIGKILL, which nothing can catch, and the newest checkpoint cut short by it: the resume falls back to
    the epoch before and still ends with the uninterrupted run's losses and weights. (SIGTERM and Ctrl-C
    end the run KILLED: test_interrupts.py; both leave the same per-epoch checkpoints behind.)"""
    ingest_id, reference_id = trained_once
    log = tmp_path / "killed.log"
    victim = train_process("--ingest-run-id", ingest_id, *TRAIN, log=log)
    deadline = time.monotonic() + 120
    while "Epoch [3/5]" not in log.read_text():
        assert victim.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    killed = train_runs()[-1]
    assert killed.info.run_id != reference_id
    assert killed.info.status == "RUNNING"  # SIGKILL cannot be caught
    tagged = int(MlflowClient().get_run(killed.info.run_id).data.tags[C.TAG_LAST_CHECKPOINT])
    assert 2 <= tagged < 5  # epoch 3's line was printed; its checkpoint may or may not have been logged
    # The kill can land between a checkpoint's upload and its tag, so the newest file is what counts.
    saved = max(int(Path(f.path).stem.split("_")[1])
                for f in MlflowClient().list_artifacts(killed.info.run_id, C.EPOCH_CHECKPOINT_DIR))
    assert tagged <= saved <= tagged + 1
    name = f"{C.EPOCH_CHECKPOINT_DIR}/{C.EPOCH_CHECKPOINT.format(epoch=saved)}"
    newest = Path(urllib.parse.urlparse(killed.info.artifact_uri).path) / name  # the file in the store itself
    newest.write_bytes(newest.read_bytes()[:1000])  # as if the kill had cut its upload short

    # Other parameters than the killed run's are refused, and the run stays resumable.
    with pytest.raises(SystemExit) as exit_:
        train.main(["--ingest-run-id", ingest_id, "--resume-run-id", killed.info.run_id, "--epochs", "9"])
    assert exit_.value.code == 2
    assert f"resume_run_id {killed.info.run_id} was trained with epochs=5, not epochs=9" in capsys.readouterr().err
    resumed = train_process("--ingest-run-id", ingest_id, "--resume-run-id", killed.info.run_id,
                            log=tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-2000:]
    resumed_run = train_runs()[-1]
    assert resumed_run.info.status == "FINISHED"
    assert resumed_run.data.tags["cifar10.resumed_from"].startswith(killed.info.run_id)
    resumed_log = (tmp_path / "resumed.log").read_text()
    assert "resuming train run" in resumed_log
    assert f"skipping unusable checkpoint {name}" in resumed_log
    assert f"after epoch {saved - 1}" in resumed_run.data.tags["cifar10.resumed_from"]
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
    # a run still training (in another terminal, on another machine): beating, so never taken from it
    client = MlflowClient()
    live = client.create_run(client.get_run(finished).info.experiment_id, tags={
        C.TAG_STEP: "train", C.TAG_SHA256: client.get_run(finished).data.tags[C.TAG_SHA256],
        C.TAG_PROCESS: heartbeat.this_process(), C.TAG_HEARTBEAT: f"{time.time():.0f}"}).info.run_id
    client.log_param(live, "recipe", "seed")
    for other, message in ((["--recipe", "fast"], f"resume_run_id {live} trained recipe seed, not fast; give -P "
                                                  "recipe=seed"),
                           ([], f"resume_run_id {live} is still training")):
        with pytest.raises(SystemExit):
            train.main(["--ingest-run-id", ingest_id, "--resume-run-id", live, *other])
        assert message in capsys.readouterr().err
    assert client.get_run(live).info.status == "RUNNING"  # left alone


# --- two runs logging one dataset at once ----------------------------------------------------------------


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
