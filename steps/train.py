"""train: train a network on the ingest run's data; log its curves and checkpoints (export logs the models).

With --nproc-per-node N > 1 the step re-starts itself under torchrun (one process per shard,
DistributedDataParallel); rank 0 logs to the MLflow run, the other ranks never open one.
"""

import sys
from dataclasses import asdict

import mlflow
import torch

from cifar10_cnn import (
    checkpoints,
    distributed,
    entry_points,
    hardware,
    models,
    params,
    plots,
    recipes,
    tracking,
    training,
)
from cifar10_cnn import constants as C
from cifar10_cnn import data as datalib
from cifar10_cnn.errors import UserError
from cifar10_cnn.progress import say


def run(ingest_run_id: str, recipe: str, device: str, resume_run_id: str = "none", nproc_per_node: str = "1",
        **overrides: str) -> None:
    """Train `recipe` with `overrides` (each 'auto' or a value), or continue the killed run `resume_run_id`.

    Under torchrun this is rank 0: it alone talks to MLflow, and hands the other ranks (`run_worker`)
    the resolved config, the data and any resume state.
    """
    rank, world = distributed.rank_and_world()
    try:
        config, why, target, dataset, resume, ingest_run_id, resume_run_id = prepare(
            ingest_run_id, recipe, device, resume_run_id, nproc_per_node, world, overrides)
        # validation > 0: a class-balanced sample of the training images is held out, never trained on, and
        # scored after every epoch (the images a search chooses on; the test images stay for the final model).
        kept, held = datalib.holdout(dataset.train_labels, config.validation, config.seed)
    except BaseException:
        if world > 1:
            distributed.share(None)  # the other ranks stop instead of waiting for data that never comes
        raise
    images, labels = torch.from_numpy(dataset.train_images), torch.from_numpy(dataset.train_labels).long()
    held_out = (images[held], labels[held]) if len(held) else None
    if len(held):
        images, labels = images[kept], labels[kept]
    if world > 1:
        distributed.share({"config": config, "resume": resume, "train_images": images, "train_labels": labels})
        mlflow.log_params({"world_size": world, "per_process_batch": config.batch_size // world})
        say("train", f"{world} processes ({'NCCL' if target.type == 'cuda' else 'gloo'}), global batch "
                      f"{config.batch_size} = {world} x {config.batch_size // world}, learning rate as given")

    net = models.build(config.model, seed=config.seed)
    n_params = models.count_parameters(net)
    tracking.log_new_params({**asdict(config), "num_parameters": n_params, "train_device": target,
                             "train_records": len(labels), "validation_records": len(held),
                             "precision_used": config.precision,
                             "channels_last_used": config.channels_last})
    mlflow.log_dict(asdict(config), "config.json")  # the resolved recipe, whatever the params said
    caps = hardware.capabilities(target)
    mlflow.set_tags({C.TAG_SHA256: mlflow.get_run(ingest_run_id).data.tags.get(C.TAG_SHA256, ""),
                     C.TAG_HARDWARE: hardware.describe(caps), **{C.TAG_DECISION + k: v for k, v in why.items()}})
    for key, reason in why.items():
        say("train", f"{key}: {reason}" if key != "warning" else f"WARNING: {reason}")
    filters = f" (filters {config.filter_lr})" if config.optimizer == "muon" else ""
    say("train", f"{config.model}, {n_params:,} parameters, {len(labels):,} images"
                  + (f" ({len(held):,} held out)" if len(held) else "") + " on "
                  f"{hardware.describe(caps)}; batch {config.batch_size}, {config.optimizer} lr {config.learning_rate}"
                  f"{filters} ({config.lr_schedule}), {config.precision}"
                  + (", channels-last" if config.channels_last else "") + (", flip+crop" if config.augment else ""))
    planned = [config.epochs]

    def on_plan(plan: training.Plan) -> None:
        planned[0] = plan.epochs
        tracking.log_new_params({"epochs_planned": plan.epochs, "train_steps": plan.total_steps,
                                 "steps_per_epoch": plan.steps_per_epoch})
        if plan.step_seconds is None:
            say("train", f"{plan.epochs} epochs of {plan.steps_per_epoch} steps")
            return
        rate = config.batch_size / plan.step_seconds
        mlflow.log_metrics({"budget_step_seconds": plan.step_seconds, "budget_images_per_s": rate,
                            "budget_measure_seconds": plan.measure_seconds})
        say("train", f"budget {config.budget_minutes:g} min: measured {plan.step_seconds:.2f} s/step "
                      f"({rate:,.0f} img/s) in {plan.measure_seconds:.0f} s, so {plan.total_steps} steps "
                      f"= {plan.total_steps / plan.steps_per_epoch:.2f} epochs")

    def on_epoch(r: training.EpochResult) -> None:
        log_epoch(r)
        held_out_line = f", val accuracy {r.val_accuracy:.2%}" if r.val_accuracy is not None else ""
        say("train", f"Epoch [{r.epoch}/{planned[0]}], Loss: {r.loss:.4f}, Accuracy: {r.accuracy:.2%}"
                      f"{held_out_line}, {r.seconds:.1f}s ({r.images_per_s:,.0f} img/s)")

    if resume is not None:
        done = [training.EpochResult(**h) for h in resume["history"]]
        for r in done:  # the curve so far, so this run alone shows the whole training
            log_epoch(r)
        mlflow.set_tag(C.TAG_RESUMED_FROM, f"{resume_run_id} after epoch {len(done)}")
        say("train", f"resuming train run {resume_run_id} after epoch {len(done)} of {config.epochs}")

    def on_checkpoint(net, history: list, state: dict) -> None:
        checkpoints.log_epoch_checkpoint(checkpoints.snapshot(net, config, history, state))

    history = training.train(net, images, labels, config, target, on_epoch, on_checkpoint=on_checkpoint,
                             resume=resume, on_plan=on_plan, held_out=held_out)

    mlflow.log_metric("train_seconds", sum(r.seconds for r in history))
    net.cpu().eval()
    mlflow.log_figure(plots.training_curves(history), "training_curves.png")
    if (rss := hardware.peak_rss_mib()) is not None:
        mlflow.log_metric("peak_rss_mib", rss)
    checkpoints.log_final(checkpoints.snapshot(net, config, history))


def prepare(ingest_run_id: str, recipe: str, device: str, resume_run_id: str, nproc_per_node: str, world: int,
            overrides: dict):
    """Every check, the data and the resolved config, before any training."""
    target = hardware.select_device(params.choice("device", device, params.DEVICES))
    nproc = params.POSITIVE_INT("nproc_per_node", nproc_per_node)
    if nproc != world:
        raise UserError(f"nproc_per_node is {nproc} but {world} process(es) are running; start the step through "
                        "`mlflow run` (it launches torchrun itself) or torchrun with the same number")
    if world > 1 and target.type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
    ingest_run_id = params.run_id("ingest_run_id", ingest_run_id)
    resume_run_id = str(resume_run_id).strip()
    if resume_run_id.lower() not in ("", "none"):  # the killed run's parameters; those given must agree
        resume = checkpoints.resumable(resume_run_id, ingest_run_id, recipe)
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
    dataset = tracking.dataset_of(ingest_run_id, ("train",))  # last: a bad parameter fails before any data is read
    return config, why, target, dataset, resume, ingest_run_id, resume_run_id


def run_worker(device: str, **_ignored) -> None:
    """Ranks 1..N-1 under torchrun: train on their shards with what rank 0 shares; no MLflow at all."""
    payload = distributed.share()
    if payload is None:  # rank 0 failed its checks and reports why
        return
    config = payload["config"]
    target = hardware.select_device(params.choice("device", device, params.DEVICES))
    if target.type == "cuda":
        target = torch.device("cuda", torch.cuda.current_device())
    net = models.build(config.model, seed=config.seed)
    training.train(net, payload["train_images"], payload["train_labels"], config, target, resume=payload["resume"])


def log_epoch(r: training.EpochResult) -> None:
    held_out = {"val_loss": r.val_loss, "val_accuracy": r.val_accuracy} if r.val_accuracy is not None else {}
    mlflow.log_metrics({"train_loss": r.loss, "train_accuracy": r.accuracy, "epoch_seconds": r.seconds,
                        "train_images_per_s": r.images_per_s, **held_out}, step=r.epoch)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = entry_points.parser("train", __doc__).parse_args(argv)
    tracking.end_with_parent()  # before torchrun takes this process over: it would outlive a killed recipe
    try:
        distributed.relaunch_under_torchrun("steps.train", argv, args.nproc_per_node, args.device)  # or returns
    except UserError as exc:  # before any run: mlflow run ends its run FAILED on the exit code
        print(f"error: train: {exc}", file=sys.stderr)
        sys.exit(2)
    rank, _ = distributed.join(args.device)
    try:
        if rank == 0:
            tracking.run_step("train", run, system_metrics=True, **vars(args))
        else:
            run_worker(**vars(args))
    finally:
        distributed.leave()
    if rank != 0:
        distributed.exit_worker()


if __name__ == "__main__":
    main()
