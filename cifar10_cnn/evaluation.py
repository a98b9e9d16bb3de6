"""Test-set metrics from any function that maps a batch of images to logits."""

from __future__ import annotations

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


@torch.inference_mode()
def predict_logits(
    model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    """Logits `[N, C]` (float32, CPU) for `images`, `batch_size` at a time."""
    starts = bar(range(0, len(images), batch_size), desc="evaluate")
    return torch.cat([model(images[i : i + batch_size]).float().cpu() for i in starts])


def with_flip(model: Callable[[torch.Tensor], torch.Tensor], width_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Test-time augmentation: the mean of the logits for the images and their mirror images."""
    return lambda images: (model(images) + model(images.flip(width_dim))) / 2


def shift(images: torch.Tensor, dy: int, dx: int, h_dim: int, w_dim: int) -> torch.Tensor:
    """The images moved by (dy, dx) pixels (down, right), the edge mirrored into the gap (reflect padding)."""

    def source(size: int, d: int, device) -> torch.Tensor:
        return reflect_index(torch.arange(size, device=device) - d, size)

    out = images.index_select(h_dim, source(images.shape[h_dim], dy, images.device))
    return out.index_select(w_dim, source(images.shape[w_dim], dx, images.device))


def multi_crop(model: Callable[[torch.Tensor], torch.Tensor], h_dim: int,
               w_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Test-time augmentation of the speed-runs: half the image and its mirror, half the same for the
    image shifted one pixel up-left and one pixel down-right (six passes of the network)."""
    mirror = with_flip(model, w_dim)

    def averaged(x: torch.Tensor) -> torch.Tensor:
        shifted = (mirror(shift(x, 1, 1, h_dim, w_dim)) + mirror(shift(x, -1, -1, h_dim, w_dim))) / 2
        return (mirror(x) + shifted) / 2

    return averaged


def with_tta(model: Callable[[torch.Tensor], torch.Tensor], level: str, h_dim: int,
             w_dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model` with the test-time augmentation `level` (recipes.TTA_LEVELS): false, flip or crops."""
    return {"false": model, "flip": with_flip(model, w_dim), "crops": multi_crop(model, h_dim, w_dim)}[level]


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
