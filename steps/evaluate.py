"""evaluate: test-set loss, accuracy, per-class accuracy and a confusion matrix for a train run."""

import argparse

from cifar10_cnn import tracking
from cifar10_cnn.pipeline import evaluate as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.evaluate", description=__doc__)
    parser.add_argument("--train-run-id", required=True)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--tta", default="false", help="test-time augmentation: false, flip or crops")
    args = parser.parse_args(argv)
    tracking.run_step("evaluate", step.run, **vars(args))


if __name__ == "__main__":
    main()
