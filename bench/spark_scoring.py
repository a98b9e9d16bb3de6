"""Scoring the test images of a CIFAR-10 archive as PNG files with a registered model, three ways, one after
the other on this machine:

- the predict command's way (`mlflow run . -e predict -P images=FOLDER`, without its run bookkeeping): files
  read and decoded in this process, the pyfunc called in batches;
- `mlflow.pyfunc.spark_udf(spark, uri)("image")` over a Spark DataFrame of the PNGs as base64 text;
- examples/spark_score.py on the folder (binaryFile source, each file checked, Parquet written).

    python -m bench.spark_scoring --data PATH --model models:/cifar10-cnn-onnx@candidate [--master local[2]]

Prints images/s and the accuracy of each beside the registered version's test_accuracy tag (the same
images, so the same figure is expected). The Spark session's start is timed apart. Asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a CIFAR-10 archive (its 10,000 test images are scored)")
    parser.add_argument("--model", default="models:/cifar10-cnn-onnx@candidate")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--images", type=int, default=None, help="only the first N test images")
    args = parser.parse_args(argv)

    import mlflow
    from PIL import Image

    from cifar10_cnn import data, hardware, predict, registry, sources

    dataset = data.read(sources.cifar10_at(Path(args.data)), expected=None, splits=("test",))
    pixels, labels = data.nhwc(dataset.test_images), dataset.test_labels
    if args.images:
        pixels, labels = pixels[: args.images], labels[: args.images]
    truth = [dataset.class_names[i] for i in labels]
    version = registry.version_of_uri(mlflow.MlflowClient(), args.model)
    tag = float(version.tags["test_accuracy"]) if version and "test_accuracy" in version.tags else None
    print(f"{len(pixels):,} test images of {args.data} as PNG files; {args.model}"
          + (f" ({version.name} v{version.version}, test_accuracy tag {tag:.4f})" if version else ""))
    print(f"CPU: {hardware.describe(hardware.cpu_capabilities())}, {os.cpu_count()} cores; Spark master {args.master}")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        encoded = []
        for i, image in enumerate(pixels):
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, "PNG")
            (folder / f"{i:05d}.png").write_bytes(buffer.getvalue())
            encoded.append(base64.b64encode(buffer.getvalue()).decode())

        model = predict.load_model(args.model)  # the predict step's way, its download deleted once loaded
        start = time.perf_counter()
        results = predict.classify(sorted(folder.iterdir()), model.predict)
        seconds = time.perf_counter() - start
        rows.append(("predict command's way (one process)", seconds, [r.label for r in results]))

        import pandas as pd
        from pyspark.sql import SparkSession

        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        start = time.perf_counter()
        spark = (SparkSession.builder.master(args.master).appName("bench spark_scoring")
                 .config("spark.ui.enabled", "false").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
        table = spark.createDataFrame(pd.DataFrame({"n": np.arange(len(encoded)), "image": encoded})).cache()
        table.count()
        print(f"Spark session and the DataFrame of PNGs: {time.perf_counter() - start:.1f} s (not counted below)")

        start = time.perf_counter()
        classify = mlflow.pyfunc.spark_udf(spark, args.model)  # result type: the model's output schema
        got = table.select("n", classify("image").alias("p")).select("n", "p.class").toPandas().sort_values("n")
        seconds = time.perf_counter() - start
        rows.append(('spark_udf(spark, uri)("image")', seconds, list(got["class"])))

        spec = importlib.util.spec_from_file_location("spark_score", Path(__file__).parents[1] / "examples"
                                                      / "spark_score.py")
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        start = time.perf_counter()
        example.score(spark, args.model, str(folder), str(Path(tmp) / "out"))
        seconds = time.perf_counter() - start
        scored = spark.read.parquet(str(Path(tmp) / "out")).select("path", "class").toPandas()
        by_file = dict(zip(scored["path"].str.rsplit("/", n=1).str[-1], scored["class"], strict=True))
        rows.append(("examples/spark_score.py on the folder", seconds, [by_file[f"{i:05d}.png"]
                                                                      for i in range(len(pixels))]))
        spark.stop()

    print("\n| way | seconds | images/s | accuracy | same classes as the predict way |\n|---|---|---|---|---|")
    for name, seconds, classes in rows:
        accuracy = sum(c == t for c, t in zip(classes, truth, strict=True)) / len(truth)
        same = sum(a == b for a, b in zip(classes, rows[0][2], strict=True))
        print(f"| {name} | {seconds:.1f} | {len(truth) / seconds:,.0f} | {accuracy:.4f} | {same:,} of {len(truth):,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
