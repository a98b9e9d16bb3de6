"""Scoring with the registered models of the `chain` (conftest.py): MLflow's scoring app for both flavors
(in this process) and `mlflow models serve` for one, the predict command, the predict entry point and the
request payload."""

import base64
import csv
import http.client
import io
import json
import threading
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from bench import serve
from cifar10_cnn import constants as C
from cifar10_cnn import images as imagelib
from cifar10_cnn import serving, synthetic
from tests.conftest import fails, free_port, runs_env, step_runs
from tests.test_pipeline_steps import png


def jpeg(folder: Path) -> bytes:
    """A real photo-sized JPEG: 640x480, larger than any model input, with EXIF."""
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    photo = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
    path = folder / "photo.jpg"
    photo.save(path, quality=85)
    return path.read_bytes()


@contextmanager
def scoring_server(model_uri: str, monkeypatch):
    """MLflow's own scoring app (`mlflow.pyfunc.scoring_server`) for `model_uri`, served by uvicorn in a
    thread of this process: what `mlflow models serve` runs, without a process to start per flavor."""
    import uvicorn
    from mlflow.pyfunc import scoring_server as app_module

    monkeypatch.setenv(serving.SERVING_ENV, "false")  # the app sets it "true"; removed again at teardown
    app = app_module.init(mlflow.pyfunc.load_model(model_uri))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the scoring server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.parametrize("name", ["tiny-onnx", "tiny"])
def test_each_flavor_answers_and_refuses_malformed_requests_with_400(chain, tmp_path, name, monkeypatch):
    """Each registered flavor behind MLflow's scoring app, with good, malformed and encoded requests."""
    with scoring_server(f"models:/{name}@candidate", monkeypatch) as url:
        check_server(url, name, tmp_path)


@pytest.mark.slow
def test_mlflow_models_serve_answers_refuses_a_deep_body_and_takes_load(chain):
    """The ONNX flavor behind the real `mlflow models serve` (started by bench.serve's own helper): a request,
    a JSON body nested 100,000 deep and a 10 MB bad one (4xx, a short error, still up), and the serving
    benchmark's quick load test, where every answer must be right."""
    images = synthetic.images_for(np.arange(5) % 10, np.random.default_rng(3)).transpose(0, 2, 3, 1).copy()
    with serve.server("models:/tiny-onnx@candidate", free_port(), runs_env(), chain["root"]) as url:
        status, reply = serve.post(url, json.dumps({"inputs": images.tolist()}).encode())
        assert status == 200 and len(reply["predictions"]) == 5
        check_hostile_bodies(url)
        measured = serve.measure(url, np.repeat(images, 52, axis=0)[:256], quick=True)
    assert set(measured["latency"]) == {"pixels", "png_dataframe_split", "png_inputs"}
    assert all(set(sizes) == {1, 256} and sizes[256]["median_ms"] > 0 for sizes in measured["latency"].values())
    assert measured["load"]["errors"] == 0 and measured["load"]["requests"] == 40, measured["load"]
    assert measured["oversized_batch_status"] == 400


def check_hostile_bodies(url: str) -> None:
    """Deep nesting and a large bad body: 400 with an error body of a few kB, and the server still answers."""
    for what, body, message in [
        ("nested 100,000 deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        ("10 MB, not JSON", b"{" + b"x" * 10_000_000, "Invalid input"),
        ("10 MB of bad base64", json.dumps({"inputs": {"image": ["%%%%" * 2500] * 1000}}).encode(),
         "image 0: not valid base64"),
    ]:
        status, reply = serve.post(url, body)
        assert status == 400 and message in reply["message"], (what, status, str(reply)[:500])
        assert len(json.dumps(reply)) < 3 * serving.MAX_ERROR_CHARS, (what, len(json.dumps(reply)))
        assert urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200  # still up


def check_server(url: str, name: str, tmp_path: Path) -> None:
    post = partial(serve.post, url)
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
    }
    for what, (body, message) in malformed.items():
        status, reply = post(body)
        assert status == 400 and message in reply["message"], (what, status, reply)
        assert urllib.request.urlopen(f"{url}/ping", timeout=5).status == 200  # still up
    bare = http.client.HTTPConnection(urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port, timeout=30)
    bare.request("POST", "/invocations", body=json.dumps({"inputs": images.tolist()}).encode())  # no Content-Type
    reply = bare.getresponse()
    assert reply.status == 415 and b"no Content-Type header" in reply.read()
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
    code = cli(["predict", "--model", f"models:/tiny-onnx@{C.CANDIDATE_ALIAS}", "--csv", str(tmp_path), str(folder)])
    assert code == 2 and f"--csv {tmp_path} is a folder" in capsys.readouterr().err  # before any work
    (tmp_path / "empty").mkdir()
    assert cli(["payload", str(tmp_path / "empty")]) == 2 and "no image files" in capsys.readouterr().err


def test_predict_step_scores_an_archive_and_a_folder_in_runs_of_their_own(chain, archive, tmp_path, capsys):
    from steps import predict as predict_step

    onnx = MlflowClient().get_model_version_by_alias("tiny-onnx", C.CANDIDATE_ALIAS)
    predict_step.main(["--model-uri", "models:/tiny-onnx@candidate", "--images", str(archive)])
    run = step_runs("predict")[-1]
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
    run = step_runs("predict")[-1]
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
        assert len(runs) == before + 1 and runs[-1].info.status == "FAILED", message


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
