"""The four steps of the pipeline, each called as its script is, and what each leaves in the tracking store.
The `chain` (conftest.py) runs them once per test process; these tests read what it made."""

import base64
import io
import json
import os
import subprocess
import sys
from dataclasses import replace

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from cifar10_cnn import checkpoints, cores, hardware, models, recipes, synthetic, tracking
from cifar10_cnn import constants as C
from steps import evaluate, export, train
from tests.conftest import fails, step_runs


def test_ingest_logs_dataset_counts_and_samples(chain):
    run = mlflow.get_run(chain["ingest"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train_records"] == 200 and run.data.metrics["test_records"] == 100
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"cifar10-train", "cifar10-test"}
    sha = run.data.tags["cifar10.sha256"]
    assert inputs["cifar10-train"].dataset.digest == sha[:32]
    assert {t.key: t.value for t in inputs["cifar10-test"].tags}["sha256"] == sha
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"samples.png", "class_counts.json", C.DATASET_DIR} <= names
    counts = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/class_counts.json")
    assert counts["train"] == [20] * 10 and counts["classes"] == list(C.CLASS_NAMES)


def test_train_logs_curves_and_checkpoint(chain):
    run = mlflow.get_run(chain["train"])
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["num_parameters"] == "62006" and p["train_device"] == "cpu" and p["epochs"] == "2"
    history = MlflowClient().get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2] and history[1].value < history[0].value
    assert len(MlflowClient().get_metric_history(run.info.run_id, "train_accuracy")) == 2
    assert run.data.metrics["peak_rss_mib"] > 50
    assert "training_curves.png" in {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    with tracking.artifact(run.info.run_id, C.CHECKPOINT_PATH) as path:
        ckpt = torch.load(path, weights_only=True)
    assert ckpt["model"] == "simple_cnn" and ckpt["config"]["epochs"] == 2


def test_evaluate_logs_test_metrics_and_confusion_matrix(chain):
    run = mlflow.get_run(chain["evaluate"])
    m = run.data.metrics
    assert 0 <= m["test_accuracy"] <= 1 and m["test_loss"] > 0
    assert {f"test_accuracy_{n}" for n in C.CLASS_NAMES} <= set(m)
    assert m["test_accuracy"] > 0.5  # the synthetic classes are easy; chance is 0.1
    ev = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/evaluation.json")
    assert np.array(ev["confusion"]).sum() == 100
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "per_class_accuracy.png", "confident_mistakes.png", C.TEST_LOGITS_PATH} <= names


def test_export_checks_its_models_against_the_logits_evaluate_logged(chain, tmp_path, capsys, monkeypatch):
    """Evaluate logs the checkpoint's logits of every test image, and export checks both its models against
    them instead of computing them again; unless evaluate ran on a GPU (other kernels) or logged none."""
    from cifar10_cnn.data import nhwc
    from cifar10_cnn.errors import CheckFailed
    from cifar10_cnn.export import outputs, parity, torch_predictor

    model = models.RawPixelClassifier(checkpoints.trained(chain["train"])[1]).eval()
    images = nhwc(tracking.dataset_of(chain["ingest"], ("test",)).test_images)
    own = outputs(torch_predictor(model), images)
    with tracking.artifact(chain["evaluate"], C.TEST_LOGITS_PATH) as path:
        logged = np.load(path)
    assert logged.shape == (100, 10) and parity(own, logged).max_abs_diff < 1e-5

    def evaluate_run(device: str, logits: np.ndarray | bytes | None) -> str:
        """A FINISHED evaluate run of the chain's train run, with `logits` (or a file of these bytes) as its
        test logits."""
        client = MlflowClient()
        run_id = client.create_run("0", tags={C.TAG_STEP: "evaluate"}).info.run_id
        for key, value in {"train_run_id": chain["train"], "eval_device": device}.items():
            client.log_param(run_id, key, value)
        client.log_metric(run_id, "test_accuracy", 0.5)
        if isinstance(logits, bytes):
            (tmp_path / C.TEST_LOGITS_PATH).write_bytes(logits)
        elif logits is not None:
            np.save(tmp_path / C.TEST_LOGITS_PATH, logits)
        if logits is not None:
            client.log_artifact(run_id, str(tmp_path / C.TEST_LOGITS_PATH))
        client.set_terminated(run_id, "FINISHED")
        return run_id

    wrong = own + 0.5  # the same predicted classes, every logit off by 0.5
    assert np.array_equal(export.checkpoint_logits(mlflow.get_run(evaluate_run("cpu", wrong)), model, images), wrong)
    for device, logits in (("cuda", wrong), ("cpu", None)):  # a GPU's logits, an older run without them
        ran = export.checkpoint_logits(mlflow.get_run(evaluate_run(device, logits)), model, images)
        assert np.array_equal(ran, own), device
    with pytest.raises(CheckFailed, match="test_logits.npy is not a readable array"):
        export.checkpoint_logits(mlflow.get_run(evaluate_run("cpu", b"\x93NUMPY truncated")), model, images)
    export_args = ["--train-run-id", chain["train"], "--model-name", "tiny-wrong", "--int8", "false"]
    # in an experiment of their own: what the failed exports logged stays out of the chain's
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", MlflowClient().create_experiment("wrong-logits"))
    fails(export, [*export_args, "--evaluate-run-id", evaluate_run("cpu", wrong)], capsys,
          "ONNX model disagrees with the checkpoint: max |logit diff| 5.00e-01")
    fails(export, [*export_args, "--evaluate-run-id", evaluate_run("cpu", wrong[:7])], capsys,
          "test_logits.npy holds float32 (7, 10), not float32 (100, 10); nothing was registered")
    assert MlflowClient().search_registered_models("name LIKE 'tiny-wrong%'") == []


