"""`python -m cifar10_cnn predict --model URI FILE_OR_FOLDER ...` and `python -m cifar10_cnn payload FILE ...`."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar10_cnn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    predict = commands.add_parser("predict", help="classify image files (any size and mode; resized to 32x32 RGB)")
    predict.add_argument("--model", required=True,
                         help="a model URI, e.g. models:/cifar10-cnn-onnx@champion or runs:/<id>/onnx_model")
    predict.add_argument("--csv", default="predictions.csv", help="where folder results go (default %(default)s)")
    predict.add_argument("inputs", nargs="+", help="image files and folders")
    body = commands.add_parser("payload", help="print the JSON request body for POST /invocations")
    body.add_argument("inputs", nargs="+", help="image files")
    args = parser.parse_args(argv)
    from . import predict as command

    if args.command == "predict":
        return command.run(args.model, args.inputs, args.csv)
    return command.payload(args.inputs)


if __name__ == "__main__":
    sys.exit(main())
