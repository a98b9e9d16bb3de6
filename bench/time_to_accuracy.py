"""Time to accuracy: train a recipe and score the test set after every epoch, without MLflow.

    python -m bench.time_to_accuracy --data PATH                     # recipe fast on this machine
    python -m bench.time_to_accuracy --data PATH --device cuda --runs 3 --target 94
    python -m bench.time_to_accuracy --quick                         # tiny synthetic smoke run

Prints the machine first (CPU model and the features that decide precision: AVX-512, AVX512_BF16, AMX,
VNNI; threads; torch), then the precision and memory format the recipe's `auto` chose there, then one
line per epoch with the test accuracy (with the recipe's test-time augmentation after the last). Training
seconds are the train loop's own epoch times (the train step's `epoch_seconds`); scoring the test set
after each epoch is not counted. Per run: when the target accuracy was first reached. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

import torch

from bench.bench import mean_std
from cifar10_cnn import constants as C
from cifar10_cnn import data as datalib
from cifar10_cnn import evaluation, hardware, models, recipes, sources, synthetic, training


def run_once(ds: datalib.Cifar10, config: recipes.TrainConfig, device: torch.device, tta: str) -> list[dict]:
    net = models.build(config.model, seed=config.seed)
    test_images = torch.from_numpy(ds.test_images).to(device).permute(0, 2, 3, 1)  # NHWC, as served
    test_labels = torch.from_numpy(ds.test_labels)
    rows, elapsed, planned = [], [0.0], [config.epochs]

    def on_epoch(r: training.EpochResult) -> None:
        elapsed[0] += r.seconds
        net.eval()
        model = models.RawPixelClassifier(net)
        scored = {}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            for key, level in (("accuracy", "false"), ("accuracy_tta", tta)):
                if key == "accuracy_tta" and (tta == "false" or r.epoch < planned[0]):
                    continue  # six passes of the network: the last epoch only
                logits = evaluation.predict_logits(evaluation.with_tta(model, level, h_dim=1, w_dim=2), test_images)
                scored[key] = evaluation.evaluate(logits, test_labels, C.NUM_CLASSES).accuracy
        net.train()
        rows.append({"epoch": r.epoch, "train_s": elapsed[0], "train_loss": r.loss, **scored})
        extra = f", with TTA ({tta}) {scored['accuracy_tta']:.2%}" if "accuracy_tta" in scored else ""
        print(f"  epoch {r.epoch:>2}: {elapsed[0]:7.1f} s of training, test accuracy {scored['accuracy']:.2%}{extra}",
              flush=True)

    training.train(net, torch.from_numpy(ds.train_images), torch.from_numpy(ds.train_labels).long(), config, device,
                   on_epoch, on_plan=lambda plan: planned.__setitem__(0, plan.epochs))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.time_to_accuracy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--recipe", default="fast", choices=list(recipes.RECIPES))
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=1, help="seeds 0..runs-1 (the recipe's seed when 1)")
    parser.add_argument("--seeds", help="comma-separated seeds to run instead of --runs")
    parser.add_argument("--target", type=float, default=85.0, help="test accuracy in percent")
    parser.add_argument("--tta", default="auto", help="false, flip or crops (auto: the recipe's)")
    parser.add_argument("--budget-minutes", type=float, help="train with this time budget instead of epochs")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a hyperparameter of the recipe, as -P does (repeatable)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = hardware.select_device(args.device)
    config = recipes.resolve(args.recipe, dict(item.split("=", 1) for item in args.set))
    if args.epochs:
        config = replace(config, epochs=args.epochs, warmup_epochs=min(config.warmup_epochs, args.epochs))
    if args.budget_minutes:
        config = replace(config, budget_minutes=args.budget_minutes)
    caps = hardware.capabilities(device)
    config, why = hardware.decide(config, caps)
    tta = recipes.tta_level(args.tta, args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            path = synthetic.write_archive(Path(tmp) / C.ARCHIVE_NAME, synthetic.batch_files(100, 200))
            ds = datalib.read(sources.Source(path, "archive", str(path)), None)
            config = replace(config, epochs=2, batch_size=64, warmup_epochs=1)
        else:
            ds = datalib.read(sources.resolve_source(args.data, sources.cache_dir()))
    print(f"{hardware.machine_line()}; device {hardware.describe(caps) if caps.device != 'cpu' else 'the CPU'}")
    print(f"precision {config.precision}, channels_last {config.channels_last}" +
          "".join(f"; {k}: {v}" for k, v in why.items()))
    print(f"recipe {args.recipe}: {asdict(config)}; test-time augmentation: {tta}")
    seeds = ([int(x) for x in args.seeds.split(",")] if args.seeds else
             [config.seed] if args.runs == 1 else list(range(args.runs)))
    results = []
    for seed in seeds:
        print(f"seed {seed}")
        rows = run_once(ds, replace(config, seed=seed), device, tta=tta)
        reached = next((r["train_s"] for r in rows if 100 * r["accuracy"] >= args.target), None)
        results.append({"seed": seed, "epochs": rows, "seconds_to_target": reached})
    finals = [100 * r["epochs"][-1]["accuracy"] for r in results]
    times = [r["epochs"][-1]["train_s"] for r in results]
    if tta != "false":
        print(f"final test accuracy with TTA ({tta}) "
              f"{mean_std([100 * r['epochs'][-1]['accuracy_tta'] for r in results])} %")
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