def test_export_logs_the_pytorch_flavor_as_a_program_with_our_loader(chain):
    export_run = mlflow.get_run(chain["export"])
    model = mlflow.pytorch.load_model(export_run.data.tags[C.TAG_PYTORCH_MODEL_URI])
    images = synthetic.images_for(np.arange(5) % 10, np.random.default_rng(0)).transpose(0, 2, 3, 1).copy()
    assert model(torch.from_numpy(images)).shape == (5, 10)
    info = mlflow.models.get_model_info(export_run.data.tags[C.TAG_PYTORCH_MODEL_URI])
    # No input schema for the pyfunc (MLflow would truncate floats before our checks), the table it answers
    # as output schema (spark_udf's result type); the network's own signature is kept in the metadata,
    # and our loader answers pyfunc calls.
    assert info.signature.inputs is None and info.flavors["python_function"]["loader_module"] == "cifar10_serving"
    assert info.signature.outputs.input_names() == ["class", "class_index", "probability", "probabilities"]
    spec = json.loads(info.metadata["network_signature"]["inputs"])[0]["tensor-spec"]
    assert spec["dtype"] == "uint8" and list(spec["shape"]) == [-1, 32, 32, 3]

    # train leaves the checkpoint; export logs every flavor, this one included
    logged = mlflow.search_logged_models(experiment_ids=[export_run.info.experiment_id], output_format="list")
    assert {m.source_run_id for m in logged} == {chain["export"]} and len(logged) >= 2


def test_export_registers_both_flavors_matched_and_aliased(chain):
    client = MlflowClient()
    run = mlflow.get_run(chain["export"])
    assert run.data.metrics["onnx_argmax_mismatches"] == 0
    assert run.data.metrics["onnx_max_abs_diff"] < C.ONNX_MAX_ABS_DIFF
    pt = client.get_model_version_by_alias("tiny", C.CANDIDATE_ALIAS)
    onnx_v = client.get_model_version_by_alias("tiny-onnx", C.CANDIDATE_ALIAS)
    for v in (pt, onnx_v):
        assert v.tags["train_run_id"] == chain["train"] and v.tags["evaluate_run_id"] == chain["evaluate"]
        accuracy = mlflow.get_run(chain["evaluate"]).data.metrics["test_accuracy"]
        assert float(v.tags["test_accuracy"]) == pytest.approx(accuracy, abs=1e-4)
    for v, name in ((pt, "tiny"), (onnx_v, "tiny-onnx")):  # the model card
        card = client.get_model_version(name, str(v.version)).description
        assert f"models:/{name}/{v.version}" in card and "62,006 parameters" in card
        assert f"Test accuracy {100 * float(v.tags['test_accuracy']):.2f} %" in card and "ONNX parity" in card
    assert onnx_v.tags["pytorch_version"] == str(pt.version) and pt.tags["onnx_version"] == str(onnx_v.version)
    # The registered ONNX model takes raw uint8 pixels and agrees with the registered PyTorch model.
    images = synthetic.images_for(np.arange(7) % 10, np.random.default_rng(1)).transpose(0, 2, 3, 1).copy()
    torch_out = mlflow.pytorch.load_model(f"models:/tiny@{C.CANDIDATE_ALIAS}")(torch.from_numpy(images)).detach()
    expected = torch.softmax(torch_out, 1).numpy()
    for name in ("tiny-onnx", "tiny"):  # both pyfuncs: names and probabilities, the same answers
        table = mlflow.pyfunc.load_model(f"models:/{name}@{C.CANDIDATE_ALIAS}").predict(images)
        assert list(table.columns) == ["class", "class_index", "probability", "probabilities"]
        assert np.abs(np.array(table["probabilities"].tolist()) - expected).max() < C.ONNX_MAX_ABS_DIFF
        assert table["class_index"].tolist() == expected.argmax(1).tolist()
        assert table["class"].tolist() == [C.CLASS_NAMES[i] for i in expected.argmax(1)]
        assert np.allclose(table["probability"], expected.max(1), atol=1e-5)
    assert run.data.tags[C.TAG_REGISTERED.format(flavor="onnx")] == f"tiny-onnx/{onnx_v.version}"
    assert run.data.tags[C.TAG_REGISTERED.format(flavor="pytorch")] == f"tiny/{pt.version}"


