"""The benchmarks' --quick modes run end to end, so bench/ never rots. No timing is asserted. Each main takes
its argv, so they run in this process; the whole `mlflow run` that bench.bench can time is left out here
(the end-to-end tests run the recipe, and bench.bookkeeping times it)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_benchmark_prints_every_section(tmp_path, capsys):
    from bench import bench

    out = tmp_path / "bench.json"
    bench.main(["--quick", "--no-run", "--json", str(out)])
    printed = capsys.readouterr().out
    for row in ("(a) seed recipe", "(b) our train step", "ratio b/a", "interleaved (3 rounds", "pytorch eager",
                "onnx runtime", "ratio ORT/eager"):
        assert row in printed
    assert "whole `mlflow run" not in printed
    r = json.loads(out.read_text())
    assert r["train_images"] == 1000 and r["epochs"] == 1 and "mlflow_run" not in r
    for side in ("seed", "ours"):
        assert r[side]["images_per_s"] > 0 and 0 <= r[side]["accuracy"] <= 1
    assert len(r["interleaved"]["ratios"]) == 3 and r["interleaved"]["median_ratio"] > 0
    assert set(r["inference"]) == {"pytorch eager", "onnx runtime"}


def test_quick_model_and_time_to_accuracy_benchmarks_run(tmp_path, capsys):
    """In this process (each main takes its argv). bench.serve's measurements run in test_scoring.py, against
    the server that test starts."""
    from bench import models, time_to_accuracy

    models.main(["--quick", "--json", str(tmp_path / "m.json")])
    rows = json.loads((tmp_path / "m.json").read_text())
    assert rows["airnet"]["parameters"] == 569_656 and rows["simple_cnn"]["images_per_s"]["fp32"] > 0
    assert set(rows["airnet"]["images_per_s"]) == {"fp32", "fp32_channels_last"}
    assert rows["airnet"]["auto"]["channels_last"] is True and rows["simple_cnn"]["auto"]["channels_last"] is False
    models.main(["--recipes", "--quick", "--json", str(tmp_path / "r.json")])
    assert "an epoch of the fast recipe costs" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert len(result["ratios"]) == 1 and result["epoch_cost_ratio"] > 0
    time_to_accuracy.main(["--quick", "--device", "cpu", "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert "epoch  2:" in out and "final test accuracy" in out
    result = json.loads((tmp_path / "t.json").read_text())
    assert [e["epoch"] for e in result["runs"][0]["epochs"]] == [1, 2]


def test_quick_peer_benchmark_runs_the_speed_run_beside_our_recipe(tmp_path, capsys):
    pytest.importorskip("airbench", reason="bench.peer needs the airbench package (pip install airbench==0.1.8)")
    import torch

    from bench import peer

    event = torch.cuda.Event
    peer.main(["--quick", "--seeds", "1", "--target", "1", "--json", str(tmp_path / "p.json")])
    assert "airbench93 over 1 seed(s)" in capsys.readouterr().out
    result = json.loads((tmp_path / "p.json").read_text())
    for side in ("peer", "ours"):
        (run,) = result[side]
        assert [e["epoch"] for e in run["epochs"]] == [1] and run["train_s"] > 0
        assert 0 <= run["accuracy"] <= 1 and 0 <= run["accuracy_tta"] <= 1
        assert run["target"]["epoch"] == 1  # 1 % is reached at once: where each side first reached --target
    # The device plumbing is undone: the next test's torch is the real one.
    assert torch.cuda.Event is event and torch.nn.Linear(1, 1).half().weight.dtype == torch.float16
