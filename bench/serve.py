"""Serving latency and a bounded load test against a real `mlflow models serve` on loopback.

    python -m bench.serve                       # SimpleCNN and AirNet, ONNX flavor, as the export step logs them
    python -m bench.serve --model-uri URI       # a model of yours, e.g. models:/cifar10-cnn-onnx@champion
    python -m bench.serve --quick               # a few requests (the test suite runs it)

Latency depends on the network's shape, not on its weights, so without --model-uri the models are
logged untrained into a temporary store, through the same code as the export step. Round trip =
HTTP + MLflow's parsing + our checks (and PNG decoding) + inference + the JSON reply, measured by the
client (the request body is built beforehand). Each request size is sent as each kind of input:
raw pixels as nested lists, and 32x32 PNG files, base64-encoded, in both forms the models take
(`dataframe_split` and `inputs`). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

MLFLOW = str(Path(sys.executable).parent / "mlflow")
KINDS = {"pixels": 'pixel lists {"inputs": [[[[r, g, b]...]]]}',
         "png_dataframe_split": "PNGs in base64, dataframe_split",
         "png_inputs": 'PNGs in base64, {"inputs": {"image"}}'}


@contextmanager
def server(model_uri: str, port: int, env: dict, workdir: Path, workers: int = 1):
    """`mlflow models serve` on 127.0.0.1:port until the block ends; its log goes to workdir/server.log."""
    log = (workdir / "server.log").open("w")
    env = {**env, "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")}  # uvicorn lives here
    process = subprocess.Popen(
        [MLFLOW, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
         "-w", str(workers)], cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if urllib.request.urlopen(f"{url}/ping", timeout=1).status == 200:
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_text = (workdir / "server.log").read_text()[-2000:]
                    raise RuntimeError(f"model server did not start: {log_text}") from None
                time.sleep(0.3)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
        log.close()


def post(url: str, body: bytes, timeout: float = 60) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def body(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": images.tolist()}).encode()


def png_base64(pixels: np.ndarray) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


def bodies(images: np.ndarray) -> dict[str, bytes]:
    """The same images as each kind of request body the models take."""
    encoded = [png_base64(pixels) for pixels in images]
    return {"pixels": body(images),
            "png_dataframe_split": json.dumps({"dataframe_split": {"columns": ["image"],
                                                                   "data": [[e] for e in encoded]}}).encode(),
            "png_inputs": json.dumps({"inputs": {"image": encoded}}).encode()}


def latency(url: str, payload: bytes, images: int, repeats: int) -> dict:
    """Client-side round trips for one request body of `images` images, after one warm-up."""
    post(url, payload)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        status, _ = post(url, payload)
        times.append(time.perf_counter() - start)
        if status != 200:
            raise RuntimeError(f"request of {images} images answered {status}")
    ms = np.array(times) * 1000
    return {"images": images, "requests": repeats, "median_ms": float(np.median(ms)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": float(images / np.median(ms) * 1000)}


def load_test(url: str, images: np.ndarray, requests: int, concurrency: int, time_limit_s: float,
              max_batch: int = 16, seed: int = 0) -> dict:
    """`requests` requests of 1..max_batch images from `concurrency` threads, stopped at `time_limit_s`.

    Counts every answer that is not HTTP 200 with one prediction per image as an error.
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, max_batch + 1, requests)
    payloads = [body(images[rng.integers(0, len(images), n)]) for n in sizes]
    lock, next_index = threading.Lock(), [0]
    errors: list[str] = []
    done_images, done_requests, times = [0], [0], []
    deadline = time.monotonic() + time_limit_s

    def worker():
        while time.monotonic() < deadline:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= requests:
                return
            start = time.perf_counter()
            try:
                status, reply = post(url, payloads[i], timeout=max(1.0, deadline - time.monotonic()))
                ok = status == 200 and len(reply.get("predictions", [])) == sizes[i]
                problem = None if ok else f"HTTP {status}: {str(reply)[:200]}"
            except OSError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            with lock:
                times.append(time.perf_counter() - start)
                if problem:
                    errors.append(problem)
                else:
                    done_requests[0] += 1
                    done_images[0] += int(sizes[i])

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ms = np.array(times or [0.0]) * 1000
    return {"requests": done_requests[0], "errors": len(errors), "error_samples": errors[:3],
            "seconds": seconds, "requests_per_s": done_requests[0] / seconds, "images_per_s": done_images[0] / seconds,
            "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "concurrency": concurrency}


def log_untrained(network: str, workdir: Path) -> tuple[str, dict]:
    """Log an untrained `network` the way the export step logs its ONNX model; its URI and the env to serve it."""
    import mlflow
    import torch

    from cifar10_cnn import constants as C
    from cifar10_cnn import export, mlmodel, models

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    torch.manual_seed(0)
    net = models.build(network)
    if hasattr(net, "init_from_data"):
        net.init_from_data(models.normalize(torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)))
    model = models.RawPixelClassifier(net).eval()
    example = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    proto = export.to_onnx(model, torch.from_numpy(example))
    logits = export.onnx_predictor(export.session(proto))(example)
    with mlflow.start_run():
        info = mlmodel.log_onnx(proto, C.ONNX_MODEL_NAME, example, logits, C.CLASS_NAMES)
    return info.model_uri, {**os.environ, "MLFLOW_TRACKING_URI": uri}