def test_an_int8_model_that_loses_more_than_a_point_is_not_registered(chain):
    from steps import export as export_step

    client = MlflowClient()
    logged = client.get_run(chain["export"]).data.tags[C.TAG_ONNX_MODEL_URI]
    with mlflow.start_run() as run:
        assert export_step.int8_to_register((mlflow.models.get_model_info(logged), {"quantized": {"drop_points": 1.5}}),
                                            "tiny-onnx-lossy", None, "0.5") is None
    tag = client.get_run(run.info.run_id).data.tags["cifar10.registered.onnx_int8"]
    assert tag == "not registered: drop 1.50 > 1.0 points"
    int8 = client.get_model_version_by_alias("tiny-onnx-int8", C.CANDIDATE_ALIAS)  # the chain's own INT8 model
    assert float(int8.tags["int8_accuracy_drop_points"]) <= C.INT8_MAX_DROP_POINTS
    export_run = client.get_run(chain["export"])
    assert {"int8_test_accuracy", "int8_accuracy_drop_points", "int8_speedup_batch1"} <= set(export_run.data.metrics)


def test_every_registered_version_describes_its_own_model(chain):
    """The INT8 version's accuracy tag and card are the INT8 model's, not the float model's it came from."""
    client = MlflowClient()
    metrics = client.get_run(chain["export"]).data.metrics
    evaluated = client.get_run(chain["evaluate"]).data.metrics["test_accuracy"]
    versions = {name: client.get_model_version_by_alias(name, C.CANDIDATE_ALIAS)
                for name in ("tiny", "tiny-onnx", "tiny-onnx-int8")}
    own = {"tiny": evaluated, "tiny-onnx": metrics["onnx_test_accuracy"],  # equal: no prediction differs
           "tiny-onnx-int8": metrics["int8_test_accuracy"]}
    for name, version in versions.items():
        assert float(version.tags["test_accuracy"]) == pytest.approx(own[name], abs=1e-4), name
        card = client.get_model_version(name, version.version).description
        assert f"models:/{name}/{version.version}" in card
        assert f"Test accuracy {100 * own[name]:.2f} %" in card, name
    int8 = versions["tiny-onnx-int8"]
    assert float(int8.tags["float_test_accuracy"]) == pytest.approx(evaluated, abs=1e-4)
    card = client.get_model_version("tiny-onnx-int8", int8.version).description
    assert "onnx-int8 flavor" in card and f"float model's {100 * metrics['onnx_test_accuracy']:.2f} %" in card
    assert "measured with ONNX Runtime on cpu " in card  # the CPU it was measured on


