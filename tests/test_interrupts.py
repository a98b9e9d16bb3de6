"""Ctrl-C, or SIGTERM to `mlflow run` alone, mid-training: every run ends, no step process lives on,
nothing is registered."""

import os
import signal
import subprocess
import time

import mlflow
import psutil
import pytest

from tests.conftest import MLFLOW, PROJECT_DIR, runs_env

pytestmark = pytest.mark.slow



@pytest.mark.parametrize("how", ["ctrl-c to the process group", "SIGTERM to mlflow run only"])
def test_interrupted_recipe_leaves_no_running_run_and_no_orphan(store, archive, tmp_path, how):
    log = tmp_path / "out.log"
    with log.open("w") as out:
        cli = subprocess.Popen(
            [MLFLOW, "run", str(PROJECT_DIR), "--env-manager", "local", "-P", "epochs=500", "-P", "batch_size=4",
             "-P", f"data={archive}", "-P", "expected_records=any"],
            env=runs_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "Epoch [1/" not in log.read_text():
        assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    steps = psutil.Process(cli.pid).children(recursive=True)
    assert any("steps.train" in " ".join(p.cmdline()) for p in steps)
    if how.startswith("ctrl-c"):
        os.killpg(cli.pid, signal.SIGINT)
    else:
        cli.send_signal(signal.SIGTERM)
    assert cli.wait(timeout=60) != 0
    gone, alive = psutil.wait_procs(steps, timeout=60)
    assert alive == [], [p.cmdline() for p in alive]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    status = {r.data.tags.get("mlflow.project.entryPoint"): r.info.status for r in runs}
    assert status["ingest"] == "FINISHED"
    assert status["main"] in ("KILLED", "FAILED") and status["train"] in ("KILLED", "FAILED"), status
    assert "evaluate" not in status and "export" not in status
    assert mlflow.MlflowClient().search_registered_models() == []
    assert "interrupted; its run is ended" in log.read_text()