def measure(url: str, images: np.ndarray, quick: bool) -> dict:
    """Latency of 1 and 256 images in each kind of request body, a bounded load test, and the answer to one
    image too many, from the model server at `url`. `quick`: a few requests of each (the test suite's)."""
    from cifar10_cnn import constants as C

    repeats = {1: 3, 256: 2} if quick else {1: 200, 256: 40}
    load = {"requests": 40, "concurrency": 4, "time_limit_s": 30} if quick else \
        {"requests": 1000, "concurrency": 8, "time_limit_s": 60}
    rows = {kind: {n: latency(url, payload, n, r) for n, r in repeats.items()
                   for payload in [bodies(images[:n])[kind]]} for kind in KINDS}
    return {"latency": rows, "load": load_test(url, images, **load),
            "oversized_batch_status": post(url, body(np.zeros((C.MAX_REQUEST_IMAGES + 1, 32, 32, 3), np.uint8)))[0]}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", help="serve this model instead of untrained FastNet and SimpleCNN")
    parser.add_argument("--networks", default="simple_cnn,airnet", help="untrained networks to serve, comma-separated")
    parser.add_argument("--quick", action="store_true", help="a few requests only")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    images = np.random.default_rng(1).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)
    from cifar10_cnn import constants as C
    from cifar10_cnn import hardware

    print(f"{hardware.machine_line()}; Python {platform.python_version()}; one `mlflow models serve` worker on "
          "loopback")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        targets = [(args.model_uri, dict(os.environ), args.model_uri)] if args.model_uri else []
        for network in ([] if args.model_uri else args.networks.split(",")):
            workdir = Path(tmp) / network
            workdir.mkdir()
            uri, env = log_untrained(network, workdir)
            targets.append((network, env, uri))
        for label, env, uri in targets:
            workdir = Path(tmp) / "serve"
            workdir.mkdir(exist_ok=True)
            with server(uri, free_port(), env, workdir) as url:
                results[label] = measure(url, images, args.quick)
            rows, loaded, too_big = (results[label][k] for k in ("latency", "load", "oversized_batch_status"))
            print(f"\n{label}")
            for kind, by_size in rows.items():
                for n, r in by_size.items():
                    print(f"  round trip, {n:>3} image(s) as {KINDS[kind]:<34}: median {r['median_ms']:7.2f} ms, "
                          f"p99 {r['p99_ms']:7.2f} ms ({r['requests']} requests, {r['images_per_s']:,.0f} images/s)")
            print(f"  load test: {loaded['requests']} requests of 1-16 images from {loaded['concurrency']} threads in "
                  f"{loaded['seconds']:.1f} s: {loaded['requests_per_s']:.0f} requests/s, "
                  f"{loaded['images_per_s']:,.0f} images/s, {loaded['errors']} errors, p99 {loaded['p99_ms']:.1f} ms")
            print(f"  a batch of {C.MAX_REQUEST_IMAGES + 1} images: HTTP {too_big}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
