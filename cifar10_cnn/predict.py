"""Classify image files, or arrays of pixels, with a registered or logged model: the mechanics of the
predict step (`mlflow run . -e predict`) and of `python -m cifar10_cnn predict`.

Every file is read and resized the same way (images.load); a file that cannot be read gets its own
error and the others are still classified. Folders are searched recursively.
"""

from __future__ import annotations

import csv
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import atomic
from . import constants as C
from . import images as imagelib
from .errors import UserError
from .progress import quiet_mlflow_bars_unless_interactive


@dataclass(frozen=True)
class Result:
    path: Path | str  # the file, or where in an archive the image is
    label: str | None = None  # class name
    probability: float | None = None
    probabilities: tuple[float, ...] = ()
    error: str | None = None
    truth: str | None = None  # the true class, where the input says it (a CIFAR-10 archive)


Model = Callable[[np.ndarray], pd.DataFrame]  # uint8 [N, 32, 32, 3] -> the pyfunc's table


def classify(paths: list[Path], model: Model, batch_size: int = C.MAX_REQUEST_IMAGES) -> list[Result]:
    """One Result per file, in order; unreadable files carry their error instead of a class."""
    results: dict[Path, Result] = {}
    good: list[tuple[Path, np.ndarray]] = []
    for path in paths:
        try:
            good.append((path, imagelib.load(path)))
        except imagelib.UnreadableImage as exc:
            results[path] = Result(path, error=str(exc))
    if good:
        names = [path for path, _ in good]
        scored = classify_pixels(np.stack([pixels for _, pixels in good]), names, model, batch_size=batch_size)
        results.update(zip(names, scored, strict=True))
    return [results[p] for p in paths]


def classify_pixels(pixels: np.ndarray, names: list[str], model: Model, truths: list[str] | None = None,
                    batch_size: int = C.MAX_REQUEST_IMAGES) -> list[Result]:
    """One Result per image of uint8 `[N, 32, 32, 3]`, named by `names`, in requests of `batch_size`."""
    results = []
    for i in range(0, len(pixels), batch_size):
        for j, row in enumerate(model(pixels[i : i + batch_size]).to_dict("records"), start=i):
            results.append(Result(names[j], row["class"], float(row["probability"]),
                                  tuple(float(p) for p in row["probabilities"]), truth=truths[j] if truths else None))
    return results


def load_model(model_uri: str):
    """`mlflow.pyfunc.load_model`, with a failure as one UserError line naming the URI."""
    import mlflow

    uri = str(model_uri).strip()
    if not uri:
        raise UserError("model_uri is empty; give e.g. models:/cifar10-cnn-onnx@champion or runs:/<id>/onnx_model")
    try:
        # Into a folder deleted once loaded (the model keeps nothing open there): MLflow's own download
        # from a server goes to a new temporary folder every time and stays.
        with tempfile.TemporaryDirectory(prefix="cifar10-download-") as folder:
            return mlflow.pyfunc.load_model(uri, dst_path=folder)
    except Exception as exc:  # MLflow raises many kinds: missing model, alias, run, artifact, flavor
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load model {uri!r}: {first}") from None


def write_csv(results: list[Result], class_names: list[str], dest: Path) -> None:
    """All results as CSV, complete or not at all (atomic.replacing)."""
    # A file name that is not UTF-8 (bytes os.fsdecode could not decode) is written with backslash escapes.
    with atomic.replacing(dest) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "class", "probability", *(f"p_{n}" for n in class_names), "error", "true_class"])
        for r in results:
            probabilities = [f"{p:.6f}" for p in r.probabilities] or [""] * len(class_names)
            writer.writerow([str(r.path), r.label or "", "" if r.probability is None else f"{r.probability:.6f}",
                             *probabilities, r.error or "", r.truth or ""])


def run(model_uri: str, inputs: list[str], csv_path: str) -> int:
    """The command: prints one line per file; returns 0 when every file was classified, else 1."""
    quiet_mlflow_bars_unless_interactive()
    if Path(csv_path).is_dir() and any(Path(given).is_dir() for given in inputs):  # before any download
        print(f"error: predict: --csv {csv_path} is a folder; give a file name", file=sys.stderr)
        return 2
    try:
        pyfunc = load_model(model_uri)
    except UserError as exc:
        print(f"error: predict: {exc}", file=sys.stderr)
        return 2
    metadata = pyfunc.metadata.metadata or {}
    class_names = metadata.get("class_names", list(C.CLASS_NAMES))
    paths = [p for given in inputs for p in imagelib.files_under(Path(given))]
    if not paths:
        print("error: predict: no files to classify", file=sys.stderr)
        return 2
    results = classify(paths, pyfunc.predict)
    for r in results:
        if r.error:
            print(f"error: {r.error}", file=sys.stderr)
        else:
            print(f"{r.path}: {r.label} ({r.probability:.1%})")
    if any(Path(given).is_dir() for given in inputs):
        write_csv(results, class_names, Path(csv_path))
        print(f"wrote {len(results)} rows to {csv_path}")
    failed = sum(r.error is not None for r in results)
    if failed:
        print(f"{failed} of {len(results)} files could not be classified", file=sys.stderr)
    return 1 if failed else 0


def payload(inputs: list[str]) -> int:
    """Print the JSON body for `POST /invocations` for these image files (for curl)."""
    import json

    arrays = []
    for given in inputs:
        for path in imagelib.files_under(Path(given)):
            try:
                arrays.append(imagelib.load(path))
            except imagelib.UnreadableImage as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
    if not arrays:
        print(f"error: payload: no image files in {' '.join(inputs)}", file=sys.stderr)
        return 2
    print(json.dumps({"inputs": np.stack(arrays).tolist()}))
    return 0
