"""The training loop: the whole training set in memory as one uint8 tensor, batches drawn by index.

No DataLoader, no PIL, no worker processes: a batch is `images[idx]` followed by one fused
normalize on the training device, which is where the seed's recipe spent most of its time.
Everything the loop uses is handed in or built from the config: the augmentation (augment.py), the
optimizer and its schedule (optimizers.py), the process group (distributed.py).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import augment, distributed, models, optimizers
from .errors import CheckFailed, UserError
from .progress import bar
from .recipes import TrainConfig

WHITENING_IMAGES = 5000  # training images whose patch statistics set a whitening stem (FastNet, AirNet)
BUDGET_PROBE_STEPS = 3  # timed steps (after one untimed) that measure the speed a time budget is planned from


@dataclass(frozen=True)
class EpochResult:
    epoch: int  # 1-based
    loss: float  # mean cross-entropy over the epoch's training images
    accuracy: float  # fraction of the epoch's training images classified right (in train mode)
    seconds: float
    images_per_s: float
    val_loss: float | None = None  # on the held-out images (validation > 0), in eval mode after the epoch
    val_accuracy: float | None = None


class Diverged(CheckFailed):
    """The loss became NaN or infinite: the run must fail rather than log garbage."""


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
    # after every epoch: (network, history so far, the rest of the resumable state) -> e.g. a checkpoint
    on_checkpoint: Callable[[nn.Module, list[EpochResult], dict], None] | None = None,
    resume: dict | None = None,  # such a checkpoint: training continues after its last epoch
    check_every: int = 50,  # steps between NaN checks; each check waits for the device
    on_plan: Callable[[Plan], None] | None = None,  # told how many steps will run, before the first
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None,  # uint8 images, int64 labels: scored every epoch
) -> list[EpochResult]:
    started = time.perf_counter()
    if "auto" in (config.precision, config.channels_last):
        raise ValueError("decide precision and channels_last for the device first (hardware.decide)")
    rank, world = distributed.rank_and_world()
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
    optimizer = optimizers.make_optimizer(net, config)
    n = len(labels)
    steps = math.ceil(n / config.batch_size)
    if 0 < n % config.batch_size < world:  # a last batch too small to give every process an image
        steps -= 1
    shuffle = torch.Generator().manual_seed(config.seed)  # on the CPU: the same order on every device
    augment_rng = torch.Generator().manual_seed(config.seed + 1)
    first_flip = augment.alternating_flips(n, config.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format

    def step_on(idx: torch.Tensor, epoch: int, rng: torch.Generator, train_model, train_optimizer):
        """One optimizer step on the images `idx` (CPU; the global batch): (loss, logits, labels) of this process."""
        on_device = idx.to(device, non_blocking=True)
        x, y = images[on_device], labels[on_device]  # uint8 [B, 3, 32, 32], int64 [B]
        if config.augment:  # drawn for the global batch, so any number of processes sees the same crops
            flip = (first_flip[idx] ^ (epoch % 2 == 0)) if config.alternating_flip else None
            x = augment.flip_crop(x, config.crop_padding, rng, flip)
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
    scheduler = optimizers.scheduler(optimizer, net, config, steps, plan.total_steps)
    history: list[EpochResult] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        shuffle.set_state(resume["rng"]["shuffle"])
        augment_rng.set_state(resume["rng"]["augment"])
        history = [EpochResult(**h) for h in resume["history"]]
    lookahead, pull_every = None, max(1, round(optimizers.LOOKAHEAD_EVERY_IMAGES / config.batch_size))  # steps
    for epoch in range(len(history) + 1, plan.epochs + 1):
        start = time.perf_counter()
        if config.lookahead and epoch > optimizers.LOOKAHEAD_START_EPOCH:  # net == average at every epoch's start
            lookahead = optimizers.Lookahead(net)
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
                lookahead.pull(net, optimizers.LOOKAHEAD_DECAY * (done / plan.total_steps) ** 3)
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if step % check_every == 0 and not torch.isfinite(loss_sum):
                _diverged(loss_sum, epoch, step, config)
        if lookahead is not None:
            lookahead.pull(net, 1.0)  # the network becomes the average
        if world > 1:
            distributed.all_sum(loss_sum, correct)
        if not torch.isfinite(loss_sum):
            _diverged(loss_sum, epoch, epoch_steps - 1, config)
        seconds = time.perf_counter() - start
        scored = validate(net, held_out, device, autocast, memory_format) if held_out is not None else {}
        result = EpochResult(epoch, loss_sum.item() / seen, correct.item() / seen, seconds, seen / seconds, **scored)
        history.append(result)
        if on_epoch:
            on_epoch(result)
        if on_checkpoint:
            on_checkpoint(net, history, {
                "optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                "rng": {"shuffle": shuffle.get_state(), "augment": augment_rng.get_state()},
                "total_steps": plan.total_steps})
    net.to(memory_format=torch.contiguous_format)
    return history


@torch.inference_mode()
def validate(net: nn.Module, held_out: tuple[torch.Tensor, torch.Tensor], device: torch.device, autocast,
             memory_format, batch_size: int = 1000) -> dict[str, float]:
    """Loss and accuracy on the held-out images, in eval mode (batch norm uses its running statistics and
    learns nothing), in the training's precision and memory format; the network is back in train mode after."""
    images, labels = held_out
    net.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(labels), batch_size):
        x = models.normalize(images[i : i + batch_size].to(device)).contiguous(memory_format=memory_format)
        y = labels[i : i + batch_size].to(device)
        with autocast:
            logits = net(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    net.train()
    return {"val_loss": loss / len(labels), "val_accuracy": correct / len(labels)}


def plan_budget(config: TrainConfig, steps_per_epoch: int, started: float, step_on, net: nn.Module) -> Plan:
    """As many steps as fit config.budget_minutes, from a few steps timed on a copy of the network.

    The copy (and its own optimizer and random numbers) leaves the real training untouched; what the
    measuring took, and everything since `started`, counts against the budget. At least one epoch.
    """
    probe = copy.deepcopy(net)
    probe_optimizer = optimizers.make_optimizer(probe, config)
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
