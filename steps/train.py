"""train: train a network on the ingest run's data; log metrics, checkpoints and the PyTorch model."""

import argparse

from cifar10_cnn import recipes, tracking
from cifar10_cnn.pipeline import train as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.train", description=__doc__)
    parser.add_argument("--ingest-run-id", required=True)
    parser.add_argument("--recipe", default="seed", help=f"one of {', '.join(recipes.RECIPES)}")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--resume-run-id", default="none", help="a killed train run to continue")
    for name in recipes.FIELDS:  # every hyperparameter; 'auto' takes the recipe's value
        parser.add_argument(f"--{name.replace('_', '-')}", default=recipes.AUTO)
    args = parser.parse_args(argv)
    tracking.run_step("train", step.run, system_metrics=True, **vars(args))


if __name__ == "__main__":
    main()
