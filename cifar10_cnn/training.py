"""The training loop: the whole training set in memory as one uint8 tensor, batches drawn by index.

No DataLoader, no PIL, no worker processes: a batch is `images[idx]` followed by one fused
normalize on the training device, which is where the seed's recipe spent most of its time.
"""

from __future__ import annotations

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

CHECKPOINT_FORMAT = 1  # bump when the checkpoint's keys change


@dataclass(frozen=True)
class TrainConfig:
    """The seed's recipe is the default."""

    model: str = "simple_cnn"
    epochs: int = 5  # passes over the training set
    batch_size: int = 32  # images per optimizer step
    learning_rate: float = 1e-3  # Adam step size
    seed: int = 42  # model init and shuffling


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


def train(
    net: nn.Module,
    images: torch.Tensor,  # uint8 [N, 3, 32, 32]
    labels: torch.Tensor,  # int64 [N]
    config: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[EpochResult], None] | None = None,
    check_every: int = 50,  # steps between NaN checks; each check waits for the device
) -> list[EpochResult]:
    net.to(device).train()
    images, labels = images.to(device), labels.to(device)
    # foreach: one kernel per operation across all parameters, and bit for bit the update of the default
    # (per-tensor) Adam the seed used. fused=True is faster still but rounds differently: not the seed's.
    optimizer = torch.optim.Adam(net.parameters(), lr=config.learning_rate, foreach=True)
    shuffle = torch.Generator().manual_seed(config.seed)  # on the CPU: the same order on every device
    n = len(labels)
    steps = math.ceil(n / config.batch_size)
    history: list[EpochResult] = []
    for epoch in range(1, config.epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(n, generator=shuffle).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for step in bar(range(steps), desc=f"epoch {epoch}/{config.epochs}", unit="step"):
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            x, y = models.normalize(images[idx]), labels[idx]  # [B, 3, 32, 32] float32, [B]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == y).sum()
            if step % check_every == 0 and not torch.isfinite(loss_sum):
                _diverged(loss_sum, epoch, step, config)
        if not torch.isfinite(loss_sum):
            _diverged(loss_sum, epoch, steps - 1, config)
        seconds = time.perf_counter() - start
        result = EpochResult(epoch, loss_sum.item() / n, correct.item() / n, seconds, n / seconds)
        history.append(result)
        if on_epoch:
            on_epoch(result)
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
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "history": [asdict(h) for h in history],
    }


def rebuild(ckpt: dict) -> tuple[nn.Module, TrainConfig]:
    """The network (in eval mode, on the CPU) and the config a checkpoint was trained with."""
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint format {ckpt.get('format')!r} is not {CHECKPOINT_FORMAT}; retrain")
    net = models.build(ckpt["model"], **ckpt["model_kwargs"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), TrainConfig(**ckpt["config"])
