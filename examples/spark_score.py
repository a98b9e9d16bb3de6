"""Score image files on Spark with a registered model, through MLflow's `spark_udf`.

    python examples/spark_score.py models:/cifar10-cnn-onnx@champion photos/ predictions/
    spark-submit --master yarn examples/spark_score.py models:/cifar10-cnn-onnx@champion s3://bucket/photos out/

INPUT is a folder of image files (read recursively with Spark's binaryFile source) or a Parquet table
(a path ending in .parquet) with a `path` column and an `image` column of encoded image files (bytes,
or base64 text). OUTPUT, a new Parquet folder, gets one row per image: path, class, class_index,
probability, probabilities and error, as `mlflow run . -e predict` writes them: an image that cannot be
read gets its error and no class, and the others are still scored. The executors need this project
installed (`pip install .`, for `cifar10_cnn.serving`, which checks each file as the model decodes it)
and the model's requirements (mlflow, onnxruntime or torch, pillow).
"""

from __future__ import annotations

import argparse
import os
import sys

import pandas as pd


def blank_png() -> str:
    """A 32x32 black PNG, base64: scored in place of an unreadable image, whose prediction is dropped."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unreadable(paths: pd.Series, encoded: pd.Series) -> pd.Series:
    """Why each encoded image cannot be scored (None where it can), named by its path: the model's own
    decoding (cifar10_cnn.serving, which the registered model carries a copy of)."""
    from cifar10_cnn import serving

    def why(path: str, item) -> str | None:
        if item is None or (isinstance(item, float) and pd.isna(item)):  # a null cell (Arrow: NaN)
            return f"{path}: no image"
        try:
            serving.decode_one(item, path)
        except serving.InvalidImages as exc:
            return str(exc)
        return None

    return pd.Series([why(p, e) for p, e in zip(paths, encoded, strict=True)], dtype=object)


def score(spark, model_uri: str, source: str, dest: str) -> None:
    import mlflow
    from pyspark.sql import functions as F

    if source.rstrip("/").endswith(".parquet"):
        table = spark.read.parquet(source)
    else:  # a folder of image files: Spark packs ~32 small files a partition; a task per partition is too many
        files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(source)
        target = 2 * spark.sparkContext.defaultParallelism
        files = files.coalesce(target) if files.rdd.getNumPartitions() > target else files
        table = files.select("path", F.col("content").alias("image"))
    if missing := {"path", "image"} - set(table.columns):
        raise SystemExit(f"error: {source}: a Parquet table of images needs the columns path and image; "
                         f"missing {sorted(missing)}")
    if dict(table.dtypes)["image"] == "binary":
        table = table.withColumn("image", F.base64("image"))  # what the model takes: base64 text
    check = F.pandas_udf(unreadable, "string")
    classify = mlflow.pyfunc.spark_udf(spark, model_uri, env_manager="local")  # result type: the model's output
    # One pass: an unreadable image is swapped for a blank one before the model sees it (the model refuses
    # a batch holding one bad image), and its prediction is dropped again.
    checked = table.withColumn("error", check("path", "image"))
    readable = F.col("error").isNull()
    scored = checked.withColumn("prediction", classify(F.when(readable, F.col("image")).otherwise(F.lit(blank_png()))))
    scored.select("path", *(F.when(readable, F.col(f"prediction.{c}")).alias(c)
                            for c in ("class", "class_index", "probability", "probabilities")), "error") \
        .write.parquet(dest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri", help="e.g. models:/cifar10-cnn-onnx@champion")
    parser.add_argument("input", help="a folder of image files, or a Parquet table (*.parquet) with path and "
                        "image columns")
    parser.add_argument("output", help="a Parquet folder to create")
    parser.add_argument("--master", default=None, help="Spark master (default: spark-submit's, else local[*])")
    args = parser.parse_args(argv)
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName("cifar10-cnn scoring")
    # spark-submit starts this script with PYSPARK_GATEWAY_PORT set and its own --master in force; else local.
    master = args.master or (None if "PYSPARK_GATEWAY_PORT" in os.environ else "local[*]")
    if master:
        builder = builder.master(master)
    if master and master.startswith("local"):  # the workers run this Python, with its packages
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = builder.getOrCreate()
    score(spark, args.model_uri, args.input, args.output)
    rows = spark.read.parquet(args.output)
    print(f"scored {rows.where('error IS NULL').count():,} image(s), {rows.where('error IS NOT NULL').count():,} "
          f"error(s): {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
