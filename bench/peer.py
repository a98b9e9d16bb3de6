"""The speed-runs beside our recipes: the `airbench` package's own training, on our data and our device.

    python -m bench.peer --data PATH --peer airbench93 --ours fast --seeds 42,2
    python -m bench.peer --data PATH --peer airbench94 --ours fast94 --seeds 42,2
    python -m bench.peer --data PATH --peer airbench94 --ours fast94 --device cuda --target 94
    python -m bench.peer --quick                       # tiny synthetic smoke run (the test suite runs it)

Needs `pip install airbench==0.1.8` (a dev dependency of this project; nothing else uses it). The peer runs
its own code with its own hyperparameters; on a CPU only the device plumbing changes, from outside:
the network stays fp32 on the CPU (its `.half().cuda()` are no-ops here) with bf16 autocast around the
forward pass where the CPU computes bf16 natively (the rule our `auto` precision follows), its CUDA event
timers become wall clocks, and the test loader it builds for itself is ours. The whitening covariance is
then fp32 as on the GPU (autocast around its whole loop stalls it at chance accuracy on a CPU). Images go
in as fp32 in [0, 1] from our uint8 arrays, where its loader would make fp16. On a CUDA device the peer
runs exactly as published (fp16, CUDA events); only its test loader is ours, holding the same images.

Prints the machine, then per run the test accuracy after each epoch, the final plain and TTA accuracy and
the training seconds: the peer's own count (whitening and epochs; its final TTA pass is listed apart) and
ours (the train loop's epochs, the whitening inside the first), when each first reached `--target`, and
the mean ± std over the seeds.
Asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from bench.bench import mean_std
from bench.time_to_accuracy import run_once
from cifar10_cnn import constants as C
from cifar10_cnn import data as datalib
from cifar10_cnn import hardware, recipes, sources, synthetic

PEERS = {"airbench93": ("train93", "make_net93"), "airbench94": ("train94", "make_net94")}


class WallClock:
    """Stands in for torch.cuda.Event(enable_timing=True): record() notes the time, elapsed_time() is in ms."""

    def __init__(self, *args, **kwargs):
        self.at = None

    def record(self, *args):
        self.at = time.perf_counter()

    def elapsed_time(self, end: WallClock) -> float:
        return 1e3 * (end.at - self.at)


def loader(images: np.ndarray, labels: np.ndarray, batch_size: int, train: bool, device: torch.device):
    """The peer's CifarLoader holding our images (uint8 NCHW): on a CPU as fp32 NCHW channels-last in [0, 1],
    on a GPU as it makes them itself (fp16)."""
    from airbench import utils
    from airbench.lib_airbench94 import hyp  # its augmentation, the same in airbench93

    with tempfile.TemporaryDirectory() as tmp:  # its constructor reads a file in its own format
        nhwc = torch.from_numpy(images.transpose(0, 2, 3, 1).copy())
        torch.save({"images": nhwc, "labels": torch.from_numpy(labels).long(), "classes": []},
                   Path(tmp) / ("train.pt" if train else "test.pt"))
        made = utils.CifarLoader(tmp, train=train, batch_size=batch_size, aug=hyp["aug"] if train else None,
                                 altflip=train, gpu=device)
    if device.type == "cpu":
        made.images = (nhwc.float() / 255).permute(0, 3, 1, 2).to(memory_format=torch.channels_last)
    return made


@contextlib.contextmanager
def plumbing(test_loader, rows: list, device: torch.device):
    """Our test loader, and on a CPU the device plumbing (see the module's docstring), undone afterwards;
    `rows` collects what the peer prints after each epoch and after its final TTA pass."""
    from airbench import utils

    def record(variables: dict, is_final_entry: bool) -> None:
        row = {k: variables.get(k) for k in ("epoch", "val_acc", "tta_val_acc", "total_time_seconds")}
        rows.append(row)
        what = (f"epoch {row['epoch'] + 1:>2}" if isinstance(row["epoch"], int) else "with its TTA")
        accuracy = row["tta_val_acc"] if row["tta_val_acc"] is not None else row["val_acc"]
        print(f"  peer {what}: {row['total_time_seconds']:7.1f} s of its timed work, test accuracy {accuracy:.2%}",
              flush=True)

    patches = [(utils, "CifarLoader", lambda *a, **k: test_loader), (utils, "print_training_details", record)]
    if device.type == "cpu":
        patches += [(torch.cuda, "Event", WallClock), (torch.cuda, "synchronize", lambda *a, **k: None),
                    (torch.nn.Module, "half", lambda self: self), (torch.nn.Module, "cuda", lambda self, *a, **k: self)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def run_peer(peer: str, ds: datalib.Cifar10, seed: int, device: torch.device, bf16: bool, quick: bool) -> dict:
    import airbench

    train_name, net_name = PEERS[peer]
    make = getattr(airbench, net_name)

    def make_net():
        net = make()
        if bf16:
            forward = net.forward
            net.forward = lambda x: _bf16(forward, x)
        return net

    batch = 100 if quick else 1024  # 1,024: the peer's own; the smoke run's few images need smaller batches
    train_loader = loader(ds.train_images, ds.train_labels, batch, train=True, device=device)
    rows: list[dict] = []
    torch.manual_seed(seed)
    with plumbing(loader(ds.test_images, ds.test_labels, 2000, train=False, device=device), rows, device):
        getattr(airbench, train_name)(train_loader, make_net=make_net, verbose=True,
                                      **({"epochs": 1} if quick else {}))
    epochs = [r for r in rows if isinstance(r["epoch"], int)]
    final = rows[-1]
    return {"epochs": [{"epoch": r["epoch"] + 1, "accuracy": r["val_acc"], "train_s": r["total_time_seconds"]}
                       for r in epochs],
            "accuracy": epochs[-1]["val_acc"], "accuracy_tta": final["tta_val_acc"],
            "train_s": epochs[-1]["total_time_seconds"], "with_tta_s": final["total_time_seconds"]}


def _bf16(forward, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return forward(x).float()


def run_ours(recipe: str, overrides: dict, ds: datalib.Cifar10, seed: int, device: torch.device, quick: bool) -> dict:
    config, _ = hardware.decide(recipes.resolve(recipe, overrides), hardware.capabilities(device))
    if quick:
        config = replace(config, epochs=1, batch_size=100, warmup_epochs=1)
    rows = run_once(ds, replace(config, seed=seed), device, recipes.tta_level("auto", recipe))
    return {"epochs": [{"epoch": r["epoch"], "accuracy": r["accuracy"], "train_s": r["train_s"]} for r in rows],
            "accuracy": rows[-1]["accuracy"], "accuracy_tta": rows[-1].get("accuracy_tta"),
            "train_s": rows[-1]["train_s"], "precision": config.precision}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="auto")
    parser.add_argument("--peer", default="airbench93", choices=list(PEERS))
    parser.add_argument("--ours", default="fast", choices=list(recipes.RECIPES))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override a hyperparameter of our recipe, as -P does (repeatable)")
    parser.add_argument("--seeds", default="42,2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the peer as published (fp16)")
    parser.add_argument("--target", type=float, default=94.0, help="test accuracy in percent whose first "
                        "epoch is reported for both")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    try:
        import airbench  # noqa: F401
    except ImportError:
        parser.error("the peer needs the airbench package: pip install airbench==0.1.8")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            path = synthetic.write_archive(Path(tmp) / C.ARCHIVE_NAME, synthetic.batch_files(100, 200))
            ds = datalib.read(sources.Source(path, "archive", str(path)), None)
        else:
            ds = datalib.read(sources.resolve_source(args.data, sources.cache_dir()))
    device = hardware.select_device(args.device)
    caps = hardware.capabilities(device)
    bf16 = device.type == "cpu" and caps.native_bf16
    how = (f"as published, on {hardware.describe(caps)}" if device.type != "cpu" else
           f"in {'fp32 + bf16 autocast' if bf16 else 'fp32'} (the CPU {'has' if bf16 else 'has no'} native bf16)")
    print(f"{hardware.machine_line()}; peer {args.peer} {how}, ours {args.ours}")
    overrides = dict(item.split("=", 1) for item in args.set)
    results = {"peer": [], "ours": []}
    for seed in (int(s) for s in args.seeds.split(",")):
        for side in ("peer", "ours"):
            result = {"seed": seed, **(run_peer(args.peer, ds, seed, device, bf16, args.quick) if side == "peer"
                                       else run_ours(args.ours, overrides, ds, seed, device, args.quick))}
            result["target"] = next(({"epoch": e["epoch"], "train_s": e["train_s"]} for e in result["epochs"]
                                     if 100 * e["accuracy"] >= args.target), None)
            results[side].append(result)
            name = args.peer if side == "peer" else args.ours
            curve = " ".join(f"{100 * e['accuracy']:.2f}" for e in result["epochs"])
            tta = "-" if result["accuracy_tta"] is None else f"{100 * result['accuracy_tta']:.2f}"
            print(f"{name:>10} seed {seed}: after each epoch {curve}; final {100 * result['accuracy']:.2f} / {tta} % "
                  f"(plain / TTA) in {len(result['epochs'])} epochs, {result['train_s']:.1f} s of training; "
                  + (f"{args.target:g} % not reached" if result["target"] is None else
                     f"{args.target:g} % after epoch {result['target']['epoch']}, {result['target']['train_s']:.1f} s"),
                  flush=True)
    for side, rows in results.items():
        name = args.peer if side == "peer" else args.ours
        tta = [100 * r["accuracy_tta"] for r in rows if r["accuracy_tta"] is not None]
        print(f"{name:>10} over {len(rows)} seed(s): plain {mean_std(100 * r['accuracy'] for r in rows)} %, "
              f"TTA {mean_std(tta) if tta else '-'} %, training {mean_std(r['train_s'] for r in rows)} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": hardware.machine_line(), **results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
