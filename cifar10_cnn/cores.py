"""The machine's cores shared by the two steps main runs side by side (evaluate and export).

Each starts with an equal share (OMP_NUM_THREADS): two processes that each run a thread per core wait on
each other's threads and together compute about half as fast as one. Export finishes computing first
(evaluate's test-time augmentation is the longer job) and then only waits for evaluate's results; it says
so by creating a file, and evaluate takes the whole machine at its next forward pass instead of finishing
on half of it. A value of OMP_NUM_THREADS the user set is kept, and nothing is handed over then.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

HANDED_OVER = "CIFAR10_CORES_HANDED_OVER"  # env: the file whose existence says the other step's cores are free


def machine() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS


@contextlib.contextmanager
def shared(processes: int):
    """OMP_NUM_THREADS for the step processes started inside: an equal share of the cores for each of
    `processes` at once (torch and our ONNX Runtime sessions follow it), and the hand-over file's name."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    handle, signal = tempfile.mkstemp(prefix="cifar10-cores-")
    os.close(handle)
    os.unlink(signal)  # its name only: the file appears when a step hands its cores over
    os.environ.update({"OMP_NUM_THREADS": str(max(1, machine() // processes)), HANDED_OVER: signal})
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"], os.environ[HANDED_OVER]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(signal)


def hand_over() -> None:
    """Say this step computes nothing more while the other one runs (a no-op outside `shared`)."""
    if os.environ.get(HANDED_OVER):
        Path(os.environ[HANDED_OVER]).touch()


def taking_handed_over(model: Callable) -> Callable:
    """`model`, which before each call takes the whole machine (torch threads) once the other step has
    handed its cores over. Checked in the calling thread: torch's thread count is that thread's own."""
    import torch

    signal = os.environ.get(HANDED_OVER)
    if not signal:
        return model
    cores = machine()

    def call(*args, **kwargs):
        if torch.get_num_threads() < cores and os.path.exists(signal):
            torch.set_num_threads(cores)
        return model(*args, **kwargs)

    return call
