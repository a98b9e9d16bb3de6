"""Each step on its own, in this process, against a temporary tracking store."""

import base64
import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from bench.serve import load_test
from cifar10_cnn import constants as C
from cifar10_cnn import hardware, recipes, synthetic, tracking
from cifar10_cnn import images as imagelib
from cifar10_cnn.errors import UserError
from steps import evaluate, export, ingest, main, train
from tests.conftest import free_port, isolate, runs_env


def step_runs(step):
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.`cifar10.step` = '{step}'", output_format="list"
    )


def only_run(step):
    (run,) = step_runs(step)
    return run


def fails(entry, argv, capsys, message):
    with pytest.raises(SystemExit) as exit_:
        entry.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    return err[0]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, archive):
    """ingest -> train -> evaluate -> export once, each step called as its script would be."""
    with pytest.MonkeyPatch.context() as mp:
        isolate(tmp_path_factory.mktemp("chain"), mp)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # the tiny train run lasts ~3 s
        ingest.main(["--data", str(archive), "--expected-records", "any"])
        ingest_id = only_run("ingest").info.run_id
        train.main(["--ingest-run-id", ingest_id, "--epochs", "2", "--batch-size", "16", "--device", "cpu"])
        train_id = only_run("train").info.run_id
        evaluate.main(["--train-run-id", train_id, "--device", "cpu"])
        evaluate_id = only_run("evaluate").info.run_id
        export.main(["--train-run-id", train_id, "--evaluate-run-id", evaluate_id, "--model-name", "tiny"])
        yield {"ingest": ingest_id, "train": train_id, "evaluate": evaluate_id,
               "export": only_run("export").info.run_id, "mp": mp}


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
    ckpt = torch.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=C.CHECKPOINT_PATH),
                      weights_only=True)
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
    assert {"confusion_matrix.png", "per_class_accuracy.png", "confident_mistakes.png"} <= names


