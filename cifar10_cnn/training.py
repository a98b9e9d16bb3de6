"""The training loop: the whole training set in memory as one uint8 tensor, batches drawn by index.

No DataLoader, no PIL, no worker processes: a batch is `images[idx]` followed by one fused
normalize on the training device, which is where the seed's recipe spent most of its time.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import models
from .errors import CheckFailed, UserError
from .progress import bar
from .recipes import TrainConfig

CHECKPOINT_FORMAT = 2  # bump when the checkpoint's keys change
WHITENING_IMAGES = 5000  # training images whose patch statistics set a whitening stem (FastNet, AirNet)
# Lookahead (config.lookahead), as the speed-runs do it: plain SGD for the first epochs, then every few steps
# the weights move to a running average of themselves whose memory grows towards the end of training.
LOOKAHEAD_START_EPOCH = 3  # epochs of plain SGD before the average starts
LOOKAHEAD_EVERY_IMAGES = 5 * 1024  # training images between two pulls towards the average (airbench: 5 steps)
LOOKAHEAD_DECAY = 0.95**5  # the average's decay per pull at the end of training; (progress ** 3) of it before
TRIANGLE = (0.2, 0.07)  # lr_schedule triangle: the factor it starts from and the one it ends at
BUDGET_PROBE_STEPS = 3  # timed steps (after one untimed) that measure the speed a time budget is planned from


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    loss: float  # mean cross-entropy over the epoch's training images
    accuracy: float  # fraction of the epoch's training images classified right (in train mode)
    seconds: float
    images_per_s: float


class Diverged(CheckFailed):
    """The loss became NaN or infinite: the run must fail rather than log garbage."""


def select_device(requested: str) -> torch.device:
    """'auto' takes CUDA, then MPS, then the CPU; an explicit device must exist."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if requested == "cuda" and not cuda:
        raise UserError("device 'cuda' was requested but torch sees no CUDA GPU on this machine")
    if requested == "mps" and not mps:
        raise UserError("device 'mps' was requested but the Apple MPS backend is not available here")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# --- several processes (torchrun): one shard of every global batch each, gradients averaged by DDP ----


def distributed() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when it runs alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment: NCCL on CUDA, gloo on the CPU."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return distributed()
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return distributed()


def leave_distributed() -> None:
    """Tear down this process's group, if it joined one, before the interpreter exits."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(payload=None):
    """Rank 0's `payload` on every rank (pickled; None tells the others that rank 0 gave up)."""
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def param_groups(net: nn.Module, config: TrainConfig) -> list[dict]:
    """The trainable parameters in groups: weights (decayed), batch-norm parameters (bias_lr_scale x the
    rate), a whitening stem's bias (frozen after the model's stem_bias_epochs), the rest (not decayed).

    Batch-norm parameters decay by as much per step as the weights do (weight_decay / bias_lr_scale at
    bias_lr_scale x the rate), as in airbench: a larger rate must not mean a stronger pull to zero.
    """
    norm = {id(p) for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()}
    stem = getattr(net, "stem", None) if hasattr(net, "stem_bias_epochs") else None
    stem_bias = {id(stem.bias)} if stem is not None and stem.bias is not None else set()
    groups: dict[str, list] = {"weights": [], "norm": [], "stem_bias": [], "other": []}
    for p in net.parameters():
        if p.requires_grad:
            key = ("stem_bias" if id(p) in stem_bias else "norm" if id(p) in norm else
                   "weights" if p.ndim > 1 else "other")
            groups[key].append(p)
    lr, wd = config.learning_rate, config.weight_decay
    scale = config.bias_lr_scale
    options = {"weights": {"lr": lr, "weight_decay": wd}, "norm": {"lr": lr * scale, "weight_decay": wd / scale},
               "stem_bias": {"lr": lr}, "other": {"lr": lr}}
    return [{"params": ps, "name": key, **options[key]} for key, ps in groups.items() if ps]


