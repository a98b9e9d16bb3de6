"""ingest: find or fetch CIFAR-10, validate it, log it as this run's dataset. Needs no torch."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.http_dataset_source import HTTPDatasetSource

from .. import constants as C
from .. import data as datalib
from .. import params, plots, tracking
from .common import cache_dir, say


def run(data: str, expected_records: str) -> None:
    expected = params.expected_records(expected_records)
    source = datalib.resolve_source(data, cache_dir())
    say("ingest", f"reading {source.path}")
    dataset = datalib.read(source, expected)
    digest = dataset.digest()
    with tempfile.TemporaryDirectory() as tmp:
        datalib.save(dataset, Path(tmp) / C.DATASET_DIR, digest)
        mlflow.log_artifacts(str(Path(tmp) / C.DATASET_DIR), C.DATASET_DIR)
    for split, context in (("train", "training"), ("test", "testing")):
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        # Our own digest: MLflow's default hashes only the first 10,000 values.
        ds = mlflow.data.from_numpy(images, targets=labels, source=dataset_source(source.origin),
                                    name=f"cifar10-{split}", digest=digest[:32])
        tracking.log_input(ds, context, {"sha256": digest, "records": str(len(labels))})
    sizes = dataset.sizes()
    mlflow.set_tags({"cifar10.source": source.origin, "cifar10.sha256": digest,
                     C.TAG_SOURCE_SHA256: datalib.source_digest(source)})
    mlflow.log_metrics({"train_records": sizes["train"], "test_records": sizes["test"]})
    counts = {"classes": list(dataset.class_names), "train": dataset.class_counts("train"),
              "test": dataset.class_counts("test")}
    mlflow.log_dict(counts, "class_counts.json")
    mlflow.log_figure(plots.sample_grid(dataset.train_images, dataset.train_labels, dataset.class_names),
                      "samples.png")
    say("ingest", f"{sizes['train']:,} train / {sizes['test']:,} test images, sha256 {digest[:16]}…")


def dataset_source(origin: str):
    if origin.startswith(("http://", "https://")):
        return HTTPDatasetSource(origin)
    with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about itself
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return resolve_dataset_source(Path(origin).as_uri())
