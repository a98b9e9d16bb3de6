"""The `python_function` side of the registered models: images in, class names and probabilities out.

Both registered flavors (PyTorch and ONNX) use this module as their pyfunc loader, so
`mlflow.pyfunc.load_model(...)` and `mlflow models serve` behave the same for both. Two kinds of input:

- encoded images: a column named `image` of image files (PNG, JPEG and the other images.FORMATS; any
  size, mode or EXIF orientation) as base64 strings (a `data:image/...;base64,` prefix is allowed) or bytes;
  a DataFrame (`{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}`) or a dict
  (`{"inputs": {"image": ["<base64>", ...]}}`). Each is converted by images.decode, exactly as the
  predict command converts a file.
- raw pixels: RGB `[N, 32, 32, 3]` (NHWC), integers 0..255 (`{"inputs": [[[[r, g, b], ...]]]}`).

Spark's `mlflow.pyfunc.spark_udf(spark, uri)("image")` hands the model a table whose one column is
named by position ('0'): a single column of that name is taken as the `image` column. (An input schema
naming `image` would not help: MLflow then refuses the raw-pixel array before this module sees it.)
The scoring server takes at most `max_batch` images per request; in-process callers (`load_model(...)
.predict`, spark_udf's Arrow batches of 10,000) any number, scored in chunks of `max_batch`. Anything
else (bad base64, not an image, a decompression bomb, floats with a fraction, values out of range,
another shape, too many images in one request) is refused with a message naming the problem, which the
MLflow scoring server turns into HTTP 400. MLflow would cast a request to an input schema's dtype and
silently truncate 0.7 to 0, so the pyfunc has an output schema only and this module checks the values
itself; `guard_scoring_server` keeps MLflow's server from answering 500 to a JSON body nested too deeply
to parse and from echoing a large request back in its error message.
- output: a DataFrame with one row per image: `class` (name), `class_index`, `probability` (of that
  class) and `probabilities` (all ten, in class-index order).

This file is copied into every logged model (its `code/` folder) with images.py beside it, and
imports nothing else from this project: a served model needs only mlflow, numpy, pandas, Pillow and
onnxruntime (ONNX) or torch (PyTorch).
"""

from __future__ import annotations

import base64
import binascii
import json
import os

import numpy as np
import pandas as pd

try:
    from . import images as imagelib  # in the project: cifar10_cnn.images
except ImportError:  # in a logged model: the copy beside this file (mlmodel.IMAGES_MODULE)
    import cifar10_images as imagelib

CONFIG_FILE = "cifar10_serving.json"  # in the model folder: backend, model file, class names, max_batch
IMAGE_SHAPE = (32, 32, 3)
IMAGE_COLUMN = "image"  # encoded images come in a column of this name
POSITIONAL_COLUMN = "0"  # or in the one column spark_udf names by position
SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"  # "true" inside MLflow's scoring server (set by it)
MAX_ERROR_CHARS = 2000  # an error message longer than this is cut: MLflow's quotes the request


class InvalidImages(ValueError):
    """The request's images are not what the model takes."""


def check_images(data, max_batch: int | None) -> np.ndarray:
    """The request as uint8 `[N, 32, 32, 3]`, or InvalidImages saying what is wrong with it. At most
    `max_batch` images (None: any number)."""
    if isinstance(data, pd.DataFrame):
        if [str(c) for c in data.columns] not in ([IMAGE_COLUMN], [POSITIONAL_COLUMN]):
            raise InvalidImages(f"a table of images needs exactly one column, {IMAGE_COLUMN!r} (base64-encoded "
                                f"image files); got columns {[str(c) for c in data.columns]}")
        return decode_images(data.iloc[:, 0].tolist(), max_batch)
    if isinstance(data, dict):  # {"inputs": {"image": [...]}} or, raw pixels, {"inputs": {"images": [...]}}
        if set(data) == {IMAGE_COLUMN}:
            return decode_images(np.asarray(data[IMAGE_COLUMN], dtype=object).ravel().tolist(), max_batch)
        if set(data) != {"images"}:
            raise InvalidImages(f"expected one input named {IMAGE_COLUMN!r} (base64-encoded image files) "
                                f"or 'images' (pixel arrays), got {sorted(data)}")
        data = data["images"]
    try:
        array = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidImages(f"images are not a regular [N, 32, 32, 3] array: {exc}") from None
    if array.dtype.kind in "US":
        raise InvalidImages("pixel values must be integers 0..255, got text; image files go base64-encoded "
                            f'under a name: {{"inputs": {{"{IMAGE_COLUMN}": ["<base64>", ...]}}}}')
    if array.dtype.kind not in "uif":
        raise InvalidImages(f"pixel values must be integers 0..255, got {array.dtype} values")
    if array.ndim != 4 or array.shape[1:] != IMAGE_SHAPE:
        raise InvalidImages(f"images must have shape [N, 32, 32, 3] (NHWC RGB), got {list(array.shape)}")
    check_count(len(array), max_batch)
    if array.dtype != np.uint8:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise InvalidImages("pixel values must be integers 0..255, got NaN or infinity")
        if array.dtype.kind == "f" and not (array == np.round(array)).all():
            raise InvalidImages("pixel values must be integers 0..255; got fractions (normalized floats?). "
                                "Send raw pixels; the model normalizes them itself")
        if array.min() < 0 or array.max() > 255:
            raise InvalidImages(f"pixel values must be in 0..255, got {array.min()}..{array.max()}")
        array = array.astype(np.uint8)
    return np.ascontiguousarray(array)