def test_export_logs_the_pytorch_flavor_as_a_program_with_our_loader(chain):
    export_run = mlflow.get_run(chain["export"])
    model = mlflow.pytorch.load_model(export_run.data.tags[C.TAG_PYTORCH_MODEL_URI])
    images = synthetic.images_for(np.arange(5) % 10, np.random.default_rng(0)).transpose(0, 2, 3, 1).copy()
    assert model(torch.from_numpy(images)).shape == (5, 10)
    info = mlflow.models.get_model_info(export_run.data.tags[C.TAG_PYTORCH_MODEL_URI])
    # No input schema for the pyfunc (MLflow would truncate floats before our checks); the network's
    # own signature is kept in the metadata, and our loader answers pyfunc calls.
    assert info.signature is None and info.flavors["python_function"]["loader_module"] == "cifar10_serving"
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


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def jpeg(folder: Path) -> bytes:
    """A real photo-sized JPEG: 640x480, larger than any model input, with EXIF."""
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
    path = folder / "photo.jpg"
    photo.save(path, quality=85)
    return path.read_bytes()


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-onnx", "tiny"])
def test_mlflow_models_serve_answers_and_survives_malformed_requests(chain, tmp_path, name):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{name}@candidate",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path, env=runs_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def post(body: bytes):
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        for _ in range(240):
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the model server did not answer /ping within 120 s")
        images = synthetic.images_for(np.arange(5) % 10, np.random.default_rng(3)).transpose(0, 2, 3, 1).copy()
        status, reply = post(json.dumps({"inputs": images.tolist()}).encode())
        assert status == 200
        predictions = reply["predictions"]
        logits = mlflow.pytorch.load_model("models:/tiny@candidate")(torch.from_numpy(images)).detach()
        expected = torch.softmax(logits, 1).numpy()
        assert [p["class"] for p in predictions] == [C.CLASS_NAMES[i] for i in expected.argmax(1)]
        got = np.array([p["probabilities"] for p in predictions])
        assert got.shape == (5, 10) and np.abs(got - expected).max() < C.ONNX_MAX_ABS_DIFF
        malformed = {
            "not JSON": (b"not json", "Invalid input"),
            "empty body": (b"", "Invalid input"),
            "wrong shape": (json.dumps({"inputs": [[1, 2, 3]]}).encode(), "shape [N, 32, 32, 3]"),
            "no images": (json.dumps({"inputs": []}).encode(), "shape [N, 32, 32, 3]"),
            "strings": (json.dumps({"inputs": [[["a"] * 3] * 32] * 32}).encode(), "integers 0..255"),
            "normalized floats": (json.dumps({"inputs": (images / 255).tolist()}).encode(), "got fractions"),
            "out of range": (json.dumps({"inputs": (images.astype(int) + 200).tolist()}).encode(), "in 0..255"),
            "too many images": (json.dumps({"inputs": np.zeros((C.MAX_REQUEST_IMAGES + 1, 32, 32, 3), int).tolist()})
                                .encode(), f"between 1 and {C.MAX_REQUEST_IMAGES} images"),
        }
        for what, (body, message) in malformed.items():
            status, reply = post(body)
            assert status == 400 and message in reply["message"], (what, status, reply)
            assert urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200  # still up
        status, reply = post(json.dumps({"inputs": images.astype(float).tolist()}).encode())  # 12.0 is 12
        assert status == 200 and [p["class"] for p in reply["predictions"]] == [p["class"] for p in predictions]
        # Image files, base64-encoded, in both forms: the same answer as their decoded pixels.
        files = [png(pixels) for pixels in images[:3]] + [jpeg(tmp_path)]
        pixels = np.stack([imagelib.decode(f, "f") for f in files])
        status, reply = post(json.dumps({"inputs": pixels.tolist()}).encode())
        assert status == 200
        as_pixels = [(p["class"], round(p["probability"], 5)) for p in reply["predictions"]]
        encoded = [base64.b64encode(f).decode() for f in files]
        for form in ({"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}},
                     {"inputs": {"image": encoded}}):
            status, reply = post(json.dumps(form).encode())
            assert status == 200, reply
            assert [(p["class"], round(p["probability"], 5)) for p in reply["predictions"]] == as_pixels, form.keys()
        bomb = io.BytesIO()
        Image.new("1", (20_000, 20_000)).save(bomb, "PNG")
        for what, (column, message) in {
            "bad base64": (["%%%"], "image 0: not valid base64"),
            "not an image": ([encoded[0], base64.b64encode(b"just text").decode()], "image 1: not an image"),
            "a decompression bomb": ([base64.b64encode(bomb.getvalue()).decode()], "decompression bomb"),
            "too many images": ([encoded[0]] * (C.MAX_REQUEST_IMAGES + 1), f"between 1 and {C.MAX_REQUEST_IMAGES}"),
        }.items():
            for form in ({"dataframe_split": {"columns": ["image"], "data": [[e] for e in column]}},
                         {"inputs": {"image": column}}):
                status, reply = post(json.dumps(form).encode())
                assert status == 400 and message in reply["message"], (what, status, reply)
        assert urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200  # still up
        # A short load test: bounded in count and time, every answer must be right.
        result = load_test(url, images, requests=60, concurrency=4, time_limit_s=90)
        print(f"load test {name}: {result}")
        assert result["errors"] == 0 and result["requests"] == 60, result["error_samples"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# --- bad input: one line, exit 2, FAILED, nothing written downstream ---------------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--epochs", "0", "epochs must be a whole number >= 1, got '0'"),
        ("--batch-size", "-1", "batch_size must be a whole number >= 1, got '-1'"),
        ("--learning-rate", "0", "learning_rate must be a finite number > 0, got '0'"),
        ("--device", "tpu", "device must be one of auto, cpu, cuda, mps; got 'tpu'"),
        ("--model", "vgg99", "model must be one of simple_cnn, vgg11, vgg16, resnet18, fastnet, airnet; got 'vgg99'"),
        ("--optimizer", "rmsprop", "optimizer must be one of adam, sgd, muon; got 'rmsprop'"),
        ("--lr-schedule", "step", "lr_schedule must be one of constant, onecycle, cosine, triangle; got 'step'"),
        ("--label-smoothing", "1.5", "label_smoothing must be a number in [0, 1), got '1.5'"),
        ("--weight-decay", "-1", "weight_decay must be a finite number >= 0, got '-1'"),
        ("--augment", "maybe", "augment must be true or false, got 'maybe'"),
        ("--precision", "fp16", "precision must be one of fp32, bf16; got 'fp16'"),
        ("--momentum", "1", "momentum must be a number in [0, 1), got '1'"),
        ("--bias-lr-scale", "0", "bias_lr_scale must be a finite number > 0, got '0'"),
        ("--lookahead", "often", "lookahead must be true or false, got 'often'"),
        ("--crop-padding", "-2", "crop_padding must be a whole number >= 0, got '-2'"),
        ("--alternating-flip", "2", "alternating_flip must be true or false, got '2'"),
        ("--budget-minutes", "-5", "budget_minutes must be a finite number >= 0, got '-5'"),
        ("--budget-minutes", "inf", "budget_minutes must be a finite number >= 0, got 'inf'"),
        ("--recipe", "slow", "recipe must be one of seed, fast; got 'slow'"),
        ("--resume-run-id", "abc", "resume_run_id must be an MLflow run id (32 hex characters), got 'abc'"),
    ],
)
def test_train_rejects_bad_parameters(chain, capsys, flag, value, message):
    before = len(step_runs("train"))
    line = fails(train, ["--ingest-run-id", chain["ingest"], flag, value], capsys, message)
    assert line.startswith("error: train: ")
    failed = step_runs("train")
    assert len(failed) == before + 1
    newest = max(failed, key=lambda r: r.info.start_time)
    assert newest.info.status == "FAILED"
    assert MlflowClient().list_artifacts(newest.info.run_id) == []  # no checkpoint, no model


