"""Validation of step parameters.

MLflow passes every MLproject parameter to the scripts as a string and does not check the declared
type (`-P epochs=abc` arrives as 'abc'), so each step validates here before it does any work.
"""

from __future__ import annotations

import math
import re

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
