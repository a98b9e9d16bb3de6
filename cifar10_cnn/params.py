"""Checks for parameter values: each turns the string MLflow passes into a value, or a UserError naming it.

MLflow passes every MLproject parameter to the scripts as a string and does not check the declared
type (`-P epochs=abc` arrives as 'abc'), so each step checks its arguments before it does any work.
A check is a small object: it parses (`check(name, text)`), says what it accepts (`describe()`, for
messages and the docs) and, for a search space, whether a whole range is allowed (`Number.bounds`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from . import constants as C
from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Number:
    """An int or a finite float within bounds; `open_minimum` / `open_maximum` exclude the bound itself."""

    kind: type = float  # int | float
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False
    open_maximum: bool = False

    def describe(self) -> str:
        what = "a whole number" if self.kind is int else "a finite number"
        if self.minimum is not None and self.maximum is not None:
            left, right = "(" if self.open_minimum else "[", ")" if self.open_maximum else "]"
            kind = "a whole number" if self.kind is int else "a number"
            return f"{kind} in {left}{self.minimum:g}, {self.maximum:g}{right}"
        if self.minimum is not None:
            return f"{what} {'>' if self.open_minimum else '>='} {self.minimum:g}"
        if self.maximum is not None:
            return f"{what} {'<' if self.open_maximum else '<='} {self.maximum:g}"
        return what

    def allows(self, number: float) -> bool:
        if not math.isfinite(number):
            return False
        if self.minimum is not None and (number < self.minimum or (self.open_minimum and number == self.minimum)):
            return False
        return self.maximum is None or not (number > self.maximum or (self.open_maximum and number == self.maximum))

    def __call__(self, name: str, value) -> int | float:
        text = str(value).strip()
        try:
            number = self.kind(text)
        except ValueError:
            raise UserError(f"{name} must be {self.describe()}, got {value!r}") from None
        if not self.allows(number):
            raise UserError(f"{name} must be {self.describe()}, got {value!r}")
        return number


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of words, case-insensitive."""

    allowed: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.allowed)

    def __call__(self, name: str, value) -> str:
        text = str(value).strip().lower()
        if text not in self.allowed:
            raise UserError(f"{name} must be {self.describe()}; got {text!r}")
        return text


@dataclass(frozen=True)
class Boolean:
    def describe(self) -> str:
        return "true or false"

    def __call__(self, name: str, value) -> bool:
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise UserError(f"{name} must be true or false, got {value!r}")


POSITIVE_INT = Number(int, 1)
NON_NEGATIVE_INT = Number(int, 0)
POSITIVE = Number(float, 0, open_minimum=True)
NON_NEGATIVE = Number(float, 0)
FRACTION = Number(float, 0, 1, open_maximum=True)  # [0, 1)
BOOLEAN = Boolean()


def choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    return Choice(tuple(allowed))(name, value)


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
    for suffix in (C.ONNX_REGISTERED_SUFFIX, C.ONNX_REGISTERED_SUFFIX + C.INT8_REGISTERED_SUFFIX):
        if value.endswith(suffix):  # NAME-onnx and NAME-onnx-int8 are the ONNX models made from NAME
            raise UserError(f"model_name names the PyTorch model, and {value!r} ends in {suffix!r}, which the "
                            f"ONNX models' names add to it; give {value[:-len(suffix)]!r}")
    return value


def expected_records(value: str) -> dict[str, int] | None:
    """'50000,10000' -> the record counts the archive must hold; 'any' -> any consistent size."""
    value = str(value).strip().lower()
    if value == "any":
        return None
    parts = value.split(",")
    if len(parts) != 2:
        raise UserError(f"expected_records must be 'TRAIN,TEST' (e.g. 50000,10000) or 'any', got {value!r}")
    train, test = (POSITIVE_INT("expected_records", p) for p in parts)
    return {"train": train, "test": test}


def version_ref(value: str) -> str:
    """A registered version: its number, or an alias such as 'candidate' or 'previous'."""
    text = str(value).strip()
    if not re.match(r"^([1-9][0-9]*|[A-Za-z][A-Za-z0-9_-]{0,63})$", text):
        raise UserError(f"version must be a version number or an alias (e.g. candidate, previous), got {value!r}")
    return text