def test_train_rejects_a_run_of_another_step(chain, capsys):
    fails(train, ["--ingest-run-id", chain["evaluate"]], capsys, "was made by 'evaluate', not by 'ingest'")


def test_train_rejects_a_missing_run(chain, capsys):
    fails(train, ["--ingest-run-id", "0" * 32], capsys, f"ingest_run_id {'0' * 32}: no such run")


def test_export_rejects_an_evaluation_of_another_train_run(chain, capsys):
    fails(export, ["--train-run-id", chain["train"], "--evaluate-run-id", chain["ingest"]], capsys,
          "was made by 'ingest', not by 'evaluate'")


def test_export_waits_only_for_an_evaluate_run_of_its_own_pipeline(store):
    """main runs evaluate beside export: export waits for such a run to end, and for no other."""
    client = MlflowClient()
    pipeline = client.create_run("0").info.run_id

    def step_run(step, parent):
        return client.create_run("0", tags={C.TAG_STEP: step, **({C.TAG_PARENT_RUN: parent} if parent else {})})
    sibling, stranger = step_run("evaluate", pipeline).info.run_id, step_run("evaluate", None).info.run_id
    with mlflow.start_run(run_id=step_run("export", pipeline).info.run_id):
        assert tracking.running_beside(sibling, "evaluate") and not tracking.running_beside(stranger, "evaluate")
        with pytest.raises(UserError, match="ended RUNNING"):  # not waited for: no pipeline of ours runs it
            tracking.upstream(stranger, "evaluate", wait_in_pipeline=True)
        timer = threading.Timer(1.0, client.set_terminated, (sibling, "FINISHED"))
        timer.start()
        start = time.monotonic()
        assert tracking.upstream(sibling, "evaluate", wait_in_pipeline=True).info.status == "FINISHED"
        assert time.monotonic() - start >= 0.9  # it waited for the run to end
        client.set_terminated(stranger, "FAILED")
        with pytest.raises(UserError, match="ended FAILED"):
            tracking.upstream(stranger, "evaluate", wait_in_pipeline=True)


def test_ingest_missing_data_fails_and_caches_nothing(store, tmp_path, capsys):
    fails(ingest, ["--data", str(tmp_path / "nope.tar.gz")], capsys, "nope.tar.gz does not exist")
    (run,) = step_runs("ingest")
    assert run.info.status == "FAILED" and MlflowClient().list_artifacts(run.info.run_id) == []
    assert not (tmp_path / "data").exists()


