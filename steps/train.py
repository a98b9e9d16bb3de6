"""train: train a network on the ingest run's data; log metrics, a checkpoint and the PyTorch model."""

import argparse

from cifar10_cnn import tracking
from cifar10_cnn.pipeline import train as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.train", description=__doc__)
    parser.add_argument("--ingest-run-id", required=True)
    parser.add_argument("--epochs", default="5")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--learning-rate", default="0.001")
    parser.add_argument("--seed", default="42")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    args = parser.parse_args(argv)
    tracking.run_step("train", step.run, system_metrics=True, **vars(args))


if __name__ == "__main__":
    main()
