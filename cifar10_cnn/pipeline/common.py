"""Helpers the step modules share. No torch here: ingest and main must start without it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from .. import constants as C
from .. import data as datalib
from .. import tracking


def cache_dir() -> Path:
    return Path(os.environ.get(C.CACHE_DIR_ENV, C.DEFAULT_CACHE_DIR))


def say(step: str, text: str) -> None:
    print(f"[{step}] {text}", flush=True)


def base_version(version: str) -> str:
    return version.split("+")[0]  # '2.14.1+cu130' -> '2.14.1': local labels don't resolve on PyPI


def nhwc(images_nchw: np.ndarray) -> np.ndarray:
    """Stored NCHW uint8 -> the NHWC uint8 that the logged models take."""
    return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1))


def dataset_of(ingest_run_id: str, splits: tuple[str, ...]) -> datalib.Cifar10:
    tracking.upstream(ingest_run_id, "ingest")
    return datalib.load(tracking.artifact(ingest_run_id, C.DATASET_DIR), splits)


def model_metadata(class_names) -> dict:
    return {"class_names": list(class_names),
            "input": f"uint8 RGB pixels [batch, 32, 32, 3] (NHWC), 0..255, at most {C.MAX_REQUEST_IMAGES} per request",
            "output": "pyfunc: one row per image with class, class_index, probability, probabilities; "
                      f"the network itself: {C.SERVING_OUTPUT} float32 [batch, {C.NUM_CLASSES}]"}


def peak_rss_mib() -> float | None:
    """This process's peak resident memory so far, or None where the OS does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS: bytes; Linux: KiB
