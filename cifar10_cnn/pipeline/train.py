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
from .. import models, params, plots, tracking, training
from ..errors import UserError
from .common import base_version, dataset_of, model_metadata, nhwc, peak_rss_mib, say


def run(ingest_run_id: str, epochs: str, batch_size: str, learning_rate: str, seed: str, device: str) -> None:
    config = training.TrainConfig(
        epochs=params.positive_int("epochs", epochs),
        batch_size=params.positive_int("batch_size", batch_size),
        learning_rate=params.positive_float("learning_rate", learning_rate),
        seed=params.non_negative_int("seed", seed),
    )
    target = training.select_device(params.choice("device", device, params.DEVICES))
    ingest_run_id = params.run_id("ingest_run_id", ingest_run_id)
    dataset = dataset_of(ingest_run_id, ("train", "test"))

    training.seed_everything(config.seed)
    net = models.build(config.model)
    n_params = models.count_parameters(net)
    tracking.log_new_params({**asdict(config), "num_parameters": n_params, "train_device": target,
                             "train_records": len(dataset.train_labels)})
    mlflow.set_tag("cifar10.sha256", mlflow.get_run(ingest_run_id).data.tags.get("cifar10.sha256", ""))
    say("train", f"{config.model}, {n_params:,} parameters, {len(dataset.train_labels):,} images on {target}; "
                  f"{config.epochs} epochs, batch {config.batch_size}, Adam lr {config.learning_rate}")

    def on_epoch(r: training.EpochResult) -> None:
        mlflow.log_metrics({"train_loss": r.loss, "train_accuracy": r.accuracy, "epoch_seconds": r.seconds,
                            "train_images_per_s": r.images_per_s}, step=r.epoch)
        say("train", f"Epoch [{r.epoch}/{config.epochs}], Loss: {r.loss:.4f}, Accuracy: {r.accuracy:.2%}, "
                      f"{r.seconds:.1f}s ({r.images_per_s:,.0f} img/s)")

    history = training.train(net, torch.from_numpy(dataset.train_images),
                             torch.from_numpy(dataset.train_labels).long(), config, target, on_epoch)
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


def log_pytorch_flavor(model: torch.nn.Module, dataset: datalib.Cifar10):
    # pt2 (torch.export) wants a numpy example with a batch >= 2, else the batch size is fixed at 1.
    example = nhwc(dataset.test_images[:4] if len(dataset.test_images) >= 2 else dataset.train_images[:4])
    with torch.inference_mode():
        logits = model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        model, name=C.PYTORCH_MODEL_NAME, signature=infer_signature(example, logits), input_example=example,
        pip_requirements=[f"torch=={base_version(torch.__version__)}", f"mlflow=={mlflow.__version__}"],
        metadata=model_metadata(dataset.class_names),
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
