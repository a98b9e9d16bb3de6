"""Against a team tracking server: `mlflow server` on PostgreSQL with served artifacts, as several users or
machines share it.

Runs when CIFAR10_TEST_TRACKING_SERVER names such a server (`.ci/run` starts PostgreSQL and the server
for it, then stops both); skipped with the reason otherwise.
"""

import os
import subprocess
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from cifar10_cnn import registry
from steps import promote as promote_step
from tests.conftest import MLFLOW, PROJECT_DIR, runs_env

SERVER = os.environ.get("CIFAR10_TEST_TRACKING_SERVER")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SERVER, reason="CIFAR10_TEST_TRACKING_SERVER is not set "
                                                   "(.ci/run sets it after starting PostgreSQL and mlflow server)")]


def test_two_tune_processes_on_one_study_then_the_winner_registered_and_promoted(archive, tmp_path, monkeypatch):
    """As on two machines: a second `-e tune` with the same study name, started once the study exists on the
    server, joins it. N trials in all, none run twice; only the study's owner trains its winner, through the
    nested steps, the server's artifact store and registry; then `-e promote` without a lock."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    mlflow.set_tracking_uri(SERVER)
    experiment, study, name = (f"{kind}-{os.getpid()}-{tmp_path.name}" for kind in ("tune", "study", "tuned"))
    temp = tmp_path / "tmp"  # the processes' temporary folder: what they download from the server is deleted
    temp.mkdir()
    env = {**runs_env(), "MLFLOW_TRACKING_URI": SERVER, "CIFAR10_DATA_DIR": str(tmp_path / "data"), "TMPDIR": str(temp)}
    args = [MLFLOW, "run", str(PROJECT_DIR), "-e", "tune", "--env-manager", "local", "--experiment-name", experiment,
            *(a for p in (f"data={archive}", "expected_records=any", "recipe=seed", "trials=4", "budget_minutes=8",
                          "space=learning_rate=0.0005:0.002:log,epochs=4:5",
                          "validation=50", f"study={study}", f"model_name={name}") for a in ("-P", p))]
    logs = [tmp_path / "owner.log", tmp_path / "worker.log"]
    with logs[0].open("w") as out:
        owner = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (exp := mlflow.get_experiment_by_name(experiment)) or not mlflow.search_runs(
            [exp.experiment_id], f"tags.`mlflow.runName` = '{study}'", output_format="list"):
        assert owner.poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
        time.sleep(1)
    with logs[1].open("w") as out:
        worker = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    for process, log in zip((owner, worker), logs, strict=True):
        assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
    assert "(worker)" in logs[1].read_text() and "(owner)" in logs[0].read_text()
    left = [p.relative_to(temp) for p in temp.rglob("*") if p.suffix in (".npy", ".pt", ".pt2", ".onnx")]
    assert not left, f"downloads left in the temporary folder: {left[:5]}"
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    (study_run,) = [r for r in runs if r.info.run_name == study]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == study_run.info.run_id]
    assert sorted(int(t.data.tags["numbers"]) for t in trials) == list(range(4))  # four in all, none twice
    assert "[tune] trial" in logs[1].read_text()  # the joined process ran trials of its own
    client = MlflowClient()
    owner_run = study_run.data.tags["mlflow.parentRunId"]  # the tune run that made the study trains the winner
    steps = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs
             if r.data.tags.get("mlflow.parentRunId") == owner_run and "mlflow.project.entryPoint" in r.data.tags}
    assert {"train", "evaluate", "export"} <= set(steps) and all(r.info.status == "FINISHED" for r in steps.values())
    # Artifacts went through the server's artifact store and come back through it.
    assert steps["train"].info.artifact_uri.startswith("mlflow-artifacts:")
    ckpt = mlflow.artifacts.download_artifacts(run_id=steps["train"].info.run_id, artifact_path="checkpoint/model.pt",
                                               dst_path=str(tmp_path / "dl"))
    assert Path(ckpt).stat().st_size > 50_000
    for registered in (name, f"{name}-onnx"):  # one winner
        (version,) = client.search_model_versions(f"name = '{registered}'")
        assert version.tags["study"] == study and version.tags["train_run_id"] == steps["train"].info.run_id
        assert client.get_model_version_by_alias(registered, "candidate").version == version.version
    table = mlflow.pyfunc.load_model(f"models:/{name}-onnx@candidate", dst_path=str(tmp_path)).predict(
        np.zeros((2, 32, 32, 3), np.uint8))
    assert len(table) == 2

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    promote_step.main(["--model-name", name])  # in this process: the step's own run, against the server
    assert registry.promoting(client, registry.Names(name)) is None  # no lock here: its marker, now removed
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(f"{name}-onnx", "champion").version == "1"
