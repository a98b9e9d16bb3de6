"""The machine's cores shared by the two steps main runs side by side (evaluate and export).

Each starts with an equal share (OMP_NUM_THREADS): two processes that each run a thread per core wait on
each other's threads and together compute about half as fast as one. A step with nothing left to compute
frees its share: export once it only waits for evaluate's results, main for a step whose process ended
(evaluate reused or done first, export failed). The other step takes the whole machine at its next forward
pass (evaluate) or phase (export) instead of finishing on half of it. A freed share is a file named after
the step in a folder main makes and names in $CIFAR10_CORES. An OMP_NUM_THREADS the user set is kept, and
nothing is shared out then.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

FOLDER = "CIFAR10_CORES"  # env: the folder where a step's freed share appears as a file named after it


def machine() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS


@contextlib.contextmanager
def shared(processes: int):
    """OMP_NUM_THREADS for the step processes started inside: an equal share of the cores for each of
    `processes` at once (torch and our ONNX Runtime sessions follow it), and the folder of freed shares."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    folder = tempfile.mkdtemp(prefix="cifar10-cores-")
    os.environ.update({"OMP_NUM_THREADS": str(max(1, machine() // processes)), FOLDER: folder})
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        os.environ.pop(FOLDER, None)
        shutil.rmtree(folder, ignore_errors=True)


def free(step: str) -> None:
    """Say `step` computes nothing more while the other one runs (a no-op outside `shared`)."""
    if os.environ.get(FOLDER):
        with contextlib.suppress(FileNotFoundError):  # main has ended the sharing already
            Path(os.environ[FOLDER], step).touch()


def take_freed(step: str) -> None:
    """`step` takes the whole machine (torch's threads, and so ONNX Runtime sessions made after) once the
    other step has freed its share. For the calling thread: torch's thread count is per thread."""
    import torch

    folder = os.environ.get(FOLDER)
    if folder and torch.get_num_threads() < machine() and any(name != step for name in _freed(folder)):
        torch.set_num_threads(machine())


def taking_freed(step: str, model: Callable) -> Callable:
    """`model`, which calls `take_freed(step)` before each call."""
    if not os.environ.get(FOLDER):
        return model

    def call(*args, **kwargs):
        take_freed(step)
        return model(*args, **kwargs)

    return call


def _freed(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:  # main has ended the sharing
        return []
