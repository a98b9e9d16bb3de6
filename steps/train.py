"""train: train a network on the ingest run's data; log metrics, checkpoints and the PyTorch model.

With --nproc-per-node N > 1 the step re-starts itself under torchrun (one process per shard,
DistributedDataParallel); rank 0 logs to the MLflow run, the other ranks never open one.
"""

import argparse
import os
import sys

from cifar10_cnn import recipes, tracking, training
from cifar10_cnn.pipeline import train as step


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m steps.train", description=__doc__)
    parser.add_argument("--ingest-run-id", required=True)
    parser.add_argument("--recipe", default="seed", help=f"one of {', '.join(recipes.RECIPES)}")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--resume-run-id", default="none", help="a killed train run to continue")
    parser.add_argument("--nproc-per-node", default="1", help="training processes on this machine (torchrun)")
    for name in recipes.FIELDS:  # every hyperparameter; 'auto' takes the recipe's value
        parser.add_argument(f"--{name.replace('_', '-')}", default=recipes.AUTO)
    args = parser.parse_args(argv)
    nproc = args.nproc_per_node.strip()
    if nproc.isdigit() and int(nproc) > 1 and "LOCAL_RANK" not in os.environ:  # not yet under torchrun
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={int(nproc)}", "-m", "steps.train", *argv])
    rank, _ = training.init_distributed(args.device)
    try:
        if rank == 0:
            tracking.run_step("train", step.run, system_metrics=True, **vars(args))
        else:
            step.run_worker(**vars(args))
    finally:
        # A gloo group still alive when the interpreter exits can abort the process ("terminate called
        # without an active exception", SIGABRT; seen in CI on rank 1 while rank 0 was still logging).
        training.leave_distributed()


if __name__ == "__main__":
    main()
