"""evaluate: test-set loss, accuracy, per-class accuracy and a confusion matrix for a train run."""

import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from cifar10_cnn import checkpoints, cores, entry_points, evaluation, hardware, models, params, plots, recipes, tracking
from cifar10_cnn import constants as C
from cifar10_cnn.progress import say


def run(train_run_id: str, device: str, tta: str) -> None:
    target = hardware.select_device(params.choice("device", device, params.DEVICES))
    train_run, net, config = checkpoints.trained(params.run_id("train_run_id", train_run_id))
    tta = recipes.tta_level(tta, train_run.data.params.get("recipe"))
    ingest_run_id = train_run.data.params["ingest_run_id"]
    dataset = tracking.dataset_of(ingest_run_id, ("test",))
    tracking.log_new_params({"model": config.model, "eval_device": target, "ingest_run_id": ingest_run_id,
                             "tta_used": tta})

    # In the training's memory format; the augmented views also in its precision where the device has it
    # natively (the plain logits stay float32: that is the model that is served and exported).
    model = models.RawPixelClassifier(net).to(target).eval()
    if config.channels_last is True:
        model.to(memory_format=torch.channels_last)
    native_bf16 = config.precision == "bf16" and hardware.capabilities(target).native_bf16
    low_precision = torch.autocast(target.type, dtype=torch.bfloat16) if native_bf16 else None
    if tta != "false":
        tracking.log_new_params({"tta_precision": "bf16" if native_bf16 else "fp32"})
    images = torch.from_numpy(dataset.test_images).to(target).permute(0, 2, 3, 1)  # NHWC view, as served
    labels = torch.from_numpy(dataset.test_labels)
    logits, augmented = evaluation.plain_and_tta_logits(cores.taking_freed("evaluate", model), images, tta,
                                                        h_dim=1, w_dim=2, low_precision=low_precision,
                                                        batch_size=evaluation.batch_size_for(target))
    result = evaluation.evaluate(logits, labels, C.NUM_CLASSES)
    if augmented is not None:  # logged beside, never instead of, the plain accuracy: the served model sees one view
        scored = evaluation.evaluate(augmented, labels, C.NUM_CLASSES)
        mlflow.log_metrics({"test_accuracy_tta": scored.accuracy, "test_loss_tta": scored.loss})
        say("evaluate", f"with test-time augmentation ({tta}"
                        f"{', bf16' if native_bf16 else ''}): test accuracy {scored.accuracy:.2%}")

    names = dataset.class_names
    mlflow.log_metrics({"test_loss": result.loss, "test_accuracy": result.accuracy,
                        **{f"test_accuracy_{n}": a for n, a in zip(names, result.per_class_accuracy, strict=True)}})
    mlflow.log_dict({"classes": list(names), "per_class_accuracy": result.per_class_accuracy,
                     "confusion": result.confusion.tolist()}, "evaluation.json")
    with tempfile.TemporaryDirectory() as tmp:  # export checks its ONNX and PyTorch models against these
        np.save(Path(tmp) / C.TEST_LOGITS_PATH, logits.cpu().numpy(), allow_pickle=False)
        mlflow.log_artifact(str(Path(tmp) / C.TEST_LOGITS_PATH))
    mlflow.log_figure(plots.confusion_matrix(result.confusion, names), "confusion_matrix.png")
    mlflow.log_figure(plots.per_class_accuracy(names, result.per_class_accuracy, result.accuracy),
                      "per_class_accuracy.png")
    probabilities = torch.softmax(logits, 1).numpy()
    mlflow.log_figure(plots.confident_mistakes(dataset.test_images, dataset.test_labels, probabilities, names),
                      "confident_mistakes.png")
    say("evaluate", f"test loss {result.loss:.4f}, test accuracy {result.accuracy:.2%} "
                     f"on {len(dataset.test_labels):,} images")


def main(argv=None):
    args = entry_points.parser("evaluate", __doc__).parse_args(argv)
    tracking.run_step("evaluate", run, **vars(args))


if __name__ == "__main__":
    main()
