"""Test-set metrics from any function that maps a batch of images to logits."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import reflect_index
from .progress import bar


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean cross-entropy
    accuracy: float  # fraction right
    per_class_accuracy: list[float]  # recall of each class, in class-index order
    confusion: np.ndarray  # int64 [true, predicted]


Model = Callable[[torch.Tensor], torch.Tensor]
View = Callable[[torch.Tensor], torch.Tensor]


def batch_size_for(device: torch.device) -> int:
    """Images per forward pass when scoring: a CPU computes faster on batches that fit its caches."""
    return 256 if device.type == "cpu" else 1000


@torch.inference_mode()
def predict_logits(model: Model, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits `[N, C]` (float32, CPU) for `images`, `batch_size` at a time."""
    starts = bar(range(0, len(images), batch_size), desc="evaluate")
    return torch.cat([model(images[i : i + batch_size]).float().cpu() for i in starts])


def shift(images: torch.Tensor, dy: int, dx: int, h_dim: int, w_dim: int) -> torch.Tensor:
    """The images moved by (dy, dx) pixels (down, right), the edge mirrored into the gap (reflect padding)."""

    def source(size: int, d: int, device) -> torch.Tensor:
        return reflect_index(torch.arange(size, device=device) - d, size)

    out = images.index_select(h_dim, source(images.shape[h_dim], dy, images.device))
    return out.index_select(w_dim, source(images.shape[w_dim], dx, images.device))


def tta_views(level: str, h_dim: int, w_dim: int) -> list[tuple[float, View]]:
    """The views whose logits test-time augmentation `level` (recipes.TTA_LEVELS) averages, with their
    weights; the first is the image itself. flip: the image and its mirror. crops (the speed-runs'): half
    the image and its mirror, half the same for the image shifted one pixel up-left and one pixel
    down-right (six passes of the network)."""
    def mirrored(view: View) -> View:
        return lambda x: view(x).flip(w_dim)

    def same(x: torch.Tensor) -> torch.Tensor:
        return x

    if level == "false":
        return [(1.0, same)]
    if level == "flip":
        return [(0.5, same), (0.5, mirrored(same))]
    shifted = [lambda x, d=d: shift(x, d, d, h_dim, w_dim) for d in (1, -1)]
    return [(0.25, same), (0.25, mirrored(same))] + [(0.125, v) for s in shifted for v in (s, mirrored(s))]


def with_tta(model: Model, level: str, h_dim: int, w_dim: int) -> Model:
    """`model` with the test-time augmentation `level`: the weighted mean of its logits over the views."""
    views = tta_views(level, h_dim, w_dim)
    return lambda images: sum(weight * model(view(images)) for weight, view in views)


@torch.inference_mode()
def plain_and_tta_logits(model: Model, images: torch.Tensor, level: str, h_dim: int, w_dim: int,
                         low_precision=None, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits (float32, CPU) of the images as they are and averaged over TTA `level`'s views (None for
    level false), in one pass over the images. The plain logits are float32 (what is served); the other
    views run under `low_precision` when given (the training's autocast), the image itself then again in
    it, else its plain logits are reused."""
    views = tta_views(level, h_dim, w_dim)
    plain, augmented = [], []
    for i in bar(range(0, len(images), batch_size), desc="evaluate"):
        x = images[i : i + batch_size]
        first = model(x).float()
        plain.append(first.cpu())
        if len(views) == 1:
            continue
        with low_precision or contextlib.nullcontext():
            total = views[0][0] * (first if low_precision is None else model(x).float())
            for weight, view in views[1:]:
                total = total + weight * model(view(x)).float()
        augmented.append(total.cpu())
    return torch.cat(plain), torch.cat(augmented) if augmented else None


def evaluate(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Evaluation:
    labels = labels.long()
    predicted = logits.argmax(1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes).numpy()
    per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
    return Evaluation(
        loss=F.cross_entropy(logits, labels).item(),
        accuracy=int((predicted == labels).sum()) / len(labels),
        per_class_accuracy=per_class.tolist(),
        confusion=confusion,
    )
