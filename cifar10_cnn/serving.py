"""The `python_function` side of the registered models: strict raw pixels in, class names and probabilities out.

Both registered flavors (PyTorch and ONNX) use this module as their pyfunc loader, so
`mlflow.pyfunc.load_model(...)` and `mlflow models serve` behave the same for both:

- input: RGB pixels, `[N, 32, 32, 3]` (NHWC), integers 0..255, at most `max_batch` images. Anything
  else (floats with a fraction, values out of range, another shape, strings, too many images) is
  refused with a message, which the MLflow scoring server turns into HTTP 400. MLflow would cast a
  request to the signature's dtype and silently truncate 0.7 to 0; so the pyfunc has no input
  signature and this module checks the values itself.
- output: a DataFrame with one row per image: `class` (name), `class_index`, `probability` (of that
  class) and `probabilities` (all ten, in class-index order).

This file is copied into every logged model (its `code/` folder) and imports nothing from this
project: a served model needs only mlflow, numpy, pandas and onnxruntime (ONNX) or torch (PyTorch).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

CONFIG_FILE = "cifar10_serving.json"  # in the model folder: backend, model file, class names, max_batch
IMAGE_SHAPE = (32, 32, 3)


class InvalidImages(ValueError):
    """The request's images are not what the model takes."""


def check_images(data, max_batch: int) -> np.ndarray:
    """The request as uint8 `[N, 32, 32, 3]`, or InvalidImages saying what is wrong with it."""
    if isinstance(data, dict):  # {"inputs": {"images": [...]}}
        if set(data) != {"images"}:
            raise InvalidImages(f"expected one input named 'images', got {sorted(data)}")
        data = data["images"]
    if isinstance(data, pd.DataFrame):
        raise InvalidImages('send {"inputs": [[[[r, g, b], ...]]]}: a [N, 32, 32, 3] array, not a table')
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidImages(f"images are not a regular [N, 32, 32, 3] array: {exc}") from None
    if array.dtype.kind not in "uif":
        raise InvalidImages(f"pixel values must be integers 0..255, got {array.dtype} values")
    if array.ndim != 4 or array.shape[1:] != IMAGE_SHAPE:
        raise InvalidImages(f"images must have shape [N, 32, 32, 3] (NHWC RGB), got {list(array.shape)}")
    if not 1 <= len(array) <= max_batch:
        raise InvalidImages(f"send between 1 and {max_batch} images per request, got {len(array)}")
    if array.dtype != np.uint8:
        if array.dtype.kind == "f" and not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise InvalidImages("pixel values must be integers 0..255; got fractions (normalized floats?). "
                                "Send raw pixels; the model normalizes them itself")
        if array.min() < 0 or array.max() > 255:
            raise InvalidImages(f"pixel values must be in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def table(probabilities: np.ndarray, class_names) -> pd.DataFrame:
    best = probabilities.argmax(axis=1)
    return pd.DataFrame({
        "class": [class_names[i] for i in best],
        "class_index": best.astype(np.int64),
        "probability": probabilities[np.arange(len(best)), best].astype(np.float64),
        "probabilities": [row.astype(np.float64).tolist() for row in probabilities],
    })


class Classifier:
    """What `mlflow.pyfunc.load_model` returns for our models."""

    def __init__(self, path: str):
        with open(os.path.join(path, CONFIG_FILE)) as f:
            config = json.load(f)
        self.class_names = config["class_names"]
        self.max_batch = int(config["max_batch"])
        model_file = os.path.join(path, config["file"])
        if config["backend"] == "onnx":
            import onnxruntime

            session = onnxruntime.InferenceSession(model_file, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            self._logits = lambda images: session.run(None, {name: images})[0]
        elif config["backend"] == "pytorch":
            import mlflow.pytorch
            import torch

            module = mlflow.pytorch.load_model(path)

            def logits(images: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return module(torch.from_numpy(images)).numpy()

            self._logits = logits
        else:
            raise ValueError(f"{CONFIG_FILE}: unknown backend {config['backend']!r}")

    def predict(self, data, params=None) -> pd.DataFrame:
        try:
            images = check_images(data, self.max_batch)
        except InvalidImages as exc:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return table(softmax(np.asarray(self._logits(images), dtype=np.float64)), self.class_names)


def _load_pyfunc(path: str, model_config=None) -> Classifier:
    """MLflow's pyfunc entry point: `path` is the model's folder (the flavor's `data` path)."""
    return Classifier(path)
