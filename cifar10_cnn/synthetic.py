"""Small CIFAR-10 archives in the official binary layout, made up on the spot (no network, no shared data).

Each class has its own colour and stripe pattern plus noise, so a network can learn it in an epoch:
tests can then check that training really learns, not only that it runs.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np

from cifar10_cnn import constants as C


def images_for(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 3, 32, 32]: a class colour, a class-dependent stripe, noise."""
    n = len(labels)
    palette = np.array([[(c * 37) % 256, (c * 91 + 60) % 256, (c * 151 + 120) % 256] for c in range(C.NUM_CLASSES)])
    base = palette[labels][:, :, None, None].astype(np.float32)  # [N, 3, 1, 1]
    rows = np.arange(32)[None, :, None]  # stripes along height, period depends on the class
    stripe = 40.0 * np.sin(rows * (labels[:, None, None] + 1) * 0.35)  # [N, 32, 1]
    noise = rng.normal(0, 25, size=(n, 3, 32, 32))
    return np.clip(base + stripe[:, None] + noise, 0, 255).astype(np.uint8)


def records(n: int, rng: np.random.Generator) -> bytes:
    labels = np.arange(n) % C.NUM_CLASSES
    rng.shuffle(labels)
    body = images_for(labels, rng).reshape(n, -1)
    return np.concatenate([labels[:, None].astype(np.uint8), body], axis=1).tobytes()


def batch_files(train_per_batch: int = 40, test: int = 100, seed: int = 0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    files = {name: records(train_per_batch, rng) for name in C.TRAIN_BATCHES}
    files[C.TEST_BATCH] = records(test, rng)
    files[C.META_FILE] = ("\n".join(C.CLASS_NAMES) + "\n\n").encode()
    return files


def write_archive(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = (), prefix=C.BATCH_DIR) -> Path:
    """A .tar.gz with `files` under `prefix/`, then any `extra` (hostile) members."""
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(prefix)
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, raw in files.items():
            info = tarfile.TarInfo(f"{prefix}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def write_folder(path: Path, files: dict[str, bytes]) -> Path:
    folder = path / C.BATCH_DIR
    folder.mkdir(parents=True)
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return path
