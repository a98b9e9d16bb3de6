"""The registered models on a local Spark (`local[2]`) through MLflow's spark_udf, as docs/scale-out.md shows."""

import base64
import importlib.util
import shutil
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cifar10_cnn import predict, synthetic
from tests.conftest import PROJECT_DIR
from tests.test_pipeline_steps import png

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="no Java for Spark (.ci/run installs "
                                                             "openjdk-17-jre-headless)"),
    pytest.mark.skipif(importlib.util.find_spec("pyspark") is None, reason="pyspark is not installed"),
]


def example():
    spec = importlib.util.spec_from_file_location("spark_score", PROJECT_DIR / "examples" / "spark_score.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYSPARK_PYTHON", sys.executable)  # the workers: this Python, with the project installed
        session = (SparkSession.builder.master("local[2]").appName("cifar10-cnn tests")
                   .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "2").getOrCreate())
        session.sparkContext.setLogLevel("ERROR")
        yield session
        session.stop()


def test_the_example_scores_a_folder_on_spark_as_predict_does(chain, spark, tmp_path):
    pixels = synthetic.images_for(np.arange(120) % 10, np.random.default_rng(8)).transpose(0, 2, 3, 1).copy()
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / ("sub" if i % 2 else "") / f"img{i:03d}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    uri = "models:/tiny-onnx@candidate"

    assert example().main([uri, str(folder), str(tmp_path / "out"), "--master", "local[2]"]) == 0
    got = pd.read_parquet(tmp_path / "out").set_index("path")
    expected = predict.classify(sorted(folder.rglob("*.*")), mlflow.pyfunc.load_model(uri).predict)
    got = got.loc[[f"file:{r.path}" for r in expected]]
    assert list(got["class"].fillna("")) == [r.label or "" for r in expected]  # the same classes, file by file
    assert np.allclose(got["probability"].dropna(), [r.probability for r in expected if r.label])
    assert list(got["error"].dropna()) == [f"file:{r.error}" for r in expected if r.error]  # named by its path

    # A Parquet table of image files (bytes), one of them missing: the same classes, and that row's error.
    table = pd.DataFrame({"path": ["a", "b", "none"], "image": [png(pixels[0]), png(pixels[1]), None]})
    table.to_parquet(tmp_path / "table.parquet")
    assert example().main([uri, str(tmp_path / "table.parquet"), str(tmp_path / "out2")]) == 0
    got = pd.read_parquet(tmp_path / "out2").set_index("path").loc[["a", "b", "none"]]
    assert list(got["class"][:2]) == list(mlflow.pyfunc.load_model(uri).predict(pixels[:2])["class"])
    assert got["error"].isna().tolist() == [True, True, False] and got["error"]["none"] == "none: no image"


def test_spark_udf_takes_the_image_column_plain_and_as_a_struct_for_both_flavors(chain, spark):
    """Spark's default Arrow batches (10,000 rows) go to the model whole: only a served request is bounded."""
    from pyspark.sql import functions as F

    pixels = synthetic.images_for(np.arange(1100) % 10, np.random.default_rng(9)).transpose(0, 2, 3, 1).copy()
    encoded = [base64.b64encode(png(p)).decode() for p in pixels]
    table = spark.createDataFrame(pd.DataFrame({"image": encoded})).coalesce(1)  # one batch of 1,100 > 1,024
    for name in ("tiny-onnx", "tiny"):
        expected = list(mlflow.pyfunc.load_model(f"models:/{name}@candidate").predict(pixels)["class"])
        classify = mlflow.pyfunc.spark_udf(spark, f"models:/{name}@candidate")
        for column in (F.col("image"), F.struct("image")):
            got = table.select(classify(column).alias("p")).select("p.class").toPandas()["class"]
            assert list(got) == expected, (name, column)



def test_a_search_runs_its_trials_as_spark_tasks(chain, spark):
    """docs/scale-out.md's MlflowSparkStudy example on local[2]: the trials are Spark tasks, each a run
    nested under the study run (MLflow's own Optuna storage), with its held-out curve and no test metric."""
    from mlflow.optuna.storage import MlflowStorage
    from mlflow.pyspark.optuna.study import MlflowSparkStudy

    from cifar10_cnn import search, tracking

    job = {"ingest_run_id": chain["ingest"], "recipe": "seed", "space": "learning_rate=0.0005:0.002:log,epochs=2:3",
           "validation": 50, "device": "cpu"}
    experiment_id = mlflow.create_experiment("search on spark")  # beside the chain's runs, not among them
    study = MlflowSparkStudy("on-spark", MlflowStorage(experiment_id), sampler=search.sampler(42, 2),
                             pruner=search.pruner(), direction="maximize")

    def objective(trial):  # runs on an executor: the data comes from the tracking store, like every step's
        dataset = tracking.dataset_of(job["ingest_run_id"], ("train",))
        return search.run_trial(trial, job, dataset, search.held_out(dataset.train_labels, job), worker=0)

    study.optimize(objective, n_trials=2, n_jobs=2)
    trials = study.trials
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" and 0 <= t.value <= 1 for t in trials)
    client = mlflow.MlflowClient()
    for trial in trials:
        run = client.get_run(trial._trial_id)
        assert run.data.tags["mlflow.parentRunId"] == study._study_id
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == int(trial.params["epochs"])
        assert not any(k.startswith("test") for k in run.data.metrics)
