"""The figures render to PNG with the content they promise, and the model card says what it should."""

import io

import numpy as np

from cifar10_cnn import cards, plots, synthetic
from cifar10_cnn import constants as C
from cifar10_cnn.training import EpochResult


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def texts(fig) -> str:
    return " ".join(t.get_text() for ax in fig.axes for t in [*ax.texts, ax.title, *ax.get_xticklabels()])


def test_figures_render_as_png():
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 10
    images = synthetic.images_for(labels, rng)
    probs = rng.dirichlet(np.ones(10), size=60)
    history = [EpochResult(e, 2.0 / e, 0.1 * e, 1.0, 100.0) for e in (1, 2, 3)]
    confusion = np.diag([10] * 10)
    grid = plots.sample_grid(images, labels, C.CLASS_NAMES, scale=3)
    buffer = io.BytesIO()
    grid.save(buffer, format="png")
    assert buffer.getvalue().startswith(b"\x89PNG")
    # row c starts with the first image of class c, enlarged 3x, right of the names' column
    margin, row = grid.width - (8 * 34 - 2) * 3, 34 * 3
    assert grid.height == 10 * row - 6 and margin > 0
    for c in (0, 9):
        first = images[np.flatnonzero(labels == c)[0]].transpose(1, 2, 0)
        cell = np.asarray(grid)[c * row : c * row + 96 : 3, margin : margin + 96 : 3]
        assert np.array_equal(cell, first)
    assert (np.asarray(grid)[:, : margin - 6] < 128).any()  # the class names are drawn in the margin
    for fig in (plots.training_curves(history),
                plots.confusion_matrix(confusion, C.CLASS_NAMES),
                plots.per_class_accuracy(C.CLASS_NAMES, [0.5] * 10, 0.5),
                plots.confident_mistakes(images, labels, probs, C.CLASS_NAMES)):
        assert png(fig).startswith(b"\x89PNG")
    assert "accuracy 100.00%" in texts(plots.confusion_matrix(confusion, C.CLASS_NAMES))


def test_confident_mistakes_shows_the_surest_wrong_predictions_first():
    labels = np.array([0, 1, 2, 3])
    probs = np.full((4, 10), 0.01)
    probs[0, 0] = 0.91  # right
    probs[1, 5] = 0.91  # wrong, sure
    probs[2, 7] = 0.55  # wrong, less sure
    probs[3, 3] = 0.91  # right
    images = np.zeros((4, 3, 32, 32), dtype=np.uint8)
    fig = plots.confident_mistakes(images, labels, probs, C.CLASS_NAMES)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["dog 91%\ntrue: automobile", "horse 55%\ntrue: bird"]


def test_model_card_says_how_good_and_how_to_use():
    card = cards.model_card(
        name="cifar10-cnn-onnx", version="7", flavor="onnx", model="simple_cnn", num_parameters=62006,
        train_params={"epochs": "5", "batch_size": "32", "learning_rate": "0.001", "seed": "42", "train_device": "cpu",
                      "optimizer": "adam"},
        source="/data/cifar.tar.gz", sha256="ab" * 32, sizes={"train": 50000, "test": 10000},
        test_accuracy=0.6040, test_loss=1.12, per_class={"cat": 0.5, "dog": 0.41}, onnx_max_abs_diff=4.8e-6,
        onnx_mismatches=0, parity_images=10000, run_ids={"train": "t" * 32, "pipeline": ""},
    )
    for needle in ("**simple_cnn** (62,006 parameters), onnx flavor", "Test accuracy 60.40 %", "cat 50.0 %, dog 41.0 %",
                   "max |logit difference| 4.8e-06 over 10,000 test images, 0 differing", "sha256 `" + "ab" * 32,
                   "Training: Adam, epochs 5, batch_size 32, learning_rate 0.001, seed 42, on cpu",
                   'mlflow.pyfunc.load_model("models:/cifar10-cnn-onnx/7")',
                   "mlflow models serve -m models:/cifar10-cnn-onnx/7", "uint8 RGB `[batch, 32, 32, 3]`"):
        assert needle in card, needle
    assert "pipeline" not in card  # empty run ids are left out
    fast = cards.model_card(  # what trained, after the budget and `auto` decided: not the recipe's request
        name="m", version="1", flavor="pytorch", model="airnet", num_parameters=569656,
        train_params={"epochs": "10", "epochs_planned": "4", "optimizer": "sgd", "lr_schedule": "triangle",
                      "precision": "auto", "precision_used": "fp32", "train_device": "cpu",
                      "train_records": "1000", "batch_size": "10", "train_steps": "350"},  # a budget: 3.5 epochs
        source="s", sha256="ab", sizes={"train": 1, "test": 1}, test_accuracy=0.9, test_loss=0.3, per_class={},
        onnx_max_abs_diff=0.0, onnx_mismatches=0, parity_images=1, run_ids={})
    assert "Training: SGD (Nesterov), epochs 3.50 (350 steps), batch_size 10, lr_schedule triangle, precision fp32, " \
           "on cpu" in fast


def test_a_card_says_what_trained_when_the_train_run_was_given_auto():
    from types import SimpleNamespace as Ns

    from cifar10_cnn import recipes

    auto = {name: "auto" for name in recipes.FIELDS}  # `mlflow run . -e train` logs its arguments as given
    facts = cards.card_facts(
        Ns(data=Ns(params={**auto, "num_parameters": "62006", "train_device": "cpu"}, tags={})),
        recipes.RECIPES["seed"], Ns(accuracy=0.6, loss=1.1, per_class_accuracy=[]),
        Ns(data=Ns(tags={}, metrics={})), [], Ns(max_abs_diff=0.0, argmax_mismatches=0, images=1), {})
    card = cards.model_card(name="m", version="1", flavor="pytorch", **facts)
    assert "**simple_cnn** (62,006 parameters)" in card
    assert "Training: Adam, epochs 5, batch_size 32, learning_rate 0.001, lr_schedule constant, precision fp32, " \
           "seed 42, on cpu" in card
