"""Training throughput of every model, as the train step runs it (one optimizer step per batch).

    python -m bench.models                      # all models, fp32 and bf16 + channels-last, on this machine
    python -m bench.models --device cuda        # on a GPU
    python -m bench.models --quick              # two tiny measurements (the test suite runs it)

Random inputs: speed does not depend on the pixels. Prints images/s and the seconds an epoch of
50,000 images would take, so a time-to-accuracy row can be planned before it is run. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from cifar10_cnn import models, recipes, training

EPOCH_IMAGES = 50_000


def images_per_second(name: str, precision: str, channels_last: bool, batch: int, steps: int,
                      device: torch.device) -> float:
    """Median of `steps` timed optimizer steps (after 2 warm-up steps) -> images per second."""
    config = replace(recipes.RECIPES["fast"], model=name, batch_size=batch, precision=precision,
                     channels_last=channels_last, epochs=1)
    torch.manual_seed(0)
    net = models.build(name).to(device).train()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = training.make_optimizer(net, config)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        x = models.normalize(training.flip_crop(images, 4, generator)).contiguous(memory_format=memory_format)
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    device = training.select_device(args.device)
    names = ["simple_cnn", "fastnet"] if args.quick else list(models.MODELS)
    settings = [("fp32", False)] if args.quick else [("fp32", False), ("bf16", True)]
    batch, steps = (16, 2) if args.quick else (args.batch, args.steps)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "no GPU"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}; torch "
          f"{torch.__version__}; device {device}, batch {batch}, median of {steps} steps")
    print(f"{'model':<11} {'parameters':>11}  " + "  ".join(f"{p + (' +CL' if cl else ''):>22}" for p, cl in settings))
    rows = {}
    for name in names:
        n = models.count_parameters(models.build(name))
        rates = {f"{p}{'_channels_last' if cl else ''}": images_per_second(name, p, cl, batch, steps, device)
                 for p, cl in settings}
        rows[name] = {"parameters": n, "images_per_s": rates}
        cells = "  ".join(f"{r:>9,.0f} img/s {EPOCH_IMAGES / r:>6,.0f} s/ep" for r in rates.values())
        print(f"{name:<11} {n:>11,}  {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
