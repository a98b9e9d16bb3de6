"""The benchmark's --quick mode runs end to end, so bench/ never rots. No timing is asserted."""

import json
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_DIR, runs_env

pytestmark = pytest.mark.slow


def test_quick_benchmark_prints_every_section(tmp_path):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in runs_env().items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-m", "bench.bench", "--quick", "--json", str(out)], cwd=PROJECT_DIR,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for row in ("(a) seed recipe", "(b) our train step", "ratio b/a", "interleaved (3 rounds",
                "whole `mlflow run . -P epochs=1`", "train step peak RSS", "pytorch eager", "onnx runtime",
                "ratio ORT/eager"):
        assert row in done.stdout
    r = json.loads(out.read_text())
    assert r["train_images"] == 1000 and r["epochs"] == 1
    for side in ("seed", "ours"):
        assert r[side]["images_per_s"] > 0 and 0 <= r[side]["accuracy"] <= 1
    assert set(r["mlflow_run"]["step_s"]) == {"main", "ingest", "train", "evaluate", "export"}
    assert r["mlflow_run"]["train_peak_rss_mib"] > 0
    assert len(r["interleaved"]["ratios"]) == 3 and r["interleaved"]["median_ratio"] > 0
    assert set(r["inference"]) == {"pytorch eager", "onnx runtime"}


def test_quick_serving_benchmark_reports_latency_and_load(tmp_path):
    out = tmp_path / "serve.json"
    env = {k: v for k, v in runs_env().items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-m", "bench.serve", "--quick", "--networks", "simple_cnn", "--json",
                           str(out)], cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round trip,   1 image(s)" in done.stdout and "load test:" in done.stdout
    r = json.loads(out.read_text())["simple_cnn"]
    assert set(r["latency"]) == {"pixels", "png_dataframe_split", "png_inputs"}
    assert all(set(sizes) == {"1", "256"} and sizes["256"]["median_ms"] > 0 for sizes in r["latency"].values())
    assert r["load"]["errors"] == 0 and r["load"]["requests"] == 40
    assert r["oversized_batch_status"] == 400


def test_quick_model_and_time_to_accuracy_benchmarks_run(tmp_path):
    env = {k: v for k, v in runs_env().items() if not k.startswith("MLFLOW_")}
    done = subprocess.run([sys.executable, "-m", "bench.models", "--quick", "--json", str(tmp_path / "m.json")],
                          cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "m.json").read_text())
    assert rows["airnet"]["parameters"] == 569_656 and rows["simple_cnn"]["images_per_s"]["fp32"] > 0
    assert set(rows["airnet"]["images_per_s"]) == {"fp32", "fp32_channels_last"}
    assert rows["airnet"]["auto"]["channels_last"] is True and rows["simple_cnn"]["auto"]["channels_last"] is False
    done = subprocess.run([sys.executable, "-m", "bench.models", "--recipes", "--quick", "--json",
                           str(tmp_path / "r.json")], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "an epoch of the fast recipe costs" in done.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["ratios"]) == 1 and result["epoch_cost_ratio"] > 0
    done = subprocess.run([sys.executable, "-m", "bench.time_to_accuracy", "--quick", "--device", "cpu", "--json",
                           str(tmp_path / "t.json")], cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "epoch  2:" in done.stdout and "final test accuracy" in done.stdout
    result = json.loads((tmp_path / "t.json").read_text())
    assert [e["epoch"] for e in result["runs"][0]["epochs"]] == [1, 2]
