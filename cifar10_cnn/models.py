"""The networks, and the wrapper that makes any of them take raw pixels.

Every network takes normalized float32 NCHW `[N, 3, 32, 32]` and returns logits `[N, 10]`.
`RawPixelClassifier` puts the preprocessing in front of it, so the models we log, export and serve
take raw uint8 RGB images in NHWC `[N, 32, 32, 3]` (the layout of a decoded image file) and no
client has to re-implement normalization. Training uses the same `normalize` function, so the two
can never drift apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
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


def conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 convolution (same size out) -> batch norm -> ReLU. No conv bias: batch norm has one."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


# VGG for 32x32 inputs with batch norm: numbers are 3x3 conv widths, "M" a 2x2 max-pool. Five pools take
# 32x32 to 1x1, so the classifier is one linear layer on 512 features (the usual CIFAR variant).
VGG_LAYOUTS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
}


class VGG(nn.Module):
    def __init__(self, layout: str = "vgg11", num_classes: int = C.NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in VGG_LAYOUTS[layout]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += conv_bn(c_in, item)
                c_in = item
        self.features = nn.Sequential(*layers)  # [N, 3, 32, 32] -> [N, 512, 1, 1]
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 as usually trained on CIFAR: a 3x3 stem and no initial max-pool (11.2 M parameters)."""

    def __init__(self, num_classes: int = C.NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 64))  # [N, 64, 32, 32]
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):  # -> 32, 16, 8, 4 pixels square
            stages += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)  # [N, 512, 4, 4]
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@torch.no_grad()
def whitening_filters(images: torch.Tensor, eps: float) -> torch.Tensor:
    """24 2x2 filters `[24, 3, 2, 2]` that whiten the 3x2x2 patches of `images`: 12 and their negatives.

    Each eigenvector of the patch covariance, scaled by 1 / sqrt(its eigenvalue + eps), so every output
    channel has unit variance; with both signs a following GELU loses nothing.
    """
    patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)  # [N, 3, 31, 31, 2, 2]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)  # one row per 3x2x2 patch
    patches = patches - patches.mean(0)
    eigenvalues, eigenvectors = torch.linalg.eigh(patches.T @ patches / len(patches))
    filters = (eigenvectors.T / torch.sqrt(eigenvalues[:, None] + eps)).reshape(12, 3, 2, 2)
    return torch.cat([filters, -filters])


class FastBlock(nn.Module):
    """Conv, 2x2 max-pool, BN, GELU to downsample, then a residual conv-BN-GELU at the new size."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pooling before batch norm: the norm and activation then work on a quarter of the pixels.
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))  # [N, c_out, H/2, W/2]
        return x + F.gelu(self.bn2(self.conv2(x)))


class FastNet(nn.Module):
    """A small residual network built to train fast on a CPU, after the CIFAR-10 speed-runs (airbench).

    The stem is a 2x2 convolution whose filters whiten the image patches of the training set (set by
    `init_from_data`, then frozen), so the first trained layers start from decorrelated inputs.
    [N, 3, 32, 32] -> stem [N, 24, 31, 31] -> blocks [N, 48, 15, 15] -> [N, 96, 7, 7] -> [N, 192, 3, 3]
    -> global max-pool [N, 192] -> linear [N, 10].
    """

    def __init__(self, widths: tuple[int, ...] = (48, 96, 192), num_classes: int = C.NUM_CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, kernel_size=2)  # 12 whitening filters and their negatives
        self.stem.weight.requires_grad_(False)  # fixed by init_from_data; the bias still trains
        blocks, c_in = [], 24
        for c_out in widths:
            blocks.append(FastBlock(c_in, c_out))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes, bias=False)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 1e-2) -> None:
        """Whitening filters from normalized training images `[N, 3, 32, 32]` (a few thousand suffice)."""
        self.stem.weight.copy_(whitening_filters(images, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_max_pool2d(x, 1), 1))


class AirBlock(nn.Module):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU, as in the speed-runs' ConvGroup.

    The convolutions start as identities on their first c_in channels ("dirac" init): the block begins
    near a residual block without paying for the addition. Batch norm keeps its scale at 1 (only the
    shift trains) and follows the batch statistics fast (momentum 0.4, airbench's), as a short training
    with large steps wants.
    """

    def __init__(self, c_in: int, c_out: int, bn_momentum: float):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=1e-12, momentum=bn_momentum)
        for conv in (self.conv1, self.conv2):
            nn.init.dirac_(conv.weight[: conv.in_channels])  # the rest keep PyTorch's default init
        for bn in (self.bn1, self.bn2):
            bn.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))  # pool first: BN and GELU see a quarter
        return F.gelu(self.bn2(self.conv2(x)))


class AirNet(nn.Module):
    """The fast recipe's network: our take on airbench's 93 % network (KellerJordan/cifar10-airbench).

    [N, 3, 32, 32] -> frozen 2x2 whitening stem + GELU [N, 24, 31, 31] -> blocks [N, 64, 15, 15]
    -> [N, 128, 7, 7] -> [N, 128, 3, 3] -> 3x3 max-pool [N, 128] -> linear, scaled by 1/9 -> [N, 10].
    The small logit scale keeps the first steps of a large learning rate from saturating the softmax.
    """

    stem_bias_epochs = 3  # the stem's bias trains this many epochs, then stays (training.make_optimizer)

    def __init__(self, widths: tuple[int, ...] = (64, 128, 128), bn_momentum: float = 0.4,
                 logit_scale: float = 1 / 9, num_classes: int = C.NUM_CLASSES):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, kernel_size=2)
        self.stem.weight.requires_grad_(False)  # fixed by init_from_data
        blocks, c_in = [], 24
        for c_out in widths:
            blocks.append(AirBlock(c_in, c_out, bn_momentum))
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Whitening filters from normalized training images `[N, 3, 32, 32]`; the stem's bias starts at 0."""
        self.stem.weight.copy_(whitening_filters(images, eps=1e-4))
        self.stem.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.gelu(self.stem(x)))
        return self.head(torch.flatten(F.max_pool2d(x, 3), 1)) * self.logit_scale


# name -> constructor; the checkpoint stores the name and the constructor's arguments, so it rebuilds itself.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "simple_cnn": SimpleCNN,
    "vgg11": partial(VGG, "vgg11"),
    "vgg16": partial(VGG, "vgg16"),
    "resnet18": ResNet18,
    "fastnet": FastNet,
    "airnet": AirNet,
    "airnet94": partial(AirNet, widths=(64, 256, 256)),  # airbench94's widths: the wider recipe's network
}


def build(name: str, seed: int | None = None, **kwargs) -> nn.Module:
    """The network `name`; with `seed`, its initial weights drawn from generators seeded with it (torch's,
    and Python's and NumPy's for anything else that draws), so a seed gives the same network every time."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
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
