"""Training throughput of every model, as the train step runs it (one optimizer step per batch).

    python -m bench.models                      # all models: fp32, fp32 + channels-last, bf16 + channels-last
    python -m bench.models --device cuda        # on a GPU
    python -m bench.models --recipes            # an epoch of the fast recipe vs FastNet's recipe, side by side
    python -m bench.models --quick              # tiny measurements (the test suite runs it)

Random inputs: speed does not depend on the pixels. Prints images/s and the seconds an epoch of
50,000 images would take, and what the fast recipe's `auto` picks for each model on this machine
(hardware.py), so a time-to-accuracy row can be planned before it is run. Asserts nothing.

--recipes alternates one-epoch trainings of the two recipes on the same block of real-sized images
(rounds after a warm-up round), so a drift in machine speed hits both alike; the ratio is the figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cifar10_cnn import augment, hardware, models, optimizers, recipes, synthetic, training

EPOCH_IMAGES = 50_000
# The fast recipe as it was before AirNet (2026-11, FastNet 48/96/192), for the epoch-cost comparison; its
# bf16 is left to `auto` here, as any recipe's should be.
FASTNET_RECIPE = recipes.TrainConfig(
    model="fastnet", epochs=1, batch_size=512, learning_rate=0.4, optimizer="sgd", weight_decay=5e-4,
    lr_schedule="onecycle", label_smoothing=0.2, augment=True, precision=recipes.HARDWARE,
    channels_last=recipes.HARDWARE)


def images_per_second(name: str, precision: str, channels_last: bool, batch: int, steps: int,
                      device: torch.device) -> float:
    """Median of `steps` timed optimizer steps (after 2 warm-up steps) -> images per second."""
    config = replace(recipes.RECIPES["fast"], model=name, batch_size=batch, precision=precision,
                     channels_last=channels_last, epochs=1)
    torch.manual_seed(0)
    net = models.build(name).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = optimizers.make_optimizer(net, config)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        x = models.normalize(augment.flip_crop(images, config.crop_padding, generator))
        x = x.contiguous(memory_format=memory_format)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.cross_entropy(net(x), labels, label_smoothing=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    times.sort()
    return batch / times[len(times) // 2]


def recipe_epochs(device: torch.device, images: int, rounds: int) -> dict:
    """images/s of one-epoch trainings of FASTNET_RECIPE and the fast recipe, alternating, after a warm-up."""
    caps = hardware.capabilities(device)
    configs = {"fastnet (recipe before)": FASTNET_RECIPE, "fast": replace(recipes.RECIPES["fast"], epochs=1,
                                                                       warmup_epochs=0.23)}
    configs = {k: hardware.decide(c, caps)[0] for k, c in configs.items()}
    labels = torch.arange(images) % 10
    x = torch.from_numpy(synthetic.images_for(labels.numpy(), np.random.default_rng(0)))
    rates: dict[str, list[float]] = {k: [] for k in configs}
    for i in range(rounds + 1):
        for name, config in configs.items():
            history = training.train(models.build(config.model, seed=0), x, labels, config, device)
            if i:  # round 0 pays one-off set-up
                rates[name].append(history[0].images_per_s)
        if i:
            print(f"  round {i}: " + ", ".join(f"{k} {v[-1]:,.0f} img/s" for k, v in rates.items()), flush=True)
    ratios = sorted(a / b for a, b in zip(*rates.values(), strict=True))
    return {"configs": {k: str(c) for k, c in configs.items()}, "images_per_s": rates,
            "epoch_cost_ratio": ratios[len(ratios) // 2], "ratios": ratios}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--models", help="comma-separated (default: all)")
    parser.add_argument("--recipes", action="store_true", help="compare recipe epochs instead of models")
    parser.add_argument("--rounds", type=int, default=4, help="--recipes: timed rounds")
    parser.add_argument("--images", type=int, default=8192, help="--recipes: images per one-epoch training")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = hardware.select_device(args.device)
    caps = hardware.capabilities(device)
    print(f"date {datetime.date.today()}; {hardware.describe(caps)}, {os.cpu_count()} cores; torch "
          f"{torch.__version__}")
    if args.recipes:
        images, rounds = (256, 1) if args.quick else (args.images, args.rounds)
        result = recipe_epochs(device, images, rounds)
        print(f"an epoch of the fast recipe costs {result['epoch_cost_ratio']:.2f}x one of FastNet's recipe "
              f"(median of {rounds} rounds of {images:,} images; each ratio: "
              + ", ".join(f"{r:.2f}" for r in result["ratios"]) + ")")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    names = args.models.split(",") if args.models else ["simple_cnn", "airnet"] if args.quick else list(models.MODELS)
    settings = [("fp32", False), ("fp32", True)] if args.quick else [("fp32", False), ("fp32", True), ("bf16", True)]
    batch, steps = (16, 2) if args.quick else (args.batch, args.steps)
    print(f"device {device}, batch {batch}, median of {steps} steps")
    print(f"{'model':<11} {'parameters':>11}  " + "  ".join(f"{p + (' +CL' if cl else ''):>22}" for p, cl in settings)
          + "   auto picks")
    rows = {}
    for name in names:
        n = models.count_parameters(models.build(name))
        rates = {f"{p}{'_channels_last' if cl else ''}": images_per_second(name, p, cl, batch, steps, device)
                 for p, cl in settings}
        auto = hardware.decide(replace(recipes.RECIPES["fast"], model=name), caps)[0]
        rows[name] = {"parameters": n, "images_per_s": rates,
                      "auto": {"precision": auto.precision, "channels_last": auto.channels_last}}
        cells = "  ".join(f"{r:>9,.0f} img/s {EPOCH_IMAGES / r:>6,.0f} s/ep" for r in rates.values())
        print(f"{name:<11} {n:>11,}  {cells}   {auto.precision}{' +CL' if auto.channels_last else ''}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
