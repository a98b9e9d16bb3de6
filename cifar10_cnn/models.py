"""The networks, and the wrapper that makes any of them take raw pixels.

Every network takes normalized float32 NCHW `[N, 3, 32, 32]` and returns logits `[N, 10]`.
`RawPixelClassifier` puts the preprocessing in front of it, so the models we log, export and serve
take raw uint8 RGB images in NHWC `[N, 32, 32, 3]` (the layout of a decoded image file) and no
client has to re-implement normalization. Training uses the same `normalize` function, so the two
can never drift apart.
"""

from __future__ import annotations

import torch
from torch import nn

from . import constants as C


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW pixels -> float32 `(x / 255 - mean) / std` per channel (the seed's Normalize(0.5, 0.5))."""
    mean = torch.tensor(C.NORM_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(C.NORM_STD, device=images.device).view(1, 3, 1, 1)
    # One multiply-add: x * (1 / (255 std)) - mean / std.
    return images.float() * (1.0 / (255.0 * std)) - mean / std


class SimpleCNN(nn.Module):
    """The seed's tutorial network, layer for layer: 62,006 parameters."""

    def __init__(self, num_classes: int = C.NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)  # [N, 3, 32, 32] -> [N, 6, 28, 28]
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)  # [N, 6, 14, 14] -> [N, 16, 10, 10]
        self.pool = nn.MaxPool2d(2, 2)  # halves height and width
        self.fc1 = nn.Linear(16 * 5 * 5, 120)  # [N, 400] -> [N, 120]
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))  # [N, 6, 14, 14]
        x = self.pool(self.relu(self.conv2(x)))  # [N, 16, 5, 5]
        x = torch.flatten(x, 1)  # [N, 400]
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)  # [N, 10] logits


# name -> class; the checkpoint stores the name and the constructor's arguments, so it rebuilds itself.
MODELS: dict[str, type[nn.Module]] = {"simple_cnn": SimpleCNN}


def build(name: str, **kwargs) -> nn.Module:
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    return cls(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class RawPixelClassifier(nn.Module):
    """uint8 RGB `[N, 32, 32, 3]` (NHWC) -> logits `[N, 10]`, normalization included."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(normalize(images.permute(0, 3, 1, 2)))
