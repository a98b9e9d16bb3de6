"""ingest: obtain CIFAR-10 (binary layout), validate it, log it as this run's dataset artifact."""

import argparse

from cifar10_cnn import tracking
from cifar10_cnn.pipeline import ingest as step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m steps.ingest", description=__doc__)
    parser.add_argument("--data", default="auto", help="auto, a URL, a .tar.gz archive or an extracted folder")
    parser.add_argument("--expected-records", default="50000,10000", help="TRAIN,TEST record counts, or 'any'")
    args = parser.parse_args(argv)
    tracking.run_step("ingest", step.run, data=args.data, expected_records=args.expected_records)


if __name__ == "__main__":
    main()
