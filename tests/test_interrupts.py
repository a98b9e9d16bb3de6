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


def test_a_killed_launcher_takes_torchrun_and_its_ranks_with_it(store, archive, tmp_path):
    """`-e train -P nproc_per_node=2`: torchrun replaces the step's process, and SIGTERM to `mlflow run`
    alone must still stop it and both ranks, the train run ended."""
    from steps import ingest

    ingest.main(["--data", str(archive), "--expected-records", "any"])
    ingest_id = mlflow.search_runs(search_all_experiments=True, output_format="list")[0].info.run_id
    log = tmp_path / "out.log"
    with log.open("w") as out:
        cli = subprocess.Popen(
            [MLFLOW, "run", str(PROJECT_DIR), "-e", "train", "--env-manager", "local",
             "-P", f"ingest_run_id={ingest_id}", "-P", "epochs=500", "-P", "batch_size=4",
             "-P", "nproc_per_node=2", "-P", "device=cpu"],
            env=runs_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + 120
    while "Epoch [1/" not in log.read_text():
        assert cli.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    steps = [p for p in psutil.Process(cli.pid).children(recursive=True) if "steps.train" in " ".join(p.cmdline())]
    assert len(steps) == 3  # torchrun and its two ranks
    cli.send_signal(signal.SIGTERM)
    cli.wait(timeout=60)
    gone, alive = psutil.wait_procs(steps, timeout=60)
    orphans = [p.cmdline() for p in alive]
    for orphan in alive:  # a failing run of this test leaves none behind
        orphan.kill()
    assert orphans == []
    (train,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                  filter_string="tags.`cifar10.step` = 'train'")
    assert train.info.status in ("KILLED", "FAILED")
