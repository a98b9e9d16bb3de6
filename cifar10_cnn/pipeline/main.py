"""main: check every parameter, then run the four steps as nested MLflow runs. Needs no torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlflow

from .. import data as datalib
from .. import params
from ..errors import UserError
from .common import cache_dir, say

PROJECT_DIR = Path(__file__).resolve().parents[2]


def check_main_params(p: dict) -> dict:
    """Every check that needs no data and no training, so a bad parameter fails in seconds."""
    checked = {
        "epochs": params.positive_int("epochs", p["epochs"]),
        "batch_size": params.positive_int("batch_size", p["batch_size"]),
        "learning_rate": params.positive_float("learning_rate", p["learning_rate"]),
        "seed": params.non_negative_int("seed", p["seed"]),
        "device": params.choice("device", p["device"], params.DEVICES),
        "model_name": params.model_name(p["model_name"]),
    }
    params.expected_records(p["expected_records"])
    if checked["device"] in ("cuda", "mps"):  # only then is torch worth importing here
        from ..training import select_device

        select_device(checked["device"])
    datalib.resolve_source(p["data"], cache_dir(), fetch=False)
    data = str(p["data"]).strip()
    if data != "auto" and "://" not in data:  # children run in the project folder: pass an absolute path
        data = str(Path(data).expanduser().resolve())
    return {**checked, "data": data, "expected_records": str(p["expected_records"]).strip()}


def run(**raw) -> None:
    p = check_main_params(raw)
    if not (PROJECT_DIR / "MLproject").is_file():
        raise UserError(f"{PROJECT_DIR} has no MLproject; run main from a checkout of the project")
    # Children run `python` from PATH (env_manager=local): make it this interpreter, whatever PATH says.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id

    def step(entry_point: str, parameters: dict) -> str:
        say("main", f"step {entry_point} …")
        try:
            submitted = mlflow.projects.run(
                str(PROJECT_DIR), entry_point, parameters={k: str(v) for k, v in parameters.items()},
                env_manager="local", experiment_id=experiment_id, run_name=entry_point, synchronous=True,
            )
        except mlflow.exceptions.ExecutionException:
            raise UserError(f"step {entry_point} failed; its error is printed above") from None
        mlflow.set_tag(f"cifar10.{entry_point}_run_id", submitted.run_id)
        return submitted.run_id

    ingest_id = step("ingest", {"data": p["data"], "expected_records": p["expected_records"]})
    train_id = step("train", {"ingest_run_id": ingest_id, "epochs": p["epochs"], "batch_size": p["batch_size"],
                              "learning_rate": p["learning_rate"], "seed": p["seed"], "device": p["device"]})
    evaluate_id = step("evaluate", {"train_run_id": train_id, "device": p["device"]})
    export_id = step("export", {"train_run_id": train_id, "evaluate_run_id": evaluate_id,
                                "model_name": p["model_name"]})

    metrics = mlflow.get_run(evaluate_id).data.metrics
    mlflow.log_metrics({"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"]})
    export_tags = mlflow.get_run(export_id).data.tags
    text = summary(parent.info.run_id, {"ingest": ingest_id, "train": train_id, "evaluate": evaluate_id,
                                        "export": export_id}, metrics, export_tags)
    mlflow.set_tag("mlflow.note.content", f"```\n{text}\n```")  # the run's description in `mlflow ui`
    print(text, flush=True)


def summary(parent_id: str, run_ids: dict, metrics: dict, export_tags: dict) -> str:
    line = "=" * 80
    client = mlflow.MlflowClient()
    registered = []
    for flavor in ("pytorch", "onnx"):
        name, version = export_tags[f"cifar10.registered.{flavor}"].split("/")
        aliases = client.get_model_version(name, version).aliases
        registered.append(f"{name} v{version}" + (f" (@{', @'.join(sorted(aliases))})" if aliases else ""))
    steps = ", ".join(f"{name} {rid}" for name, rid in run_ids.items())
    return "\n".join([
        line, "CIFAR-10 CNN pipeline finished", line,
        f"  test accuracy : {metrics['test_accuracy']:.2%}",
        f"  test loss     : {metrics['test_loss']:.4f}",
        f"  ONNX model    : {export_tags.get('cifar10.onnx_path', '?')}",
        f"  parent run    : {parent_id}",
        f"  step runs     : {steps}",
        f"  registered    : {', '.join(registered)}",
        f"  look at it    : {ui_command(mlflow.get_tracking_uri())}",
        line,
    ])


def ui_command(tracking_uri: str) -> str:
    """How to open this store in the MLflow UI: a server is already a UI; a local store needs `mlflow ui`."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)"
