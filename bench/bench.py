"""Side-by-side benchmark: the seed's recipe against ours, the whole `mlflow run`, and inference.

    python -m bench.bench                 # data as the recipe finds it ($CIFAR10_ARCHIVE, data/, download)
    python -m bench.bench --data PATH     # an archive or an extracted folder
    python -m bench.bench --quick         # smoke run on small synthetic data (the test suite runs it)

Everything runs in one invocation on one machine, so the ratios compare like with like; on a noisy
machine compare ratios, not absolute numbers. It prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import bookkeeping, seed_recipe
from cifar10_cnn import constants as C
from cifar10_cnn import data as datalib
from cifar10_cnn import evaluation, export, models, recipes, sources, synthetic, training

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def load(args) -> tuple[datalib.Cifar10, Path, str]:
    """The dataset, the archive or folder it came from, and the expected_records to pass on."""
    if args.quick:
        path = synthetic.write_archive(Path(args.workdir) / C.ARCHIVE_NAME, synthetic.batch_files(200, 500))
        return datalib.read(sources.Source(path, "archive", str(path)), None), path, "any"
    cache = Path(os.environ.get(C.CACHE_DIR_ENV, ROOT / C.DEFAULT_CACHE_DIR))
    source = sources.resolve_source(args.data, cache)
    return datalib.read(source), source.path, "50000,10000"


def mean_std(values) -> str:
    values = list(values)
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def bench_seed(ds, epochs) -> dict:
    secs, loss, acc = seed_recipe.train_and_test(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels,
                                                 epochs=epochs)
    n = len(ds.train_labels)
    return {"epoch_s": secs, "images_per_s": n * len(secs) / sum(secs), "train_s": sum(secs), "loss": loss,
            "accuracy": acc}


def bench_ours(ds, epochs, device="cpu") -> tuple[dict, torch.nn.Module]:
    config = recipes.TrainConfig(epochs=epochs)
    net = models.build(config.model, seed=config.seed)
    target = torch.device(device)
    history = training.train(net, torch.from_numpy(ds.train_images), torch.from_numpy(ds.train_labels).long(),
                             config, target)
    model = models.RawPixelClassifier(net.eval()).to(target)
    logits = evaluation.predict_logits(model, torch.from_numpy(ds.test_images).to(target).permute(0, 2, 3, 1))
    result = evaluation.evaluate(logits, torch.from_numpy(ds.test_labels), C.NUM_CLASSES)
    secs = [h.seconds for h in history]
    n = len(ds.train_labels)
    return ({"epoch_s": secs, "images_per_s": n * len(secs) / sum(secs), "train_s": sum(secs),
             "loss": history[-1].loss, "accuracy": result.accuracy}, model.cpu())


def bench_interleaved(ds, rounds: int, block: int) -> dict:
    """Training throughput of (a) and (b) in alternating blocks of `block` images, each through its real
    code path: drifts in machine speed then hit both sides alike. Returns per-round images/s."""
    x, y = ds.train_images[:block], ds.train_labels[:block]
    seed, ours = [], []
    for _ in range(rounds):
        secs, _, _ = seed_recipe.train_and_test(x, y, ds.test_images[:32], ds.test_labels[:32], epochs=1)
        seed.append(len(y) / secs[0])
        history = training.train(models.build("simple_cnn"), torch.from_numpy(x), torch.from_numpy(y).long(),
                                 recipes.TrainConfig(epochs=1), torch.device("cpu"))
        ours.append(history[0].images_per_s)
    ratios = sorted(o / s for o, s in zip(ours, seed, strict=True))
    return {"seed_images_per_s": seed, "ours_images_per_s": ours, "ratios": ratios,
            "median_ratio": statistics.median(ratios), "block_images": len(y)}


def bench_mlflow_run(archive: Path, expected: str, epochs: int, workdir: Path) -> dict:
    """The whole recipe as a user runs it, in a fresh tracking store; per-step times from the store."""
    store = workdir / "store"
    store.mkdir()
    wall, steps = bookkeeping.timed_mlflow_run(ROOT, store, [f"epochs={epochs}", f"data={archive}",
                                                             f"expected_records={expected}", "model_name=bench"])
    return {"wall_s": wall, "step_s": {name: bookkeeping.seconds(r) for name, r in steps.items()},
            "train_peak_rss_mib": steps["train"].data.metrics.get("peak_rss_mib"),
            "train_epochs_s": bookkeeping.epoch_seconds(steps["train"])}


def latency(fn, batch: np.ndarray, calls: int) -> list[float]:
    return export.call_times(fn, batch, calls, warmup=max(10, calls // 10))


def bench_inference(model, ds, calls: int) -> dict:
    images = np.ascontiguousarray(ds.test_images.transpose(0, 2, 3, 1))
    proto = export.to_onnx(model, torch.from_numpy(images[:8]))
    predictors = {"pytorch eager": export.torch_predictor(model),
                  "onnx runtime": export.onnx_predictor(export.session(proto))}
    out = {}
    for name, fn in predictors.items():
        b1 = latency(fn, images[:1], calls)
        b256 = latency(fn, np.resize(images, (256, *images.shape[1:])), max(20, calls // 20))
        out[name] = {"b1_images_per_s": 1 / statistics.median(b1), "b1_median_ms": statistics.median(b1) * 1e3,
                     "b1_p99_ms": float(np.percentile(b1, 99)) * 1e3,
                     "b256_images_per_s": 256 / statistics.median(b256)}
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def report(r: dict) -> str:
    seed, ours, run, inf = r["seed"], r["ours"], r.get("mlflow_run"), r["inference"]
    rows = [
        f"machine: {r['machine']}",
        f"data: {r['data']}  ({r['train_images']:,} train / {r['test_images']:,} test images, {r['epochs']} epochs, "
        "batch 32, Adam 1e-3, seed 42)",
        "",
        "| training (CPU) | images/s | s/epoch (mean ± std) | train s | final loss | test accuracy |",
        "|---|---|---|---|---|---|",
        f"| (a) seed recipe (PIL per sample, DataLoader) | {seed['images_per_s']:,.0f} | {mean_std(seed['epoch_s'])} | "
        f"{seed['train_s']:.1f} | {seed['loss']:.4f} | {seed['accuracy']:.2%} |",
        f"| (b) our train step (uint8 tensor in memory) | {ours['images_per_s']:,.0f} | {mean_std(ours['epoch_s'])} | "
        f"{ours['train_s']:.1f} | {ours['loss']:.4f} | {ours['accuracy']:.2%} |",
        f"| ratio b/a | {ours['images_per_s'] / seed['images_per_s']:.2f}x | | | | "
        f"{(ours['accuracy'] - seed['accuracy']) * 100:+.2f} points |",
    ]
    if r.get("gpu"):
        g = r["gpu"]
        rows.append(f"| (b) on {g['device']} | {g['images_per_s']:,.0f} | {mean_std(g['epoch_s'])} | "
                    f"{g['train_s']:.1f} | {g['loss']:.4f} | {g['accuracy']:.2%} |")
    else:
        rows.append("| (b) on CUDA | no CUDA device on this machine | | | | |")
    il = r["interleaved"]
    rows += [
        "",
        f"interleaved ({len(il['ratios'])} rounds of {il['block_images']:,} images, (a) then (b) each round): "
        f"(a) {statistics.median(il['seed_images_per_s']):,.0f} vs "
        f"(b) {statistics.median(il['ours_images_per_s']):,.0f} images/s (medians); "
        f"ratio b/a median **{il['median_ratio']:.2f}x** "
        f"(min {il['ratios'][0]:.2f}, max {il['ratios'][-1]:.2f})",
        "",
    ]
    if run:
        steps = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(run["step_s"].items(), key=lambda kv: kv[0] != "main"))
        rows += [
            f"whole `mlflow run . -P epochs={r['epochs']}` (4 steps + registration, fresh store): "
            f"{run['wall_s']:.1f} s = **{run['wall_s'] / seed['train_s']:.2f}x** the seed recipe's training time "
            f"alone ({seed['train_s']:.1f} s)",
            f"  runs as recorded by MLflow: {steps}; of train, {run['train_epochs_s']:.1f} s are epochs",
            f"  train step peak RSS: {run['train_peak_rss_mib']:.0f} MiB",
            "",
        ]
    rows += [
        "| inference | batch 1 images/s | batch 1 median ms | batch 1 p99 ms | batch 256 images/s |",
        "|---|---|---|---|---|",
    ]
    for name, v in inf.items():
        rows.append(f"| {name} | {v['b1_images_per_s']:,.0f} | {v['b1_median_ms']:.3f} | {v['b1_p99_ms']:.3f} | "
                    f"{v['b256_images_per_s']:,.0f} |")
    e, o = inf["pytorch eager"], inf["onnx runtime"]
    rows.append(f"| ratio ORT/eager | **{o['b1_images_per_s'] / e['b1_images_per_s']:.2f}x** | | | "
                f"{o['b256_images_per_s'] / e['b256_images_per_s']:.2f}x |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="auto", help="as the recipe's data parameter (default: auto)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small synthetic data, 1 epoch: a smoke run")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--no-run", action="store_true",
                        help="leave out the whole `mlflow run` (python -m bench.bookkeeping times it on its own)")
    args = parser.parse_args(argv)
    epochs = 1 if args.quick else args.epochs
    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        ds, path, expected = load(args)
        print(f"benchmarking on {path} ({epochs} epochs) …", file=sys.stderr, flush=True)
        results = {"machine": machine(), "data": "synthetic (--quick)" if args.quick else str(path),
                   "train_images": len(ds.train_labels), "test_images": len(ds.test_labels), "epochs": epochs}
        results["interleaved"] = bench_interleaved(ds, rounds=3 if args.quick else 8,
                                                   block=min(len(ds.train_labels), 6400))
        results["seed"] = bench_seed(ds, epochs)
        results["ours"], model = bench_ours(ds, epochs)
        if torch.cuda.is_available():
            results["gpu"], _ = bench_ours(ds, epochs, device="cuda")
            results["gpu"]["device"] = torch.cuda.get_device_name()
        results["inference"] = bench_inference(model, ds, calls=100 if args.quick else 2000)
        if not args.no_run:
            results["mlflow_run"] = bench_mlflow_run(path, expected, epochs, Path(workdir))
    print(report(results), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
