"""evaluate: test-set loss, accuracy, per-class accuracy and a confusion matrix for a train run."""

from __future__ import annotations

import mlflow
import torch

from .. import constants as C
from .. import evaluation, models, params, plots, recipes, tracking, training
from .common import dataset_of, say
from .train import trained


def run(train_run_id: str, device: str, tta: str = "false") -> None:
    target = training.select_device(params.choice("device", device, params.DEVICES))
    tta = recipes.tta_level(tta)
    train_run, net, config = trained(params.run_id("train_run_id", train_run_id))
    ingest_run_id = train_run.data.params["ingest_run_id"]
    dataset = dataset_of(ingest_run_id, ("test",))
    tracking.log_new_params({"model": config.model, "eval_device": target, "ingest_run_id": ingest_run_id})

    model = models.RawPixelClassifier(net).to(target).eval()
    images = torch.from_numpy(dataset.test_images).to(target).permute(0, 2, 3, 1)  # NHWC view, as served
    logits = evaluation.predict_logits(model, images)
    result = evaluation.evaluate(logits, torch.from_numpy(dataset.test_labels), C.NUM_CLASSES)

    if tta != "false":  # logged beside, never instead of, the plain accuracy: the served model sees one view
        augmented = evaluation.predict_logits(evaluation.with_tta(model, tta, h_dim=1, w_dim=2), images)
        scored = evaluation.evaluate(augmented, torch.from_numpy(dataset.test_labels), C.NUM_CLASSES)
        mlflow.log_metrics({"test_accuracy_tta": scored.accuracy, "test_loss_tta": scored.loss})
        say("evaluate", f"with test-time augmentation ({tta}): test accuracy {scored.accuracy:.2%}")
    names = dataset.class_names
    mlflow.log_metrics({"test_loss": result.loss, "test_accuracy": result.accuracy,
                        **{f"test_accuracy_{n}": a for n, a in zip(names, result.per_class_accuracy, strict=True)}})
    mlflow.log_dict({"classes": list(names), "per_class_accuracy": result.per_class_accuracy,
                     "confusion": result.confusion.tolist()}, "evaluation.json")
    mlflow.log_figure(plots.confusion_matrix(result.confusion, names), "confusion_matrix.png")
    mlflow.log_figure(plots.per_class_accuracy(names, result.per_class_accuracy, result.accuracy),
                      "per_class_accuracy.png")
    probabilities = torch.softmax(logits, 1).numpy()
    mlflow.log_figure(plots.confident_mistakes(dataset.test_images, dataset.test_labels, probabilities, names),
                      "confident_mistakes.png")
    say("evaluate", f"test loss {result.loss:.4f}, test accuracy {result.accuracy:.2%} "
                     f"on {len(dataset.test_labels):,} images")
