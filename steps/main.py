"""main: run ingest -> train -> evaluate -> export as nested MLflow runs under this (parent) run."""

import argparse

from cifar10_cnn import recipes, tracking
from cifar10_cnn.pipeline import main as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.main", description=__doc__)
    parser.add_argument("--recipe", default="seed", help=f"one of {', '.join(recipes.RECIPES)}")
    for name in recipes.FIELDS:  # every hyperparameter; 'auto' takes the recipe's value
        parser.add_argument(f"--{name.replace('_', '-')}", default=recipes.AUTO)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--nproc-per-node", default="1", help="training processes (torchrun, DDP)")
    parser.add_argument("--tta", default="auto", help="test-time augmentation: false, flip, crops or auto")
    parser.add_argument("--data", default="auto", help="auto, a URL, a .tar.gz archive or an extracted folder")
    parser.add_argument("--expected-records", default="50000,10000", help="TRAIN,TEST record counts, or 'any'")
    parser.add_argument("--model-name", default="cifar10-cnn", help="registered name; ONNX gets '-onnx'")
    parser.add_argument("--resume-run-id", default="none", help="a killed train run to continue")
    parser.add_argument("--int8", default="true", help="also quantize to INT8 (registered if <= 1 point lost)")
    parser.add_argument("--reuse", default="true", help="reuse FINISHED step runs with the same parameters, "
                        "code (git commit) and data")
    args = parser.parse_args(argv)
    tracking.run_step("main", step.run, **vars(args))


if __name__ == "__main__":
    main()
