"""The seed tutorial's training recipe, kept as the reference the benchmark compares against.

Faithful to how the seed trained: a torchvision-style dataset that turns every image into a PIL image
and then runs `ToTensor()` and `Normalize((0.5,)*3, (0.5,)*3)` on it one sample at a time, a
`DataLoader(batch_size=32, shuffle=True)` with the default `num_workers=0` and collation, Adam 1e-3,
`CrossEntropyLoss`, and the same SimpleCNN. The only difference is where the pixels come from:
torchvision's CIFAR10 class reads the *python* (pickle) batches, which this project never unpickles,
so this dataset holds the same uint8 HWC array that CIFAR10 keeps in `.data`, filled from the binary
files. `__getitem__` is the same as torchvision.datasets.CIFAR10's.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from cifar10_cnn.models import SimpleCNN


class SeedCIFAR10(Dataset):
    def __init__(self, images_nchw: np.ndarray, labels: np.ndarray):
        self.data = np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))  # HWC, as torchvision keeps it
        self.targets = labels.astype(np.int64).tolist()
        self.transform = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = Image.fromarray(self.data[index]), self.targets[index]
        return self.transform(img), target


def train_and_test(train_images, train_labels, test_images, test_labels, epochs=5, batch_size=32, lr=1e-3, seed=42):
    """Returns (seconds per epoch, final epoch loss, test accuracy)."""
    torch.manual_seed(seed)
    model = SimpleCNN()
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_loader = DataLoader(SeedCIFAR10(train_images, train_labels), batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(SeedCIFAR10(test_images, test_labels), batch_size=batch_size, shuffle=False)
    epoch_seconds, loss_value = [], float("nan")
    for _ in range(epochs):
        model.train()
        start, running = time.perf_counter(), 0.0
        for inputs, targets in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            running += loss.item()
        epoch_seconds.append(time.perf_counter() - start)
        loss_value = running / len(train_loader)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in test_loader:
            correct += (model(inputs).argmax(1) == targets).sum().item()
            total += len(targets)
    return epoch_seconds, loss_value, correct / total