def test_ingest_corrupt_archive_fails(store, tmp_path, capsys):
    path = synthetic.write_archive(tmp_path / "evil.tar.gz", synthetic.batch_files(),
                                   extra=[synthetic_link()])
    fails(ingest, ["--data", str(path), "--expected-records", "any"], capsys, "refusing a hostile archive")
    assert only_run("ingest").info.status == "FAILED"


def synthetic_link():
    import tarfile

    info = tarfile.TarInfo("cifar-10-batches-bin/evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


def test_train_on_a_failed_ingest_run(store, tmp_path, capsys):
    fails(ingest, ["--data", str(tmp_path / "nope")], capsys, "does not exist")
    failed = only_run("ingest").info.run_id
    fails(train, ["--ingest-run-id", failed], capsys, f"ingest_run_id {failed} ended FAILED")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "epochs must be a whole number >= 1, got '0'"),
        (["--batch-size", "0"], "batch_size must be a whole number >= 1, got '0'"),
        (["--learning-rate", "-0.1"], "learning_rate must be a finite number > 0, got '-0.1'"),
        (["--device", "gpu"], "device must be one of auto, cpu, cuda, mps; got 'gpu'"),
        (["--data", "/nonexistent/cifar.tar.gz"], "data: /nonexistent/cifar.tar.gz does not exist"),
        (["--model-name", "a b"], "model_name must be"),
    ],
)
def test_main_rejects_bad_input_before_any_step(store, capsys, argv, message):
    line = fails(main, argv, capsys, message)
    assert line.startswith("error: main: ")
    (parent,) = step_runs("main")
    assert parent.info.status == "FAILED"
    everything = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in everything] == [parent.info.run_id]  # no child runs
    assert MlflowClient().search_registered_models() == []


def test_main_runs_evaluate_beside_export_and_names_a_failed_evaluate(store, archive, monkeypatch, capsys):
    """Export starts before evaluate ends, with evaluate's run id; when evaluate fails, that is what main
    reports (export, which waited for it, fails too). mlflow.projects.run is replaced by a fake that makes
    the nested run as MLflow does, then plays the step."""
    client, started = MlflowClient(), []
    evaluate_done = threading.Event()

    def fake_projects_run(uri, entry_point, parameters, experiment_id, **_):
        run = client.create_run(experiment_id, tags={C.TAG_PARENT_RUN: mlflow.active_run().info.run_id,
                                                      C.TAG_ENTRY_POINT: entry_point, C.TAG_STEP: entry_point})
        started.append((entry_point, parameters, evaluate_done.is_set()))
        if entry_point == "evaluate":
            time.sleep(1.0)  # export must have started by now
            client.set_terminated(run.info.run_id, "FAILED")
            evaluate_done.set()
            raise mlflow.exceptions.ExecutionException("evaluate failed")
        if entry_point == "export":
            evaluate_done.wait(10)  # as export waits for its sibling, then finds it FAILED
            client.set_terminated(run.info.run_id, "FAILED")
            raise mlflow.exceptions.ExecutionException("export failed")
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info

    monkeypatch.setattr(mlflow.projects, "run", fake_projects_run)
    fails(main, ["--data", str(archive), "--reuse", "false"], capsys, "step evaluate failed")
    names = [name for name, _, _ in started]
    assert names == ["ingest", "train", "evaluate", "export"]
    (evaluate_id,) = [r.info.run_id for r in step_runs("evaluate")]
    export_params, evaluate_had_ended = started[3][1:]
    assert export_params["evaluate_run_id"] == evaluate_id and not evaluate_had_ended
    (parent,) = step_runs("main")
    assert parent.info.status == "FAILED"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_main_rejects_cuda_without_a_gpu(store, capsys):
    fails(main, ["--device", "cuda"], capsys, "device 'cuda' was requested but torch sees no CUDA GPU")


# --- what step reuse calls a known code version --------------------------------------------------------