def test_the_fast_recipe_goes_through_train_evaluate_export(chain, tmp_path, monkeypatch):
    """The fast recipe's network, optimizer and hardware decisions through the same steps as the default's
    (every other network's forward pass, parameter count and ONNX parity: test_models.py, test_export.py).
    Evaluate and export run as beside each other in main, each on one thread, and each takes the whole
    machine once the other has freed its share (cores.py)."""
    model, count = "airnet", 569_656
    train.main(["--ingest-run-id", chain["ingest"], "--recipe", "fast", "--epochs", "1", "--batch-size", "50",
                "--device", "cpu"])
    train_run = step_runs("train")[-1]
    assert train_run.info.status == "FINISHED"
    config = mlflow.artifacts.load_dict(f"runs:/{train_run.info.run_id}/config.json")  # the recipe, resolved
    assert config["model"] == model and config["optimizer"] == "muon"
    assert train_run.data.params["num_parameters"] == str(count)
    decided, why = hardware.decide(replace(recipes.RECIPES["fast"], model=model),
                                   hardware.capabilities(torch.device("cpu")))
    assert train_run.data.params["precision_used"] == decided.precision
    assert train_run.data.params["channels_last_used"] == str(decided.channels_last)
    assert train_run.data.tags[C.TAG_HARDWARE] == hardware.describe(hardware.capabilities(torch.device("cpu")))
    assert train_run.data.tags[C.TAG_DECISION + "precision"] == why["precision"]
    freed, threads = tmp_path / "cores", torch.get_num_threads()
    freed.mkdir()
    monkeypatch.setenv(cores.FOLDER, str(freed))
    try:
        torch.set_num_threads(1)
        (freed / "export").touch()
        evaluate.main(["--train-run-id", train_run.info.run_id, "--device", "cpu"])  # tta auto: the recipe's crops
        assert torch.get_num_threads() == cores.machine()
        eval_run = step_runs("evaluate")[-1]
        assert {"test_accuracy", "test_accuracy_tta"} <= set(eval_run.data.metrics)
        name = f"each-{model}"
        torch.set_num_threads(1)
        (freed / "export").unlink()
        (freed / "evaluate").touch()
        export.main(["--train-run-id", train_run.info.run_id, "--evaluate-run-id", eval_run.info.run_id,
                     "--model-name", name])
        assert torch.get_num_threads() == cores.machine()
    finally:
        torch.set_num_threads(threads)
    export_run = step_runs("export")[-1]
    assert export_run.info.status == "FINISHED"
    assert export_run.data.metrics["onnx_argmax_mismatches"] == 0
    assert export_run.data.metrics["onnx_max_abs_diff"] <= C.ONNX_MAX_ABS_DIFF * max(
        1.0, export_run.data.metrics["onnx_max_abs_logit"])
    client = MlflowClient()
    assert C.TAG_REGISTERED.format(flavor="onnx_int8") in export_run.data.tags  # registered, or why not
    for registered in (name, f"{name}-onnx"):
        version = client.get_model_version_by_alias(registered, C.CANDIDATE_ALIAS)
        assert version.tags["model"] == model and version.tags["train_run_id"] == train_run.info.run_id
    images = synthetic.images_for(np.arange(3) % 10, np.random.default_rng(6)).transpose(0, 2, 3, 1).copy()
    table = mlflow.pyfunc.load_model(f"models:/{name}-onnx@{C.CANDIDATE_ALIAS}").predict(images)
    assert table["class"].isin(C.CLASS_NAMES).all()


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


PORTABLE = """
import sys, json, importlib.abc
class Block(importlib.abc.MetaPathFinder):  # as if this project were not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("cifar10_cnn", "steps", "tests", "bench"):
            raise ImportError(f"{name} is not available here")
sys.meta_path.insert(0, Block())
import numpy as np, pandas as pd, torch, mlflow
images = np.array(json.loads(sys.argv[1]), dtype=np.uint8)
pyfunc = mlflow.pyfunc.load_model("models:/tiny@candidate")
out = {"pytorch": mlflow.pytorch.load_model("models:/tiny@candidate")(torch.from_numpy(images)).tolist(),
       "pyfunc": pyfunc.predict(images)["probabilities"].tolist(),
       "encoded": pyfunc.predict(pd.DataFrame({"image": sys.argv[2:]}))["probabilities"].tolist()}
print(json.dumps(out))
"""


def test_registered_pytorch_model_loads_without_this_project(chain, tmp_path):
    images = synthetic.images_for(np.arange(6) % 10, np.random.default_rng(2)).transpose(0, 2, 3, 1).copy()
    env = {**os.environ, "PYTHONPATH": ""}
    encoded = [base64.b64encode(png(pixels)).decode() for pixels in images]
    done = subprocess.run([sys.executable, "-c", PORTABLE, json.dumps(images.tolist()), *encoded], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = mlflow.pytorch.load_model("models:/tiny@candidate")(torch.from_numpy(images)).detach().numpy()
    assert np.abs(np.array(out["pytorch"]) - expected).max() < 1e-5
    assert np.abs(np.array(out["pyfunc"]) - torch.softmax(torch.from_numpy(expected), 1).numpy()).max() < 1e-5
    assert out["encoded"] == out["pyfunc"]  # PNG files in, through the model's own copy of images.py