def make_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(net, config)
    if config.optimizer == "muon":  # the conv filter banks by Muon at filter_lr; the rest as with sgd
        from .muon import Muon

        split = []
        for g in groups:
            filters = [p for p in g["params"] if p.ndim == 4] if g["name"] == "weights" else []
            rest = [p for p in g["params"] if not any(p is f for f in filters)]
            if filters:
                split.append({"params": filters, "name": "filters", "lr": config.filter_lr, "orthogonal": True})
            if rest:
                split.append({**g, "params": rest})
        return Muon(split, momentum=config.momentum)
    if not config.weight_decay and config.bias_lr_scale == 1 and not any(g["name"] == "stem_bias" for g in groups):
        groups = [p for g in groups for p in g["params"]]  # one group: exactly the seed's optimizer
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=config.momentum, nesterov=True,
                               foreach=True)
    # foreach: one kernel per operation across all parameters, and bit for bit the update of the default
    # (per-tensor) Adam the seed used. fused=True is faster still but rounds differently: not the seed's.
    return torch.optim.Adam(groups, lr=config.learning_rate, foreach=True)


def lr_factor(config: TrainConfig, steps_per_epoch: int, total: int | None = None) -> Callable[[int], float]:
    """Step number -> multiplier of learning_rate: linear warm-up, then the schedule's shape.

    `total` steps (default: epochs x steps_per_epoch) stretches the recipe's shape to another length,
    the warm-up keeping its share of the training: how a time budget lays out its schedule.
    """
    if total is None or total == config.epochs * steps_per_epoch:
        total, warmup = config.epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch)
    else:
        warmup = round(config.warmup_epochs / config.epochs * total)

    def factor(step: int) -> float:
        if config.lr_schedule == "triangle":  # up from TRIANGLE[0] to 1, then down to TRIANGLE[1]
            start, end = TRIANGLE
            if step < warmup:
                return start + (1 - start) * step / warmup
            return 1 + (end - 1) * min((step - warmup) / max(total - warmup, 1), 1.0)
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)  # 0 -> 1 after the warm-up
        if config.lr_schedule == "onecycle":
            return max(1.0 - progress, 0.0)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # cosine

    return factor


def group_factors(optimizer: torch.optim.Optimizer, net: nn.Module, factor: Callable[[int], float],
                  steps_per_epoch: int) -> list[Callable[[int], float]]:
    """One schedule per parameter group: the stem's bias stops learning after the model's stem_bias_epochs."""
    frozen_at = getattr(net, "stem_bias_epochs", 0) * steps_per_epoch
    return [(lambda step: factor(step) if step < frozen_at else 0.0) if g.get("name") == "stem_bias" else factor
            for g in optimizer.param_groups]


