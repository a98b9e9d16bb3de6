"""main: run ingest -> train -> evaluate -> export as nested MLflow runs under this (parent) run."""

import argparse

from cifar10_cnn import tracking
from cifar10_cnn.pipeline import main as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.main", description=__doc__)
    parser.add_argument("--epochs", default="5")
    parser.add_argument("--batch-size", default="32")
    parser.add_argument("--learning-rate", default="0.001")
    parser.add_argument("--seed", default="42")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--data", default="auto", help="auto, a URL, a .tar.gz archive or an extracted folder")
    parser.add_argument("--expected-records", default="50000,10000", help="TRAIN,TEST record counts, or 'any'")
    parser.add_argument("--model-name", default="cifar10-cnn", help="registered name; ONNX gets '-onnx'")
    args = parser.parse_args(argv)
    tracking.run_step("main", step.run, **vars(args))


if __name__ == "__main__":
    main()
