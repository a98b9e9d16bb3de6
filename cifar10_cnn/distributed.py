"""Several training processes on one machine (torchrun): one shard of every global batch each, gradients
averaged by DistributedDataParallel. Rank 0 alone talks to MLflow and shares what the others need."""

from __future__ import annotations

import os
import sys

import torch

from . import cores
from .errors import UserError


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) when it runs alone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def relaunch_under_torchrun(module: str, argv: list[str], nproc_per_node: str, device: str) -> None:
    """With nproc_per_node > 1 and not yet under torchrun: replace this process by torchrun running
    `python -m module argv` that many times. Otherwise return at once. A UserError when the processes
    would train on CUDA and there are fewer GPUs than processes (one GPU each)."""
    nproc = str(nproc_per_node).strip()
    if nproc.isdigit() and int(nproc) > 1 and "LOCAL_RANK" not in os.environ:
        if device in ("auto", "cuda") and torch.cuda.is_available() and int(nproc) > torch.cuda.device_count():
            raise UserError(f"nproc_per_node {nproc} needs a GPU each and this machine has "
                            f"{torch.cuda.device_count()}; give at most that many, or -P device=cpu")
        # torchrun gives each rank one thread unless told: the cores shared out instead (what the CPU needs)
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores.machine() // int(nproc))))
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={int(nproc)}", "-m", module, *argv])


def join(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment: NCCL on CUDA, gloo on the CPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return rank_and_world()
    cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return rank_and_world()


def leave() -> None:
    """Tear down this process's group, if it joined one, before the interpreter exits.

    A gloo group still alive when the interpreter exits can abort the process ("terminate called without
    an active exception", SIGABRT; seen in CI on rank 1 while rank 0 was still logging).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker() -> None:
    """End a rank > 0 without the interpreter's teardown: it has no run or file left to close, and gloo's
    worker threads can still hold tensors and abort the process after its work is done (SIGABRT even after
    destroy_process_group, seen in CI; the mechanism is described in pytorch/pytorch#179291)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def share(payload=None):
    """Rank 0's `payload` on every rank (pickled; None tells the others that rank 0 gave up)."""
    import torch.distributed as dist

    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(*tensors: torch.Tensor) -> None:
    """Each tensor summed over every process, in place."""
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
