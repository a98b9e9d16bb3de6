"""export: ONNX export with parity checks, then register the PyTorch and ONNX flavors (alias candidate)."""

import argparse

from cifar10_cnn import tracking
from cifar10_cnn.pipeline import export as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.export", description=__doc__)
    parser.add_argument("--train-run-id", required=True)
    parser.add_argument("--evaluate-run-id", required=True)
    parser.add_argument("--model-name", default="cifar10-cnn", help="registered name; ONNX gets '-onnx'")
    parser.add_argument("--int8", default="true", help="also quantize to INT8 (registered if <= 1 point lost)")
    args = parser.parse_args(argv)
    tracking.run_step("export", step.run, **vars(args))


if __name__ == "__main__":
    main()
