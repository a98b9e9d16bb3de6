"""promote: point `champion` at a registered version (both flavors) if it is at least as good."""

import argparse

from cifar10_cnn import tracking
from cifar10_cnn.pipeline import promote as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.promote", description=__doc__)
    parser.add_argument("--version", default="candidate", help="a version number or an alias (candidate, previous)")
    parser.add_argument("--model-name", default="cifar10-cnn", help="registered name; ONNX is '<name>-onnx'")
    parser.add_argument("--force", default="false", help="promote even if the test accuracy is lower")
    args = parser.parse_args(argv)
    tracking.run_step("promote", step.run, **vars(args))


if __name__ == "__main__":
    main()
