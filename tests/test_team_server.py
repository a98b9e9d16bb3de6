"""The whole recipe against a team tracking server: `mlflow server` on PostgreSQL with served artifacts.

Runs when CIFAR10_TEST_TRACKING_SERVER names such a server (`.ci/run` starts PostgreSQL and the server
for it, then stops both); skipped with the reason otherwise.
"""

import os
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import MLFLOW, PROJECT_DIR, runs_env

SERVER = os.environ.get("CIFAR10_TEST_TRACKING_SERVER")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SERVER, reason="CIFAR10_TEST_TRACKING_SERVER is not set "
                                                   "(.ci/run sets it after starting PostgreSQL and mlflow server)")]


def test_recipe_nested_runs_registration_and_promotion_on_postgresql(archive, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", SERVER)
    monkeypatch.setenv("CIFAR10_DATA_DIR", str(tmp_path / "data"))
    mlflow.set_tracking_uri(SERVER)
    experiment = f"team-{os.getpid()}-{tmp_path.name}"
    name = f"team-{os.getpid()}"
    env = {**runs_env(), "MLFLOW_TRACKING_URI": SERVER}
    done = subprocess.run([MLFLOW, "run", str(PROJECT_DIR), "--env-manager", "local", "--experiment-name", experiment,
                           "-P", f"data={archive}", "-P", "expected_records=any", "-P", "epochs=1",
                           "-P", f"model_name={name}"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    exp = mlflow.get_experiment_by_name(experiment)
    # the server is the UI: its address, on this experiment's runs table (not MLflow 3's GenAI overview)
    assert f"open {SERVER.rstrip('/')}/#/experiments/{exp.experiment_id}?workflowType=machine_learning" in done.stdout

    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main"]
    children = {r.data.tags["mlflow.project.entryPoint"]: r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"ingest", "train", "evaluate", "export"}
    assert all(r.info.status == "FINISHED" for r in runs)
    # Artifacts went through the server's artifact store and come back through it.
    ckpt = mlflow.artifacts.download_artifacts(run_id=children["train"].info.run_id,
                                               artifact_path="checkpoint/model.pt", dst_path=str(tmp_path / "dl"))
    assert Path(ckpt).stat().st_size > 100_000
    assert children["train"].info.artifact_uri.startswith("mlflow-artifacts:")

    client = MlflowClient()
    for registered in (name, f"{name}-onnx"):
        (version,) = client.search_model_versions(f"name = '{registered}'")
        assert version.tags["train_run_id"] == children["train"].info.run_id
        assert client.get_model_version_by_alias(registered, "candidate").version == version.version
    table = mlflow.pyfunc.load_model(f"models:/{name}-onnx@candidate").predict(np.zeros((2, 32, 32, 3), np.uint8))
    assert len(table) == 2

    promoted = subprocess.run([MLFLOW, "run", str(PROJECT_DIR), "--env-manager", "local", "-e", "promote",
                               "--experiment-name", experiment, "-P", f"model_name={name}"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert promoted.returncode == 0, promoted.stderr[-3000:]
    assert "this tracking store offers no lock" in promoted.stdout
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    assert client.get_model_version_by_alias(f"{name}-onnx", "champion").version == "1"
