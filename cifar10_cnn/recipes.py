"""Training recipes: every hyperparameter in one place, with its unit. No torch here.

A recipe is a complete `TrainConfig`. `-P recipe=fast` picks one; any training parameter given
explicitly (anything but 'auto') overrides the recipe's value, so `-P recipe=fast -P epochs=12` is
the fast recipe trained longer, and the default recipe is the seed's tutorial, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from . import params
from .errors import UserError

OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "onecycle", "cosine")
PRECISIONS = ("fp32", "bf16")
MODEL_NAMES = ("simple_cnn", "vgg11", "vgg16", "resnet18", "fastnet")  # models.MODELS checks it agrees
AUTO = "auto"  # a training parameter left at 'auto' takes the recipe's value


@dataclass(frozen=True)
class TrainConfig:
    """The seed's recipe is the default."""

    model: str = "simple_cnn"  # a name in models.MODELS
    epochs: int = 5  # passes over the training set
    batch_size: int = 32  # images per optimizer step
    learning_rate: float = 1e-3  # step size (the peak, when there is a schedule)
    optimizer: str = "adam"  # adam | sgd (SGD with Nesterov momentum 0.9)
    weight_decay: float = 0.0  # L2 penalty on conv and linear weights (never on biases or batch norm)
    lr_schedule: str = "constant"  # constant | onecycle (linear up, linear down to 0) | cosine (down to 0)
    warmup_epochs: float = 0.0  # epochs of linear warm-up from 0 to learning_rate
    label_smoothing: float = 0.0  # probability mass spread over all classes in the loss target
    augment: bool = False  # random crop from the image padded by 4 pixels + horizontal flip, per batch
    precision: str = "fp32"  # fp32 | bf16 (autocast: matmuls and convolutions in bfloat16)
    channels_last: bool = False  # NHWC memory format: faster convolutions on CPUs with oneDNN, and GPUs
    seed: int = 42  # model init, shuffling and augmentation


RECIPES: dict[str, TrainConfig] = {
    # The tutorial, layer for layer and number for number: 60-62 % in 5 epochs.
    "seed": TrainConfig(),
    # FastNet with one-cycle Nesterov SGD, label smoothing and flip+crop, in bf16 and channels-last.
    # Tuned on 2 CPU cores (README, "Models and recipes"); on a GPU it runs as is.
    "fast": TrainConfig(
        model="fastnet", epochs=10, batch_size=512, learning_rate=0.4, optimizer="sgd", weight_decay=5e-4,
        lr_schedule="onecycle", warmup_epochs=2.0, label_smoothing=0.2, augment=True, precision="bf16",
        channels_last=True,
    ),
}

# Whether main also scores horizontally flipped test images (evaluate's `tta`) when tta is 'auto'.
RECIPE_TTA = {"seed": False, "fast": True}
assert set(RECIPE_TTA) == set(RECIPES)


def _fraction(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}") from None
    if not 0 <= number < 1:
        raise UserError(f"{name} must be a number in [0, 1), got {value!r}")
    return number


def _non_negative_float(name: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{name} must be a number >= 0, got {value!r}") from None
    if not (math.isfinite(number) and number >= 0):
        raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


_PARSERS = {
    "model": lambda v: params.choice("model", v, MODEL_NAMES),
    "epochs": lambda v: params.positive_int("epochs", v),
    "batch_size": lambda v: params.positive_int("batch_size", v),
    "learning_rate": lambda v: params.positive_float("learning_rate", v),
    "optimizer": lambda v: params.choice("optimizer", v, OPTIMIZERS),
    "weight_decay": lambda v: _non_negative_float("weight_decay", v),
    "lr_schedule": lambda v: params.choice("lr_schedule", v, LR_SCHEDULES),
    "warmup_epochs": lambda v: _non_negative_float("warmup_epochs", v),
    "label_smoothing": lambda v: _fraction("label_smoothing", v),
    "augment": lambda v: params.boolean("augment", v),
    "precision": lambda v: params.choice("precision", v, PRECISIONS),
    "channels_last": lambda v: params.boolean("channels_last", v),
    "seed": lambda v: params.non_negative_int("seed", v),
}
FIELDS = tuple(f.name for f in fields(TrainConfig))
assert set(_PARSERS) == set(FIELDS), "every TrainConfig field needs a parser"


def explicit(overrides: dict[str, str]) -> dict:
    """The training parameters given a value (not 'auto'), parsed and checked."""
    unknown = set(overrides) - set(FIELDS)
    if unknown:
        raise UserError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
    return {k: _PARSERS[k](str(v).strip()) for k, v in overrides.items() if str(v).strip().lower() != AUTO}


def resolve(recipe: str, overrides: dict[str, str]) -> TrainConfig:
    """The named recipe with every parameter that is not 'auto' put in its place, all of them checked."""
    config = replace(RECIPES[params.choice("recipe", recipe, tuple(RECIPES))], **explicit(overrides))
    if config.warmup_epochs > config.epochs:
        raise UserError(f"warmup_epochs ({config.warmup_epochs}) is longer than the training ({config.epochs} epochs)")
    return config