def test_code_version_is_a_clean_git_commit(tmp_path):
    from cifar10_cnn.tracking import code_version

    assert code_version(tmp_path) == (None, f"{tmp_path} is not a git checkout")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "code.py").write_text("x = 1\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "one"]):
        subprocess.run(git + cmd, check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == (head, "")
    (tmp_path / "notes.txt").write_text("untracked files do not change the code\n")
    assert code_version(tmp_path) == (head, "")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path) == (None, "the project has uncommitted changes, so its code is not a known version")


def test_main_parameters_resolve_the_recipe(store):
    from steps.main import check_main_params

    raw = {k: "auto" for k in (*recipes.FIELDS, "tta")}
    raw.update(recipe="fast", device="cpu", data="auto", expected_records="any", model_name="m",
               resume_run_id="none", int8="true", reuse="false", nproc_per_node="1")
    p = check_main_params({**raw, "epochs": "3"})
    assert p["train"]["model"] == "airnet" and p["train"]["epochs"] == 3 and p["train"]["optimizer"] == "muon"
    assert p["train"]["precision"] == "auto"  # decided by the train step, on the device it trains on
    assert p["tta"] == "crops" and p["reuse"] is False and p["resume_run_id"] == "none"
    assert check_main_params({**raw, "recipe": "seed"})["tta"] == "false"
    assert check_main_params({**raw, "tta": "true"})["tta"] == "flip"  # true kept its old meaning
    assert check_main_params({**raw, "budget_minutes": "5"})["train"]["budget_minutes"] == 5.0
    with pytest.raises(UserError, match="give epochs or budget_minutes, not both"):
        check_main_params({**raw, "budget_minutes": "5", "epochs": "3"})
    with pytest.raises(UserError, match="tta must be one of false, flip, crops; got 'maybe'"):
        check_main_params({**raw, "tta": "maybe"})
    with pytest.raises(UserError, match="recipe must be one of seed, fast; got 'slow'"):
        check_main_params({**raw, "recipe": "slow"})
    with pytest.raises(UserError, match="warmup_epochs .3.0. is longer than the training .2 epochs."):
        check_main_params({**raw, "epochs": "2", "warmup_epochs": "3"})


# --- the predict command against the registered model --------------------------------------------------


def test_predict_command_classifies_files_and_folders(chain, tmp_path, capsys):
    from PIL import Image

    from cifar10_cnn.__main__ import main as cli

    pixels = synthetic.images_for(np.arange(4) % 10, np.random.default_rng(4)).transpose(0, 2, 3, 1).copy()
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, image in enumerate(pixels[:3]):
        Image.fromarray(image).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    single = tmp_path / "single.bmp"
    Image.fromarray(pixels[3]).save(single)
    out_csv = tmp_path / "out.csv"
    code = cli(["predict", "--model", f"models:/tiny-onnx@{C.CANDIDATE_ALIAS}", "--csv", str(out_csv),
                str(folder), str(single)])
    out, err = capsys.readouterr()
    assert code == 1  # one file could not be read; the others were still classified
    expected = mlflow.pyfunc.load_model(f"models:/tiny@{C.CANDIDATE_ALIAS}").predict(pixels)
    lines = out.strip().splitlines()
    for i, path in enumerate([*(folder / f"img{i}.png" for i in range(3)), single]):
        row = expected.iloc[i]
        assert f"{path}: {row['class']} ({row['probability']:.1%})" in lines
    assert f"error: {folder / 'broken.jpg'}: " in err and "1 of 5 files could not be classified" in err
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == 5 and [r["class"] for r in rows if r["error"]] == [""]
    code = cli(["predict", "--model", "models:/no-such-model@champion", str(single)])
    assert code == 2 and "cannot load model 'models:/no-such-model@champion'" in capsys.readouterr().err


def test_predict_step_scores_an_archive_and_a_folder_in_runs_of_their_own(chain, archive, tmp_path, capsys):
    from steps import predict as predict_step

    onnx = MlflowClient().get_model_version_by_alias("tiny-onnx", C.CANDIDATE_ALIAS)
    predict_step.main(["--model-uri", "models:/tiny-onnx@candidate", "--images", str(archive)])
    run = step_runs("predict")[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["model_name"] == "tiny-onnx" and run.data.params["model_version"] == str(onnx.version)
    # The acceptance test: the test images scored from outside the pipeline give the version's own figure.
    assert run.data.metrics["test_accuracy"] == pytest.approx(float(onnx.tags["test_accuracy"]), abs=5e-5)  # 4 decimals
    assert run.data.metrics["images"] == 100 and run.data.metrics["errors"] == 0
    assert sum(run.data.metrics[f"count_{n}"] for n in C.CLASS_NAMES) == 100
    rows = list(csv.DictReader(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                        artifact_path="predictions.csv",
                                                                        dst_path=str(tmp_path)))))
    assert len(rows) == 100 and rows[0]["path"] == "test_batch.bin[0]" and rows[0]["true_class"] in C.CLASS_NAMES
    assert sum(r["class"] == r["true_class"] for r in rows) == round(100 * run.data.metrics["test_accuracy"])

    folder = tmp_path / "photos"
    folder.mkdir()
    pixels = synthetic.images_for(np.arange(3) % 10, np.random.default_rng(6)).transpose(0, 2, 3, 1).copy()
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    predict_step.main(["--model-uri", "models:/tiny/1", "--images", str(folder)])
    run = step_runs("predict")[0]
    expected = mlflow.pyfunc.load_model("models:/tiny/1").predict(pixels)
    assert run.info.status == "FINISHED" and run.data.metrics["errors"] == 1 and run.data.metrics["images"] == 4
    assert "test_accuracy" not in run.data.metrics
    for name in C.CLASS_NAMES:
        assert run.data.metrics[f"count_{name}"] == list(expected["class"]).count(name)

    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, message in [
        (["--model-uri", "models:/no-such-model@champion", "--images", str(folder)],
         "cannot load model 'models:/no-such-model@champion'"),
        (["--model-uri", "models:/tiny/1", "--images", str(empty)], "holds no files to score"),
        (["--model-uri", "models:/tiny/1", "--images", str(tmp_path / "nowhere")], "does not exist"),
        (["--model-uri", "models:/tiny/1", "--images", str(folder / "broken.jpg")], "none of the 1 file(s)"),
    ]:
        before = len(step_runs("predict"))
        fails(predict_step, argv, capsys, message)
        runs = step_runs("predict")
        assert len(runs) == before + 1 and runs[0].info.status == "FAILED", message


