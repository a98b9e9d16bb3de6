"""Training-time augmentation on the training device: random crops of the reflect-padded image, and flips."""

from __future__ import annotations

import torch


def reflect_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions outside 0..size-1 mirrored back in, the edge pixel not repeated (like reflect padding)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def flip_crop(images: torch.Tensor, padding: int, generator: torch.Generator,
              flip: torch.Tensor | None = None) -> torch.Tensor:
    """Random crops of the reflect-padded batch and horizontal flips, uint8 `[B, 3, H, W]` in and out.

    Each image moves by up to `padding` pixels each way; the gap is filled with the image mirrored at its
    edge, as the speed-runs do, so that no training image has the black border no test image has. One
    gather for the whole batch on its own device, no padded copy; the random numbers come from a CPU
    generator so that a seed gives the same augmentation on every device. `flip` (bool `[B]`, CPU) says
    which images to mirror; by default each is mirrored at random.
    """
    b, c, h, w = images.shape
    dy, dx = (torch.randint(0, 2 * padding + 1, (b,), generator=generator) - padding for _ in range(2))
    if flip is None:
        flip = torch.rand(b, generator=generator) < 0.5
    rows = reflect_index(dy[:, None] + torch.arange(h), h)  # [B, H] rows of the image to take
    cols = reflect_index(dx[:, None] + torch.arange(w), w)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flip reads the columns backwards
    device = images.device
    batch_index = torch.arange(b, device=device)[:, None, None, None]
    channel_index = torch.arange(c, device=device)[None, :, None, None]
    return images[batch_index, channel_index, rows.to(device)[:, None, :, None], cols.to(device)[:, None, None, :]]


def alternating_flips(n: int, seed: int) -> torch.Tensor:
    """alternating_flip: whether each of `n` images starts mirrored, drawn once from the seed (bool `[n]`, CPU).
    Image i is mirrored in epoch e when `start[i] ^ (e % 2 == 0)`."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed + 2)) < 0.5
