"""Optimizers and their schedules: parameter groups, Adam / SGD / Muon, the learning-rate shapes, lookahead."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .recipes import TrainConfig

# Lookahead (config.lookahead), as the speed-runs do it: plain SGD for the first epochs, then every few steps
# the weights move to a running average of themselves whose memory grows towards the end of training.
LOOKAHEAD_START_EPOCH = 3  # epochs of plain SGD before the average starts
LOOKAHEAD_EVERY_IMAGES = 5 * 1024  # training images between two pulls towards the average (airbench: 5 steps)
LOOKAHEAD_DECAY = 0.95**5  # the average's decay per pull at the end of training; (progress ** 3) of it before
TRIANGLE = (0.2, 0.07)  # lr_schedule triangle: the factor it starts from and the one it ends at


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


def scheduler(optimizer: torch.optim.Optimizer, net: nn.Module, config: TrainConfig, steps_per_epoch: int,
              total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule over `total` steps, one per parameter group: the stem's bias stops learning
    after the model's stem_bias_epochs."""
    factor = lr_factor(config, steps_per_epoch, total)
    frozen_at = getattr(net, "stem_bias_epochs", 0) * steps_per_epoch
    per_group = [(lambda step: factor(step) if step < frozen_at else 0.0) if g.get("name") == "stem_bias" else factor
                 for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, per_group)


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
