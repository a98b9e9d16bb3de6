"""CIFAR-10 image classification as an MLflow Project: ingest -> train -> evaluate -> export."""

__version__ = "0.1.0"
