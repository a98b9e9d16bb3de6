"""Validation of step parameters.

MLflow passes every MLproject parameter to the scripts as a string and does not check the declared
type (`-P epochs=abc` arrives as 'abc'), so each step validates here before it does any work.
"""

from __future__ import annotations

import math
import re

from . import constants as C
from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def positive_int(name: str, value: str | int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UserError(f"{name} must be a whole number >= 1, got {value!r}") from None
    if number < 1:
        raise UserError(f"{name} must be a whole number >= 1, got {value!r}")
    return number


def non_negative_int(name: str, value: str | int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UserError(f"{name} must be a whole number >= 0, got {value!r}") from None
    if number < 0:
        raise UserError(f"{name} must be a whole number >= 0, got {value!r}")
    return number


def positive_float(name: str, value: str | float) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise UserError(f"{name} must be a number > 0, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise UserError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    value = str(value).strip().lower()
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def run_id(name: str, value: str) -> str:
    value = str(value).strip()
    if not _RUN_ID.match(value):
        raise UserError(f"{name} must be an MLflow run id (32 hex characters), got {value!r}")
    return value


def model_name(value: str) -> str:
    value = str(value).strip()
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", value):
        raise UserError(
            "model_name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit; got {value!r}"
        )
    return value


def expected_records(value: str) -> dict[str, int] | None:
    """'50000,10000' -> the record counts the archive must hold; 'any' -> any consistent size."""
    value = str(value).strip().lower()
    if value == "any":
        return None
    parts = value.split(",")
    if len(parts) != 2:
        raise UserError(f"expected_records must be 'TRAIN,TEST' (e.g. 50000,10000) or 'any', got {value!r}")
    train, test = (positive_int("expected_records", p) for p in parts)
    return {"train": train, "test": test}


def boolean(name: str, value: str | bool) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise UserError(f"{name} must be true or false, got {value!r}")


def version_ref(value: str) -> str:
    """A registered version: its number, or an alias such as 'candidate' or 'previous'."""
    text = str(value).strip()
    if not re.match(r"^([1-9][0-9]*|[A-Za-z][A-Za-z0-9_-]{0,63})$", text):
        raise UserError(f"version must be a version number or an alias (e.g. candidate, previous), got {value!r}")
    return text


# --- The step arguments, each declared once: (default or None when required, help). The recipe's
# hyperparameters (recipes.FIELDS) come on top, each defaulting to 'auto'. MLproject declares the same
# names and defaults (tests/test_project_files.py keeps the two in step).
OPTIONS: dict[str, tuple[str | None, str]] = {
    "data": ("auto", "auto, a URL, a .tar.gz archive or an extracted folder"),
    "expected_records": ("50000,10000", "TRAIN,TEST record counts, or 'any'"),
    "recipe": ("seed", "seed (the tutorial) or fast (AirNet, the speed-runs' recipe)"),
    "device": ("auto", "auto, cpu, cuda or mps"),
    "nproc_per_node": ("1", "training processes on this machine (torchrun + DDP)"),
    "resume_run_id": ("none", "a killed train run to continue from its last epoch"),
    "tta": ("auto", "test-time augmentation: false, flip, crops, or auto (the recipe's)"),
    "model_name": (C.DEFAULT_MODEL_NAME, "registered name of the PyTorch flavor; ONNX gets '-onnx'"),
    "int8": ("true", "also quantize to INT8 (registered if it loses <= 1 point)"),
    "reuse": ("true", "reuse FINISHED step runs with the same parameters, code (git commit) and data"),
    "version": ("candidate", "a registered version number or an alias (candidate, previous)"),
    "force": ("false", "promote even when the test accuracy is lower"),
    "ingest_run_id": (None, "the FINISHED ingest run whose data to use"),
    "train_run_id": (None, "the FINISHED train run whose model to use"),
    "evaluate_run_id": (None, "the FINISHED evaluate run of that train run"),
    "model_uri": (f"models:/{C.DEFAULT_MODEL_NAME}{C.ONNX_REGISTERED_SUFFIX}@{C.CANDIDATE_ALIAS}",
                  "the model to score with: models:/NAME@ALIAS, models:/NAME/VERSION or runs:/<id>/<name>"),
    "images": (None, "a folder (or file) of images, or a CIFAR-10 archive or folder (its test images, scored)"),
}


def parser(step: str, description: str, names: tuple[str, ...], hyperparameters: bool = False):
    """argparse for `python -m steps.<step>` with the arguments `names` (and every hyperparameter)."""
    import argparse

    from .recipes import AUTO, FIELDS

    parse = argparse.ArgumentParser(prog=f"python -m steps.{step}", description=description)
    for name in names:
        default, help_text = OPTIONS[name]
        parse.add_argument(f"--{name.replace('_', '-')}", default=default, required=default is None, help=help_text)
    for name in FIELDS if hyperparameters else ():
        parse.add_argument(f"--{name.replace('_', '-')}", default=AUTO, help="'auto' (the recipe's) or a value")
    return parse