def check_count(images: int, max_batch: int | None) -> None:
    if max_batch is None and images < 1:
        raise InvalidImages("no images: send at least one")
    if max_batch is not None and not 1 <= images <= max_batch:
        raise InvalidImages(f"send between 1 and {max_batch} images per request, got {images}")


def decode_images(encoded: list, max_batch: int | None) -> np.ndarray:
    """Base64 strings (or bytes) of image files -> uint8 `[N, 32, 32, 3]`; the first bad one is named. A
    served request (`max_batch` set) decodes at most images.MAX_REQUEST_PIXELS in all."""
    check_count(len(encoded), max_batch)
    budget = imagelib.PixelBudget() if max_batch is not None else None
    pixels = np.empty((len(encoded), *IMAGE_SHAPE), dtype=np.uint8)
    for i, item in enumerate(encoded):
        pixels[i] = decode_one(item, f"{IMAGE_COLUMN} {i}", budget)
    return pixels


def decode_one(item, name: str, budget=None) -> np.ndarray:
    """One image file, as base64 text (a data URL's prefix and MIME line breaks allowed) or bytes -> uint8
    `[32, 32, 3]`, or InvalidImages naming it `name`."""
    if isinstance(item, str):
        text = item.partition(",")[2] if item.startswith("data:") else item  # a data URL's payload
        try:
            item = base64.b64decode("".join(text.split()), validate=True)  # MIME line breaks allowed (Spark)
        except (binascii.Error, ValueError):
            raise InvalidImages(f"{name}: not valid base64 (send each image file base64-encoded)") from None
    elif not isinstance(item, (bytes, bytearray)):
        raise InvalidImages(f"{name}: expected a base64 string of an image file, got {type(item).__name__}")
    try:
        return imagelib.decode(bytes(item), name, budget)
    except imagelib.UnreadableImage as exc:
        raise InvalidImages(str(exc)) from None


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

            options = onnxruntime.SessionOptions()
            # The OpenMP convention that torch follows too (Spark sets it for its Python workers): N
            # threads each for processes sharing a machine; unset, one per core.
            options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
            session = onnxruntime.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])
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
        in_server = os.environ.get(SERVING_ENV, "").lower() in ("true", "1")
        try:
            images = check_images(data, self.max_batch if in_server else None)
        except InvalidImages as exc:
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        # In chunks: the network's activations for one chunk at a time, whatever the number of images.
        logits = [np.asarray(self._logits(images[i : i + self.max_batch]), dtype=np.float64)
                  for i in range(0, len(images), self.max_batch)]
        return table(softmax(np.concatenate(logits)), self.class_names)


def shorten(message: str) -> str:
    """An error message of at most about MAX_ERROR_CHARS: MLflow's server puts the whole request in it."""
    if len(message) <= MAX_ERROR_CHARS:
        return message
    head, found, ours = message.partition("\nError: ")  # "Failed to predict data '<request>'. \nError: ..."
    if found:
        return "Failed to predict the request's data.\nError: " + shorten(ours)
    return message[: MAX_ERROR_CHARS] + f" ... ({len(message) - MAX_ERROR_CHARS:,} more characters not shown)"


def guard_scoring_server() -> None:
    """Wrap MLflow's request handler (`mlflow.pyfunc.scoring_server.invocations`, looked up by name on
    every request) once: a body nested too deeply for Python's JSON parser becomes a 400 and a request
    without a Content-Type a 415, not a 500, and long error messages are cut. Only the process that
    serves this model is affected."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import BAD_REQUEST
        from mlflow.pyfunc import scoring_server
    except ImportError:  # no MLflow server here
        return
    handler = scoring_server.invocations
    if getattr(handler, "guarded", False):
        return

    def invocations(data, content_type, *args, **kwargs):
        if not content_type:  # MLflow's handler would answer 500 (it splits the header it was not sent)
            return scoring_server.InvocationsResponse(
                response="the request has no Content-Type header: send Content-Type: application/json",
                status=415, mimetype="text/plain")
        try:
            return handler(data, content_type, *args, **kwargs)
        except RecursionError:
            raise MlflowException("the request body is nested too deeply to parse: send "
                                  '{"inputs": [[[[r, g, b], ...]]]} or {"inputs": {"image": [...]}}',
                                  error_code=BAD_REQUEST) from None
        except MlflowException as exc:
            exc.message = shorten(exc.message)
            raise

    invocations.guarded = True
    scoring_server.invocations = invocations


def _load_pyfunc(path: str, model_config=None) -> Classifier:
    """MLflow's pyfunc entry point: `path` is the model's folder (the flavor's `data` path)."""
    guard_scoring_server()
    return Classifier(path)
