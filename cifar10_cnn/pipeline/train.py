"""train: train a network on the ingest run's data; log curves, a checkpoint and the PyTorch model."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow
import torch
from mlflow.models import infer_signature

from .. import constants as C
from .. import data as datalib
from .. import hardware, mlmodel, models, params, plots, recipes, tracking, training
from ..errors import UserError
from .common import base_version, dataset_of, model_metadata, nhwc, peak_rss_mib, say


def run(ingest_run_id: str, recipe: str, device: str, resume_run_id: str = "none", nproc_per_node: str = "1",
        **overrides: str) -> None:
    """Train `recipe` with `overrides` (each 'auto' or a value), or continue the killed run `resume_run_id`.

    Under torchrun this is rank 0: it alone talks to MLflow, and hands the other ranks (`run_worker`)
    the resolved config, the data and any resume state.
    """
    rank, world = training.distributed()
    try:
        config, why, target, dataset, resume, ingest_run_id, resume_run_id = prepare(
            ingest_run_id, recipe, device, resume_run_id, nproc_per_node, world, overrides)
    except BaseException:
        if world > 1:
            training.share(None)  # the other ranks stop instead of waiting for data that never comes
        raise
    if world > 1:
        training.share({"config": config, "resume": resume, "train_images": dataset.train_images,
                        "train_labels": dataset.train_labels})
        mlflow.log_params({"world_size": world, "per_process_batch": config.batch_size // world})
        say("train", f"{world} processes ({'NCCL' if target.type == 'cuda' else 'gloo'}), global batch "
                      f"{config.batch_size} = {world} x {config.batch_size // world}, learning rate as given")

    training.seed_everything(config.seed)
    net = models.build(config.model)
    n_params = models.count_parameters(net)
    tracking.log_new_params({**asdict(config), "num_parameters": n_params, "train_device": target,
                             "train_records": len(dataset.train_labels), "precision_used": config.precision,
                             "channels_last_used": config.channels_last})
    mlflow.log_dict(asdict(config), "config.json")  # the resolved recipe, whatever the params said
    caps = hardware.capabilities(target)
    mlflow.set_tags({"cifar10.sha256": mlflow.get_run(ingest_run_id).data.tags.get("cifar10.sha256", ""),
                     C.TAG_HARDWARE: hardware.describe(caps), **{C.TAG_DECISION + k: v for k, v in why.items()}})
    for key, reason in why.items():
        say("train", f"{key}: {reason}" if key != "warning" else f"WARNING: {reason}")
    say("train", f"{config.model}, {n_params:,} parameters, {len(dataset.train_labels):,} images on "
                  f"{hardware.describe(caps)}; batch {config.batch_size}, {config.optimizer} lr {config.learning_rate} "
                  f"({config.lr_schedule}), {config.precision}{', channels-last' if config.channels_last else ''}"
                  + (", flip+crop" if config.augment else ""))
    planned = [config.epochs]

    def on_plan(plan: training.Plan) -> None:
        planned[0] = plan.epochs
        tracking.log_new_params({"epochs_planned": plan.epochs, "train_steps": plan.total_steps})
        if plan.step_seconds is not None:
            rate = config.batch_size / plan.step_seconds
            mlflow.log_metrics({"budget_step_seconds": plan.step_seconds, "budget_images_per_s": rate,
                                "budget_measure_seconds": plan.measure_seconds})
            say("train", f"budget {config.budget_minutes:g} min: measured {plan.step_seconds:.2f} s/step "
                          f"({rate:,.0f} img/s) in {plan.measure_seconds:.0f} s, so {plan.total_steps} steps "
                          f"= {plan.total_steps / plan.steps_per_epoch:.2f} epochs")
        else:
            say("train", f"{plan.epochs} epochs of {plan.steps_per_epoch} steps")

    def on_epoch(r: training.EpochResult) -> None:
        log_epoch(r)
        say("train", f"Epoch [{r.epoch}/{planned[0]}], Loss: {r.loss:.4f}, Accuracy: {r.accuracy:.2%}, "
                      f"{r.seconds:.1f}s ({r.images_per_s:,.0f} img/s)")

    if resume is not None:
        done = [training.EpochResult(**h) for h in resume["history"]]
        for r in done:  # the curve so far, so this run alone shows the whole training
            log_epoch(r)
        mlflow.set_tag("cifar10.resumed_from", f"{resume_run_id} after epoch {len(done)}")
        say("train", f"resuming train run {resume_run_id} after epoch {len(done)} of {config.epochs}")
    history = training.train(net, torch.from_numpy(dataset.train_images),
                             torch.from_numpy(dataset.train_labels).long(), config, target, on_epoch,
                             on_checkpoint=log_checkpoint, resume=resume, on_plan=on_plan)
    mlflow.log_metric("train_seconds", sum(r.seconds for r in history))
    net.cpu().eval()
    mlflow.log_figure(plots.training_curves(history), "training_curves.png")
    if (rss := peak_rss_mib()) is not None:
        mlflow.log_metric("peak_rss_mib", rss)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(C.CHECKPOINT_PATH).name
        torch.save(training.checkpoint(net, config, {}, history), path)
        mlflow.log_artifact(str(path), str(Path(C.CHECKPOINT_PATH).parent))
    info = log_pytorch_flavor(models.RawPixelClassifier(net).eval(), dataset)
    mlflow.set_tag(C.TAG_PYTORCH_MODEL_URI, info.model_uri)
    say("train", f"logged the PyTorch model as {info.model_uri}")


def prepare(ingest_run_id: str, recipe: str, device: str, resume_run_id: str, nproc_per_node: str, world: int,
            overrides: dict):
    """Every check, the data and the resolved config, before any training."""
    target = training.select_device(params.choice("device", device, params.DEVICES))
    nproc = params.positive_int("nproc_per_node", nproc_per_node)
    if nproc != world:
        raise UserError(f"nproc_per_node is {nproc} but {world} process(es) are running; start the step through "
                        "`mlflow run` (it launches torchrun itself) or torchrun with the same number")
    if world > 1 and target.type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    ingest_run_id = params.run_id("ingest_run_id", ingest_run_id)
    dataset = dataset_of(ingest_run_id, ("train", "test"))
    resume_run_id = str(resume_run_id).strip()
    if resume_run_id.lower() not in ("", "none"):  # the killed run's parameters; those given must agree
        resume = resumable(resume_run_id, ingest_run_id)
        config = recipes.TrainConfig(**resume["config"])
        differ = {k: v for k, v in recipes.explicit(overrides).items() if getattr(config, k) != v}
        if differ:
            raise UserError(f"resume_run_id {resume_run_id} was trained with "
                            + ", ".join(f"{k}={getattr(config, k)!r}" for k in differ)
                            + f", not {', '.join(f'{k}={v!r}' for k, v in differ.items())}; a resumed run keeps "
                            "its parameters")
    else:
        resume, config = None, recipes.resolve(recipe, overrides)
    if config.batch_size % world:
        raise UserError(f"batch_size {config.batch_size} is the global batch and must be a multiple of "
                        f"nproc_per_node ({world})")
    if config.budget_minutes and world > 1:
        raise UserError("budget_minutes plans from one process's measured speed; use it with nproc_per_node=1")
    config, why = hardware.decide(config, hardware.capabilities(target))
    return config, why, target, dataset, resume, ingest_run_id, resume_run_id


def run_worker(device: str, **_ignored) -> None:
    """Ranks 1..N-1 under torchrun: train on their shards with what rank 0 shares; no MLflow at all."""
    payload = training.share()
    if payload is None:  # rank 0 failed its checks and reports why
        return
    config = payload["config"]
    target = training.select_device(params.choice("device", device, params.DEVICES))
    if target.type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())
    training.seed_everything(config.seed)
    net = models.build(config.model)
    training.train(net, torch.from_numpy(payload["train_images"]), torch.from_numpy(payload["train_labels"]).long(),
                   config, target, resume=payload["resume"])


def log_epoch(r: training.EpochResult) -> None:
    mlflow.log_metrics({"train_loss": r.loss, "train_accuracy": r.accuracy, "epoch_seconds": r.seconds,
                        "train_images_per_s": r.images_per_s}, step=r.epoch)


def log_checkpoint(state: dict) -> None:
    """One file per epoch, never overwritten: a kill during an upload spoils at most the newest one."""
    epoch = len(state["history"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / C.EPOCH_CHECKPOINT.format(epoch=epoch)
        torch.save(state, path)
        mlflow.log_artifact(str(path), C.EPOCH_CHECKPOINT_DIR)
    mlflow.set_tag(C.TAG_LAST_CHECKPOINT, str(epoch))


def resumable(resume_run_id: str, ingest_run_id: str) -> dict:
    """The newest readable epoch checkpoint of a train run that did not finish, on the same data."""
    resume_run_id = params.run_id("resume_run_id", resume_run_id)
    try:
        old = mlflow.get_run(resume_run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"resume_run_id {resume_run_id}: no such run in {mlflow.get_tracking_uri()}") from None
    if old.data.tags.get(tracking.STEP_TAG) != "train":
        raise UserError(f"resume_run_id {resume_run_id} is not a train run")
    if old.info.status == "FINISHED":
        raise UserError(f"resume_run_id {resume_run_id} FINISHED already; nothing to resume")
    digest = mlflow.get_run(ingest_run_id).data.tags.get("cifar10.sha256")
    if old.data.tags.get("cifar10.sha256") != digest:
        raise UserError(f"resume_run_id {resume_run_id} trained on other data (sha256 "
                        f"{old.data.tags.get('cifar10.sha256', '?')[:12]}…, now {str(digest)[:12]}…)")
    client = mlflow.MlflowClient()
    if old.info.status == "RUNNING":  # its process was killed outright (SIGKILL, power cut): end it for it
        client.set_tag(resume_run_id, "cifar10.resumed_by", mlflow.active_run().info.run_id)
        client.set_terminated(resume_run_id, "KILLED")
    names = [f.path for f in client.list_artifacts(resume_run_id, C.EPOCH_CHECKPOINT_DIR)]
    for name in sorted(names, reverse=True):  # zero-padded epoch numbers: newest first
        try:
            state = torch.load(tracking.artifact(resume_run_id, name), map_location="cpu", weights_only=True)
            if state.get("format") != training.CHECKPOINT_FORMAT:
                raise ValueError(f"format {state.get('format')!r}")
        except Exception as exc:  # e.g. a file cut short by the kill: fall back to the epoch before
            say("train", f"skipping unusable checkpoint {name} of run {resume_run_id}: {exc}")
            continue
        return state
    raise UserError(f"resume_run_id {resume_run_id} has no usable epoch checkpoint under {C.EPOCH_CHECKPOINT_DIR}/; "
                    "start a new run")


def log_pytorch_flavor(model: torch.nn.Module, dataset: datalib.Cifar10):
    # pt2 (torch.export) wants a numpy example with a batch >= 2, else the batch size is fixed at 1.
    example = nhwc(dataset.test_images[:4] if len(dataset.test_images) >= 2 else dataset.train_images[:4])
    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    return mlmodel.log_pytorch(
        model, C.PYTORCH_MODEL_NAME, infer_signature(example, logits), example, dataset.class_names,
        model_metadata(dataset.class_names),
        [f"torch=={base_version(torch.__version__)}", f"mlflow=={mlflow.__version__}"],
    )


def trained(train_run_id: str):
    """The train run, its network rebuilt from the checkpoint (eval mode, CPU), and its config."""
    run = tracking.upstream(train_run_id, "train")
    path = tracking.artifact(train_run_id, C.CHECKPOINT_PATH)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint of train run {train_run_id} is unreadable ({path}): {exc}") from None
    net, config = training.rebuild(ckpt)
    return run, net, config