def test_payload_is_a_request_the_server_would_take(chain, tmp_path, capsys):
    from PIL import Image

    from cifar10_cnn.__main__ import main as cli

    big = np.random.default_rng(5).integers(0, 256, (300, 200, 3), dtype=np.uint8)  # any size: resized to 32x32
    Image.fromarray(big).save(tmp_path / "photo.jpg")
    assert cli(["payload", str(tmp_path / "photo.jpg")]) == 0
    request = json.loads(capsys.readouterr().out)
    images = np.array(request["inputs"])
    assert images.shape == (1, 32, 32, 3)
    table = mlflow.pyfunc.load_model(f"models:/tiny-onnx@{C.CANDIDATE_ALIAS}").predict(images)
    assert table["class"][0] in C.CLASS_NAMES


def test_an_int8_model_that_loses_more_than_a_point_is_not_registered(chain):
    from steps import export as export_step

    client = MlflowClient()
    logged = client.get_run(chain["export"]).data.tags[C.TAG_ONNX_MODEL_URI]
    with mlflow.start_run() as run:
        export_step.register_int8((mlflow.models.get_model_info(logged), {"quantized": {"drop_points": 1.5}}),
                                  "tiny-onnx-lossy", {}, {})
    assert client.search_registered_models("name = 'tiny-onnx-lossy'") == []
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


@pytest.mark.slow
@pytest.mark.parametrize("model, count", [("vgg11", 9_228_362), ("vgg16", 14_724_042), ("resnet18", 11_173_962),
                                          ("fastnet", 656_760), ("airnet", 569_656)])
