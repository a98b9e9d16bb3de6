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

OPTIMIZERS = ("adam", "sgd", "muon")
LR_SCHEDULES = ("constant", "onecycle", "cosine", "triangle")
PRECISIONS = ("fp32", "bf16")
# A recipe's precision or channels_last may be HARDWARE: the train step decides on the device it trains on
# (cifar10_cnn/hardware.py): bf16 only where that device computes it natively, NHWC where it is faster.
HARDWARE = "auto"
MODEL_NAMES = ("simple_cnn", "vgg11", "vgg16", "resnet18", "fastnet", "airnet")  # models.MODELS checks it agrees
AUTO = "auto"  # a training parameter left at 'auto' takes the recipe's value


@dataclass(frozen=True)
class TrainConfig:
    """The seed's recipe is the default."""

    model: str = "simple_cnn"  # a name in models.MODELS
    epochs: int = 5  # passes over the training set
    batch_size: int = 32  # images per optimizer step
    learning_rate: float = 1e-3  # step size (the peak, when there is a schedule)
    optimizer: str = "adam"  # adam | sgd (SGD with Nesterov momentum) | muon (Muon for conv filters, sgd for the rest)
    weight_decay: float = 0.0  # L2 penalty on conv and linear weights (never on biases or batch norm)
    lr_schedule: str = "constant"  # constant | onecycle (linear up, linear down to 0) | cosine (down to 0)
    #                                | triangle (linear from 0.2x up over the warm-up, then down to 0.07x)
    warmup_epochs: float = 0.0  # epochs of linear warm-up from 0 to learning_rate
    label_smoothing: float = 0.0  # probability mass spread over all classes in the loss target
    augment: bool = False  # random crop from the reflect-padded image + horizontal flip, per batch
    precision: str = "fp32"  # fp32 | bf16 (autocast: matmuls and convolutions in bfloat16) | HARDWARE
    channels_last: bool | str = False  # NHWC memory format: faster convolutions with oneDNN and on GPUs | HARDWARE
    seed: int = 42  # model init, shuffling and augmentation
    momentum: float = 0.9  # SGD's Nesterov momentum (Adam ignores it)
    bias_lr_scale: float = 1.0  # batch-norm parameters learn this many times faster than the weights
    lookahead: bool = False  # after 3 epochs, move the weights to their running average every 5 steps
    crop_padding: int = 4  # pixels each way that augment's random crops move the image (edge mirrored in)
    alternating_flip: bool = False  # augment flips each image in every other epoch (random start), not at random
    budget_minutes: float = 0.0  # > 0: train as many steps as fit these minutes (measured first); epochs is ignored
    filter_lr: float = 0.06  # muon: a conv filter bank's step per optimizer step, relative to its norm (the peak)


RECIPES: dict[str, TrainConfig] = {
    # The tutorial, layer for layer and number for number: 60-62 % in 5 epochs.
    "seed": TrainConfig(),
    # AirNet trained the way the CIFAR-10 speed-runs train (airbench's 93 % network and airbench94_muon's
    # optimizer, read and rewritten). The conv filter banks by Muon (cifar10_cnn/muon.py): each step moves a
    # bank by filter_lr = 6 % of its norm at first, decaying linearly to 0 (airbench94_muon: 0.24 over 25
    # steps an epoch at batch 2,000; we take 98 steps an epoch, so about a quarter of it), Nesterov momentum
    # 0.85. Everything else by Nesterov SGD as airbench93 sets it: 1.5 x batch / 1,024 for our mean loss,
    # lr x weight_decay = 0.002 x batch / 1,024, batch-norm shifts at 64x the rate; label smoothing 0.2;
    # 2-pixel crops with alternating flips; no lookahead (Muon with it untried). Batch 512, not 1,024: on
    # 2 CPU cores an epoch costs 1.33x FastNet's instead of 1.5-1.6x (bench.models --recipes), and twice
    # the steps. On Zen 3 (2026-11-28), seed 42: 88.70 % / 90.00 % with TTA in 10 epochs; the same recipe with
    # SGD, a triangle schedule and lookahead gave 88.40 / 89.14 (docs/models-and-recipes.md).
    "fast": TrainConfig(
        model="airnet", epochs=10, batch_size=512, learning_rate=0.75, optimizer="muon", filter_lr=0.06,
        weight_decay=0.002 / 1.5, lr_schedule="onecycle", warmup_epochs=0.0, label_smoothing=0.2, augment=True,
        precision=HARDWARE, channels_last=HARDWARE, momentum=0.85, bias_lr_scale=64.0, lookahead=False,
        crop_padding=2, alternating_flip=True,
    ),
}

# What evaluate also scores when tta is 'auto': flip = the mirror image too; crops = mirror images of
# the image and of its two 1-pixel diagonal shifts (evaluation.multi_crop).
TTA_LEVELS = ("false", "flip", "crops")
RECIPE_TTA = {"seed": "false", "fast": "crops"}
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
    "momentum": lambda v: _fraction("momentum", v),
    "bias_lr_scale": lambda v: params.positive_float("bias_lr_scale", v),
    "lookahead": lambda v: params.boolean("lookahead", v),
    "crop_padding": lambda v: params.non_negative_int("crop_padding", v),
    "alternating_flip": lambda v: params.boolean("alternating_flip", v),
    "budget_minutes": lambda v: _non_negative_float("budget_minutes", v),
    "filter_lr": lambda v: params.positive_float("filter_lr", v),
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
    """The named recipe with every parameter that is not 'auto' put in its place, all of them checked.

    With budget_minutes > 0, epochs only shapes the schedule (the warm-up's share of the training):
    the train step measures its speed and trains as many steps as fit the budget.
    """
    given = explicit(overrides)
    config = replace(RECIPES[params.choice("recipe", recipe, tuple(RECIPES))], **given)
    if config.warmup_epochs > config.epochs:
        raise UserError(f"warmup_epochs ({config.warmup_epochs}) is longer than the training ({config.epochs} epochs)")
    return config


def tta_level(value: str, recipe: str | None = None) -> str:
    """evaluate's test-time augmentation: 'auto' is the recipe's; true means flip, as it always did."""
    text = str(value).strip().lower()
    if text == AUTO and recipe is not None:
        return RECIPE_TTA[recipe]
    return params.choice("tta", {"true": "flip", "none": "false"}.get(text, text), TTA_LEVELS)
