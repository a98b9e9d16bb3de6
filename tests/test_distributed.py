"""Data-parallel training: torchrun + DistributedDataParallel, gloo on the CPU."""

import os
import subprocess
import sys

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow import MlflowClient

from cifar10_cnn import distributed, models, recipes, training
from steps import ingest
from tests.conftest import PROJECT_DIR, free_port, runs_env
from tests.test_training import data

# SGD: a rounding difference in a gradient stays that small in the weights (Adam divides a near-zero gradient
# by its own size, so rounding there can move a weight by a whole step).
CONFIG = recipes.TrainConfig(epochs=2, batch_size=32, optimizer="sgd", learning_rate=0.02, seed=7)


def _rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, labels = data(n=320)
        net = models.build(CONFIG.model, seed=CONFIG.seed)
        history = training.train(net, images, labels, CONFIG, torch.device("cpu"))
        if rank == 0:
            torch.save({"state_dict": net.state_dict(), "losses": [h.loss for h in history]}, out)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as steps/train.py's workers do: no interpreter teardown for gloo's threads to abort


def test_two_gloo_processes_reach_the_weights_of_one_with_the_same_global_batch(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_rank, args=(2, free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    images, labels = data(n=320)
    single = models.build(CONFIG.model, seed=CONFIG.seed)
    history = training.train(single, images, labels, CONFIG, torch.device("cpu"))
    # Each process averages its 16 images, DDP averages the two: the same mean over 32, summed in another
    # order, so equal up to float rounding.
    assert ddp["losses"] == pytest.approx([h.loss for h in history], rel=1e-5)
    for name, weight in single.state_dict().items():
        assert torch.allclose(ddp["state_dict"][name], weight, atol=1e-5), name


def test_train_step_under_torchrun_logs_from_rank_zero_only(store, archive):
    ingest.main(["--data", str(archive), "--expected-records", "any"])
    ingest_id = mlflow.search_runs(search_all_experiments=True, output_format="list")[0].info.run_id
    args = [sys.executable, "-m", "steps.train", "--ingest-run-id", ingest_id, "--nproc-per-node", "2",
            "--epochs", "2", "--batch-size", "20", "--device", "cpu"]
    done = subprocess.run(args, cwd=PROJECT_DIR, env=runs_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`cifar10.step` = 'train'")
    assert len(runs) == 1  # rank 1 opened no run
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2" and run.data.params["per_process_batch"] == "10"
    assert [m.step for m in MlflowClient().get_metric_history(run.info.run_id, "train_loss")] == [1, 2]
    assert "2 processes (gloo), global batch 20 = 2 x 10" in done.stdout

    bad = subprocess.run(args[:-4] + ["--batch-size", "33", "--device", "cpu"], cwd=PROJECT_DIR, env=runs_env(),
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "batch_size 33 is the global batch and must be a multiple of nproc_per_node (2)" in bad.stderr
    newest = max(mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="tags.`cifar10.step` = 'train'"), key=lambda r: r.info.start_time)
    assert newest.info.status == "FAILED"


def test_more_processes_than_gpus_is_refused_before_torchrun_starts(monkeypatch, capsys):
    from steps import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(os, "execv", lambda *args: pytest.fail("torchrun started"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit) as exit_:
        train.main(["--ingest-run-id", "0" * 32, "--nproc-per-node", "2"])
    assert exit_.value.code == 2
    assert "nproc_per_node 2 needs a GPU each and this machine has 1" in capsys.readouterr().err
    launched = []
    monkeypatch.setattr(os, "execv", lambda *args: launched.append(args))
    monkeypatch.setenv("OMP_NUM_THREADS", "7")  # the user's own: kept (and restored after this test)
    distributed.relaunch_under_torchrun("steps.train", [], "2", "cpu")  # on the CPU, any number of processes
    assert launched and "--nproc-per-node=2" in launched[0][1] and os.environ["OMP_NUM_THREADS"] == "7"
