"""Time to accuracy: train a recipe and score the test set after every epoch, without MLflow.

    python -m bench.time_to_accuracy --data PATH                     # recipe fast on this machine
    python -m bench.time_to_accuracy --data PATH --device cuda --runs 3 --target 94
    python -m bench.time_to_accuracy --quick                         # tiny synthetic smoke run

Training seconds are the train loop's own epoch times (the same as the train step's `epoch_seconds`);
scoring the test set after each epoch is not counted. Prints one line per epoch and, per run, when the
target accuracy was first reached. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.bench import mean_std
from cifar10_cnn import constants as C
from cifar10_cnn import data as datalib
from cifar10_cnn import evaluation, models, recipes, synthetic, training


def run_once(ds: datalib.Cifar10, config: recipes.TrainConfig, device: torch.device, tta: bool) -> list[dict]:
    training.seed_everything(config.seed)
    net = models.build(config.model)
    test_images = torch.from_numpy(ds.test_images).to(device).permute(0, 2, 3, 1)  # NHWC, as served
    test_labels = torch.from_numpy(ds.test_labels)
    rows, elapsed = [], [0.0]

    def on_epoch(r: training.EpochResult) -> None:
        elapsed[0] += r.seconds
        net.eval()
        model = models.RawPixelClassifier(net)
        scored = {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            for key, fn in (("accuracy", model), ("accuracy_tta", evaluation.with_flip(model, width_dim=2))):
                if key == "accuracy_tta" and not tta:
                    continue
                logits = evaluation.predict_logits(fn, test_images)
                scored[key] = evaluation.evaluate(logits, test_labels, C.NUM_CLASSES).accuracy
        net.train()
        rows.append({"epoch": r.epoch, "train_s": elapsed[0], "train_loss": r.loss, **scored})
        extra = f", with flip TTA {scored['accuracy_tta']:.2%}" if tta else ""
        print(f"  epoch {r.epoch:>2}: {elapsed[0]:7.1f} s of training, test accuracy {scored['accuracy']:.2%}{extra}",
              flush=True)

    training.train(net, torch.from_numpy(ds.train_images), torch.from_numpy(ds.train_labels).long(), config, device,
                   on_epoch)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--recipe", default="fast", choices=list(recipes.RECIPES))
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=1, help="seeds 0..runs-1 (the recipe's seed when 1)")
    parser.add_argument("--target", type=float, default=85.0, help="test accuracy in percent")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = training.select_device(args.device)
    config = recipes.RECIPES[args.recipe]
    if args.epochs:
        config = replace(config, epochs=args.epochs, warmup_epochs=min(config.warmup_epochs, args.epochs))
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            path = synthetic.write_archive(Path(tmp) / C.ARCHIVE_NAME, synthetic.batch_files(100, 200))
            ds = datalib.read(datalib.Source(path, "archive", str(path)), None)
            config = replace(config, epochs=2, batch_size=64, warmup_epochs=1)
        else:
            cache = Path(os.environ.get(C.CACHE_DIR_ENV, C.DEFAULT_CACHE_DIR))
            ds = datalib.read(datalib.resolve_source(args.data, cache))
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch "
          f"{torch.__version__}; recipe {args.recipe}: {asdict(config)}")
    seeds = [config.seed] if args.runs == 1 else list(range(args.runs))
    results = []
    for seed in seeds:
        print(f"seed {seed}")
        rows = run_once(ds, replace(config, seed=seed), device, tta=not args.no_tta)
        reached = next((r["train_s"] for r in rows if 100 * r["accuracy"] >= args.target), None)
        results.append({"seed": seed, "epochs": rows, "seconds_to_target": reached})
    finals = [100 * r["epochs"][-1]["accuracy"] for r in results]
    times = [r["epochs"][-1]["train_s"] for r in results]
    print(f"final test accuracy {mean_std(finals)} %, training {mean_std(times)} s over {len(seeds)} run(s); "
          f"{args.target:g} % reached in: "
          + ", ".join("not reached" if r["seconds_to_target"] is None else f"{r['seconds_to_target']:.1f} s"
                      for r in results))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": asdict(config), "device": str(device), "runs": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