class Lookahead:
    """A running average of the weights (and batch-norm statistics) that the network is pulled onto.

    At the end of every epoch the network is set to the average, so a checkpoint holds all of its state.
    """

    def __init__(self, net: nn.Module):
        self.average = {k: v.detach().clone() for k, v in net.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def pull(self, net: nn.Module, decay: float) -> None:
        state = net.state_dict()
        for key, average in self.average.items():
            average.lerp_(state[key], 1 - decay)
            state[key].copy_(average)


def reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions outside 0..size-1 mirrored back in, the edge pixel not repeated (like reflect padding)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def flip_crop(images: torch.Tensor, padding: int, generator: torch.Generator,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """Random crops of the reflect-padded batch and horizontal flips, uint8 `[B, 3, H, W]` in and out.

    Each image moves by up to `padding` pixels each way; the gap is filled with the image mirrored at its
    edge, as the speed-runs do, so that no training image has the black border no test image has. One
    gather for the whole batch on its own device, no padded copy; the random numbers come from a CPU
    generator so that a seed gives the same augmentation on every device. `flip` (bool `[B]`, CPU) says
    which images to mirror; by default each is mirrored at random.
    """
    b, c, h, w = images.shape
    dy, dx = (torch.randint(0, 2 * padding + 1, (b,), generator=generator) - padding for _ in range(2))
    if flip is None:
        flip = torch.rand(b, generator=generator) < 0.5
    rows = reflect_index(dy[:, None] + torch.arange(h), h)  # [B, H] rows of the image to take
    cols = reflect_index(dx[:, None] + torch.arange(w), w)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    device = images.device
    batch_index = torch.arange(b, device=device)[:, None, None, None]
    channel_index = torch.arange(c, device=device)[None, :, None, None]
    return images[batch_index, channel_index, rows.to(device)[:, None, :, None], cols.to(device)[:, None, None, :]]


@dataclass(frozen=True)
class Plan:
    """How long training runs: `total_steps` optimizer steps of `steps_per_epoch` per epoch."""

    total_steps: int
    steps_per_epoch: int
    step_seconds: float | None = None  # measured, when a time budget set total_steps
    measure_seconds: float = 0.0  # what measuring cost (it counts against the budget)

    @property
    def epochs(self) -> int:  # the last one may be partial
        return math.ceil(self.total_steps / self.steps_per_epoch)


def train(
    net: nn.Module,
    images: torch.Tensor,  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor,  # int64 [N]
    config: TrainConfig,  # precision and channels_last already decided (hardware.decide)
    device: torch.device,
    on_epoch: Callable[[EpochResult], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,  # gets a resumable checkpoint after every epoch
    resume: dict | None = None,  # such a checkpoint: training continues after its last epoch
    check_every: int = 50,  # steps between NaN checks; each check waits for the device
    on_plan: Callable[[Plan], None] | None = None,  # told how many steps will run, before the first
) -> list[EpochResult]:
    started = time.perf_counter()
    if "auto" in (config.precision, config.channels_last):
        raise ValueError("decide precision and channels_last for the device first (hardware.decide)")
    rank, world = distributed()
    if config.batch_size % world:
        raise UserError(f"batch_size {config.batch_size} is the global batch and must be a multiple of the "
                        f"{world} processes")
    images, labels = images.to(device), labels.to(device)
    if resume is None and hasattr(net, "init_from_data"):
        net.init_from_data(models.normalize(images[:WHITENING_IMAGES]))
    if resume is not None:
        net.load_state_dict(resume["state_dict"])
    net.to(device).train()
    if config.channels_last:
        net.to(memory_format=torch.channels_last)
    model = net
    if world > 1:
        if device.type == "cuda":  # one batch-norm statistic over the global batch (CPU: per process)
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(net, config)
    n = len(labels)
    steps = math.ceil(n / config.batch_size)
    if 0 < n % config.batch_size < world:  # a last batch too small to give every process an image
        steps -= 1
    shuffle = torch.Generator().manual_seed(config.seed)  # on the CPU: the same order on every device
    augment_rng = torch.Generator().manual_seed(config.seed + 1)
    # alternating_flip: whether each image starts mirrored, drawn once from the seed; odd epochs mirror them all
    first_flip = torch.rand(n, generator=torch.Generator().manual_seed(config.seed + 2)) < 0.5
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    def step_on(idx: torch.Tensor, epoch: int, rng: torch.Generator, train_model, train_optimizer):
        """One optimizer step on the images `idx` (CPU; the global batch): (loss, logits, labels) of this process."""
        on_device = idx.to(device, non_blocking=True)
        x, y = images[on_device], labels[on_device]  # uint8 [B, 3, 32, 32], int64 [B]
        if config.augment:  # drawn for the global batch, so any number of processes sees the same crops
            flip = (first_flip[idx] ^ (epoch % 2 == 0)) if config.alternating_flip else None
            x = flip_crop(x, config.crop_padding, rng, flip)
        if world > 1:  # this process's shard: [B / world, ...]
            x, y = x[rank::world], y[rank::world]
        x = models.normalize(x).contiguous(memory_format=memory_format)  # float32
        with autocast:
            logits = train_model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
        train_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        train_optimizer.step()
        return loss, logits, y

    if resume is not None:
        plan = Plan(resume.get("total_steps", config.epochs * steps), steps)
    elif config.budget_minutes:
        plan = plan_budget(config, steps, started, lambda i, rng, probe, probe_optimizer: step_on(
            torch.randint(n, (config.batch_size,), generator=rng), 1, rng, probe, probe_optimizer),
            net)
    else:
        plan = Plan(config.epochs * steps, steps)
    if on_plan:
        on_plan(plan)
    factor = lr_factor(config, steps, plan.total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, group_factors(optimizer, net, factor, steps))
    history: list[EpochResult] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        shuffle.set_state(resume["rng"]["shuffle"])
        augment_rng.set_state(resume["rng"]["augment"])
        history = [EpochResult(**h) for h in resume["history"]]
    lookahead, pull_every = None, max(1, round(LOOKAHEAD_EVERY_IMAGES / config.batch_size))  # in steps
    for epoch in range(len(history) + 1, plan.epochs + 1):
        start = time.perf_counter()
        if config.lookahead and epoch > LOOKAHEAD_START_EPOCH:  # net == average at every epoch's start
            lookahead = Lookahead(net)
        order = torch.randperm(n, generator=shuffle)  # on the CPU: the flips read it without waiting for a GPU
        epoch_steps = min(steps, plan.total_steps - (epoch - 1) * steps)
        seen = min(n, epoch_steps * config.batch_size)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for step in bar(range(epoch_steps), desc=f"epoch {epoch}/{plan.epochs}", unit="step"):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            loss, logits, y = step_on(idx, epoch, augment_rng, model, optimizer)
            scheduler.step()
            done = (epoch - 1) * steps + step + 1
            if lookahead is not None and done % pull_every == 0:
                lookahead.pull(net, LOOKAHEAD_DECAY * (done / plan.total_steps) ** 3)
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if step % check_every == 0 and not torch.isfinite(loss_sum):
                _diverged(loss_sum, epoch, step, config)
        if lookahead is not None:
            lookahead.pull(net, 1.0)  # the network becomes the average
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
            dist.all_reduce(correct)
        if not torch.isfinite(loss_sum):
            _diverged(loss_sum, epoch, epoch_steps - 1, config)
        seconds = time.perf_counter() - start
        result = EpochResult(epoch, loss_sum.item() / seen, correct.item() / seen, seconds, seen / seconds)
        history.append(result)
        if on_epoch:
            on_epoch(result)
        if on_checkpoint:
            state = {"optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                     "rng": {"shuffle": shuffle.get_state(), "augment": augment_rng.get_state()},
                     "total_steps": plan.total_steps}
            on_checkpoint({**checkpoint(net, config, {}, history), **state})
    net.to(memory_format=torch.contiguous_format)
    return history


def plan_budget(config: TrainConfig, steps_per_epoch: int, started: float, step_on, net: nn.Module) -> Plan:
    """As many steps as fit config.budget_minutes, from a few steps timed on a copy of the network.

    The copy (and its own optimizer and random numbers) leaves the real training untouched; what the
    measuring took, and everything since `started`, counts against the budget. At least one epoch.
    """
    probe = copy.deepcopy(net)
    probe_optimizer = make_optimizer(probe, config)
    rng = torch.Generator().manual_seed(config.seed + 3)
    times = []
    for i in range(BUDGET_PROBE_STEPS + 1):  # the first step pays one-off costs (kernel set-up): not timed
        tick = time.perf_counter()
        loss, _, _ = step_on(i, rng, probe, probe_optimizer)
        loss.item()  # wait for the device
        times.append(time.perf_counter() - tick)
    del probe, probe_optimizer
    step_seconds = sorted(times[1:])[len(times[1:]) // 2]
    spent = time.perf_counter() - started
    total = max(steps_per_epoch, int((config.budget_minutes * 60 - spent) / step_seconds))
    return Plan(total, steps_per_epoch, step_seconds, spent)


def _diverged(loss_sum: torch.Tensor, epoch: int, step: int, config: TrainConfig):
    raise Diverged(
        f"training diverged: the loss became {loss_sum.item()} at epoch {epoch}, step {step + 1}; "
        f"lower learning_rate (it is {config.learning_rate})"
    )


# --- checkpoints: self-describing, so they rebuild their own network ---------------------------------


def checkpoint(net: nn.Module, config: TrainConfig, model_kwargs: dict, history: list[EpochResult]) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": config.model,
        "model_kwargs": dict(model_kwargs),
        "config": asdict(config),
        # clone: a snapshot, not a view of weights that go on training
        "state_dict": {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                       for k, v in net.state_dict().items()},
        "history": [asdict(h) for h in history],
    }


def rebuild(ckpt: dict) -> tuple[nn.Module, TrainConfig]:
    """The network (in eval mode, on the CPU) and the config a checkpoint was trained with."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint format {ckpt.get('format')!r} is not {CHECKPOINT_FORMAT}; retrain")
    net = models.build(ckpt["model"], **ckpt["model_kwargs"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), TrainConfig(**ckpt["config"])