def test_every_model_goes_through_train_evaluate_export_unchanged(chain, model, count):
    """The fast recipe's training with each network; evaluate, export and registration as for the default."""
    # AirNet's batch norm has a fixed scale; the others' scale would not survive 64x the learning rate
    train.main(["--ingest-run-id", chain["ingest"], "--recipe", "fast", "--model", model, "--epochs", "1",
                "--batch-size", "50", "--learning-rate", "0.05", "--warmup-epochs", "0", "--device", "cpu",
                "--bias-lr-scale", "64" if model == "airnet" else "1"])
    train_run = max(step_runs("train"), key=lambda r: r.info.start_time)
    assert train_run.info.status == "FINISHED"
    assert train_run.data.params["model"] == model and train_run.data.params["num_parameters"] == str(count)
    decided, why = hardware.decide(replace(recipes.RECIPES["fast"], model=model),
                                   hardware.capabilities(torch.device("cpu")))
    assert train_run.data.params["precision_used"] == decided.precision
    assert train_run.data.params["channels_last_used"] == str(decided.channels_last)
    assert train_run.data.tags[C.TAG_HARDWARE] == hardware.describe(hardware.capabilities(torch.device("cpu")))
    assert train_run.data.tags[C.TAG_DECISION + "precision"] == why["precision"]
    evaluate.main(["--train-run-id", train_run.info.run_id, "--device", "cpu",
                   "--tta", "crops" if model == "airnet" else "true"])
    eval_run = max(step_runs("evaluate"), key=lambda r: r.info.start_time)
    assert {"test_accuracy", "test_accuracy_tta"} <= set(eval_run.data.metrics)
    name = f"each-{model}"
    export.main(["--train-run-id", train_run.info.run_id, "--evaluate-run-id", eval_run.info.run_id,
                 "--model-name", name, "--int8", "true" if model == "airnet" else "false"])
    export_run = max(step_runs("export"), key=lambda r: r.info.start_time)
    assert export_run.info.status == "FINISHED"
    assert export_run.data.metrics["onnx_argmax_mismatches"] == 0
    assert export_run.data.metrics["onnx_max_abs_diff"] <= C.ONNX_MAX_ABS_DIFF * max(
        1.0, export_run.data.metrics["onnx_max_abs_logit"])
    client = MlflowClient()
    for registered in (name, f"{name}-onnx"):
        version = client.get_model_version_by_alias(registered, C.CANDIDATE_ALIAS)
        assert version.tags["model"] == model and version.tags["train_run_id"] == train_run.info.run_id
    images = synthetic.images_for(np.arange(3) % 10, np.random.default_rng(6)).transpose(0, 2, 3, 1).copy()
    table = mlflow.pyfunc.load_model(f"models:/{name}-onnx@{C.CANDIDATE_ALIAS}").predict(images)
    assert table["class"].isin(C.CLASS_NAMES).all()


def test_parent_runs_are_named_after_what_they_train():
    from steps.main import run_name

    assert run_name({"recipe": "seed", "model": "simple_cnn", "epochs": 5, "budget_minutes": 0.0}) == \
        "seed · simple_cnn · 5 epochs"
    assert run_name({"recipe": "seed", "model": "vgg11", "epochs": 1, "budget_minutes": 0.0}) == \
        "seed · vgg11 · 1 epoch"
    assert run_name({"recipe": "fast", "model": "airnet", "epochs": 10, "budget_minutes": 7.5}) == \
        "fast · airnet · 7.5 min"
    assert run_name({"recipe": "fast", "model": "auto"}) == "fast (resumed)"  # train reads the killed run's


def test_a_step_tags_its_experiment_kind_unless_it_has_one(store, capsys):
    client = MlflowClient()
    genai = client.create_experiment("genai-already", tags={C.EXPERIMENT_KIND_TAG: "genai_development"})
    plain = client.create_experiment("plain")
    for experiment_id in (genai, plain):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
            fails(main, ["--epochs", "abc"], capsys, "epochs must be a whole number >= 1, got 'abc'")
    assert client.get_experiment(genai).tags[C.EXPERIMENT_KIND_TAG] == "genai_development"  # kept
    assert client.get_experiment(plain).tags[C.EXPERIMENT_KIND_TAG] == C.EXPERIMENT_KIND == "custom_model_development"
