"""Checkpoints: their format (self-describing, so a checkpoint rebuilds its own network), one per epoch in the
tracking store while training (resumable), and the final one that the steps after train read."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch
from torch import nn

from . import constants as C
from . import heartbeat, models, params, tracking
from .errors import UserError
from .progress import say
from .recipes import TrainConfig

FORMAT = 2  # bump when the checkpoint's keys change


def snapshot(net: nn.Module, config: TrainConfig, history: list, state: dict | None = None) -> dict:
    """The network's weights (a copy on the CPU), what it is and how it was trained; `state` (the optimizer,
    schedule and random-number states that training.train hands its on_checkpoint) makes it resumable."""
    return {
        "format": FORMAT,
        "model": config.model,
        "model_kwargs": {},
        "config": asdict(config),
        # clone: a snapshot, not a view of weights that go on training
        "state_dict": {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
                       for k, v in net.state_dict().items()},
        "history": [asdict(h) for h in history],
        **(state or {}),
    }


def rebuild(ckpt: dict) -> tuple[nn.Module, TrainConfig]:
    """The network (in eval mode, on the CPU) and the config a checkpoint was trained with."""
    if ckpt.get("format") != FORMAT:
        raise UserError(f"checkpoint format {ckpt.get('format')!r} is not {FORMAT}; retrain")
    net = models.build(ckpt["model"], **ckpt["model_kwargs"])
    net.load_state_dict(ckpt["state_dict"])
    return net.eval(), TrainConfig(**ckpt["config"])


def log_epoch_checkpoint(state: dict) -> None:
    """One file per epoch, never overwritten: a kill during an upload spoils at most the newest one."""
    epoch = len(state["history"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / C.EPOCH_CHECKPOINT.format(epoch=epoch)
        torch.save(state, path)
        mlflow.log_artifact(str(path), C.EPOCH_CHECKPOINT_DIR)
    mlflow.set_tag(C.TAG_LAST_CHECKPOINT, str(epoch))


def log_final(state: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(C.CHECKPOINT_PATH).name
        torch.save(state, path)
        mlflow.log_artifact(str(path), str(Path(C.CHECKPOINT_PATH).parent))


def resumable(resume_run_id: str, ingest_run_id: str, recipe: str) -> dict:
    """The newest readable epoch checkpoint of a train run of `recipe` that did not finish, on the same data."""
    resume_run_id = params.run_id("resume_run_id", resume_run_id)
    try:
        old = mlflow.get_run(resume_run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"resume_run_id {resume_run_id}: no such run in {mlflow.get_tracking_uri()}") from None
    if old.data.tags.get(C.TAG_STEP) != "train":
        raise UserError(f"resume_run_id {resume_run_id} is not a train run")
    if old.info.status == "FINISHED":
        raise UserError(f"resume_run_id {resume_run_id} FINISHED already; nothing to resume")
    digest = mlflow.get_run(ingest_run_id).data.tags.get(C.TAG_SHA256)
    if old.data.tags.get(C.TAG_SHA256) != digest:
        raise UserError(f"resume_run_id {resume_run_id} trained on other data (sha256 "
                        f"{old.data.tags.get(C.TAG_SHA256, '?')[:12]}…, now {str(digest)[:12]}…)")
    if (killed := old.data.params.get("recipe", recipe)) != recipe:  # evaluate's TTA and the card follow it
        raise UserError(f"resume_run_id {resume_run_id} trained recipe {killed}, not {recipe}; give -P "
                        f"recipe={killed} (a resumed run keeps its parameters)")
    client = mlflow.MlflowClient()
    if old.info.status == "RUNNING" and not heartbeat.lost(old, C.TAG_PROCESS, C.TAG_HEARTBEAT, since=0):
        raise UserError(f"resume_run_id {resume_run_id} is still training ({old.data.tags[C.TAG_PROCESS]} beat "
                        f"under {heartbeat.STALE_S:g} s ago): stop it first, or let it finish")
    if old.info.status == "RUNNING":  # its process was killed outright (SIGKILL, power cut): end it for it
        client.set_tag(resume_run_id, C.TAG_RESUMED_BY, mlflow.active_run().info.run_id)
        client.set_terminated(resume_run_id, "KILLED")
    names = [f.path for f in client.list_artifacts(resume_run_id, C.EPOCH_CHECKPOINT_DIR)]
    for name in sorted(names, reverse=True):  # zero-padded epoch numbers: newest first
        try:
            with tracking.artifact(resume_run_id, name) as path:
                state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != FORMAT:
                raise ValueError(f"format {state.get('format')!r}")
        except Exception as exc:  # e.g. a file cut short by the kill: fall back to the epoch before
            say("train", f"skipping unusable checkpoint {name} of run {resume_run_id}: {exc}")
            continue
        return state
    raise UserError(f"resume_run_id {resume_run_id} has no usable epoch checkpoint under {C.EPOCH_CHECKPOINT_DIR}/; "
                    "start a new run")


def trained(train_run_id: str):
    """The train run, its network rebuilt from the final checkpoint (eval mode, CPU), and its config."""
    run = tracking.upstream(train_run_id, "train")
    with tracking.artifact(train_run_id, C.CHECKPOINT_PATH) as path:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UserError(f"checkpoint of train run {train_run_id} is unreadable ({path}): {exc}") from None
    net, config = rebuild(ckpt)
    return run, net, config
