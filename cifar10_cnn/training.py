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
WHITENING_IMAGES = 5000  # training images whose patch statistics set FastNet's whitening stem


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


def share(payload=None):
    """Rank 0's `payload` on every rank (pickled; None tells the others that rank 0 gave up)."""
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def make_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    trainable = [p for p in net.parameters() if p.requires_grad]
    if config.weight_decay:  # decay conv and linear weights only: biases and batch norm stay free
        trainable = [{"params": [p for p in trainable if p.ndim > 1], "weight_decay": config.weight_decay},
                     {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=config.learning_rate, momentum=0.9, nesterov=True, foreach=True)
    # foreach: one kernel per operation across all parameters, and bit for bit the update of the default
    # (per-tensor) Adam the seed used. fused=True is faster still but rounds differently: not the seed's.
    return torch.optim.Adam(trainable, lr=config.learning_rate, foreach=True)


def lr_factor(config: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Step number -> multiplier of learning_rate: linear warm-up, then the schedule's shape."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.lr_schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)  # 0 -> 1 after the warm-up
        if config.lr_schedule == "onecycle":
            return max(1.0 - progress, 0.0)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # cosine

    return factor


def flip_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded batch and random horizontal flips, uint8 `[B, 3, H, W]` in and out.

    One gather for the whole batch on its own device; the random numbers come from a CPU generator so
    that a seed gives the same augmentation on every device.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))  # [B, 3, H + 2p, W + 2p]
    dy, dx = (torch.randint(0, 2 * padding + 1, (b,), generator=generator) for _ in range(2))
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)  # [B, H] rows of the padded image to take
    cols = dx[:, None] + torch.arange(w)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    device = images.device
    batch_index = torch.arange(b, device=device)[:, None, None, None]
    channel_index = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, rows.to(device)[:, None, :, None], cols.to(device)[:, None, None, :]]


def train(
    net: nn.Module,
    images: torch.Tensor,  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor,  # int64 [N]
    config: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[EpochResult], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,  # gets a resumable checkpoint after every epoch
    resume: dict | None = None,  # such a checkpoint: training continues after its last epoch
    check_every: int = 50,  # steps between NaN checks; each check waits for the device
) -> list[EpochResult]:
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
    seen = min(n, steps * config.batch_size)  # images per epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
    shuffle = torch.Generator().manual_seed(config.seed)  # on the CPU: the same order on every device
    augment_rng = torch.Generator().manual_seed(config.seed + 1)
    history: list[EpochResult] = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        shuffle.set_state(resume["rng"]["shuffle"])
        augment_rng.set_state(resume["rng"]["augment"])
        history = [EpochResult(**h) for h in resume["history"]]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16")
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n, generator=shuffle).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for step in bar(range(steps), desc=f"epoch {epoch}/{config.epochs}", unit="step"):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = images[idx], labels[idx]  # uint8 [B, 3, 32, 32], int64 [B]
            if config.augment:  # drawn for the global batch, so any number of processes sees the same crops
                x = flip_crop(x, 4, augment_rng)
            if world > 1:  # this process's shard: [B / world, ...]
                x, y = x[rank::world], y[rank::world]
            x = models.normalize(x).contiguous(memory_format=memory_format)  # float32
            with autocast:
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            if step % check_every == 0 and not torch.isfinite(loss_sum):
                _diverged(loss_sum, epoch, step, config)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(loss_sum)
            dist.all_reduce(correct)
        if not torch.isfinite(loss_sum):
            _diverged(loss_sum, epoch, steps - 1, config)
        seconds = time.perf_counter() - start
        result = EpochResult(epoch, loss_sum.item() / seen, correct.item() / seen, seconds, seen / seconds)
        history.append(result)
        if on_epoch:
            on_epoch(result)
        if on_checkpoint:
            state = {"optimizer": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                     "rng": {"shuffle": shuffle.get_state(), "augment": augment_rng.get_state()}}
            on_checkpoint({**checkpoint(net, config, {}, history), **state})
    net.to(memory_format=torch.contiguous_format)
    return history


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
