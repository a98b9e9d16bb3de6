"""Test-set metrics from any function that maps a batch of images to logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

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
