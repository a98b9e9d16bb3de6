"""main: check every parameter, then run ingest -> train -> evaluate -> export as nested MLflow runs
under this (parent) run. Needs no torch."""

import contextlib
from dataclasses import asdict
from pathlib import Path

import mlflow

from cifar10_cnn import constants as C
from cifar10_cnn import entry_points, params, pipeline, recipes, registry, sources, tracking
from cifar10_cnn.errors import UserError
from cifar10_cnn.progress import say

PROJECT_DIR = Path(__file__).resolve().parents[1]


def run(**raw) -> None:
    p = check_main_params(raw)
    parent = mlflow.active_run()
    mlflow.MlflowClient().update_run(parent.info.run_id, name=run_name(p["train"]))
    if p["resume_run_id"] != "none":
        say("main", f"resuming train run {p['resume_run_id']}: its recipe, {p['train']['recipe']}")
    steps = pipeline.Steps(PROJECT_DIR, "main", p["reuse"])
    ingest_id = steps.ingest(p["data"], p["expected_records"], p["source"])
    train_id = steps.run("train", {"ingest_run_id": ingest_id, **p["train"], "device": p["device"],
                                   "nproc_per_node": p["nproc_per_node"], "resume_run_id": p["resume_run_id"]})
    evaluate_id, export_id = steps.evaluate_and_export(train_id, p["device"], p["tta"], p["model_name"], p["int8"])
    reused = steps.reused
    mlflow.set_tag(C.TAG_REUSED, ",".join(reused) or "none")

    metrics = mlflow.get_run(evaluate_id).data.metrics
    mlflow.log_metrics({k: metrics[k] for k in ("test_accuracy", "test_loss", "test_accuracy_tta") if k in metrics})
    export_tags = mlflow.get_run(export_id).data.tags
    text = summary(parent.info.run_id, {"ingest": ingest_id, "train": train_id, "evaluate": evaluate_id,
                                        "export": export_id}, metrics, export_tags)
    mlflow.set_tag("mlflow.note.content", f"```\n{text}\n```")  # the run's description in `mlflow ui`
    print(text, flush=True)


def check_main_params(p: dict) -> dict:
    """Every check that needs no data and no training, so a bad parameter fails in seconds."""
    overrides = {k: p[k] for k in recipes.FIELDS}
    resume_run_id = str(p["resume_run_id"]).strip()
    if resume_run_id.lower() in ("", "none"):
        resume_run_id = "none"
    if resume_run_id != "none":  # train adopts the killed run's parameters; those given here are checked there
        params.run_id("resume_run_id", resume_run_id)
        recipes.explicit(overrides)
        recipe = p["recipe"]
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # no such run: train says so
            recipe = mlflow.get_run(resume_run_id).data.params.get("recipe", recipe)  # and its TTA with it
        train = {"recipe": params.choice("recipe", recipe, tuple(recipes.RECIPES)), **overrides}
    else:  # the resolved values, so the train run's params say what was trained (and reuse compares them)
        train = {"recipe": p["recipe"], **asdict(recipes.resolve(p["recipe"], overrides))}
        if train["budget_minutes"] and "epochs" in recipes.explicit(overrides):
            raise UserError("give epochs or budget_minutes, not both: a budget picks the number of epochs itself")
    tta = recipes.tta_level(p["tta"], train["recipe"])
    checked = {
        "device": params.choice("device", p["device"], params.DEVICES),
        "model_name": params.model_name(p["model_name"]),
        "int8": str(params.BOOLEAN("int8", p["int8"])).lower(),
        "nproc_per_node": params.POSITIVE_INT("nproc_per_node", p["nproc_per_node"]),
        "reuse": params.BOOLEAN("reuse", p["reuse"]),
    }
    params.expected_records(p["expected_records"])
    if checked["device"] in ("cuda", "mps"):  # only then is torch worth importing here
        from cifar10_cnn.hardware import select_device

        select_device(checked["device"])
    data, source = sources.checked_data(p["data"])
    return {**checked, "source": source, "train": train, "tta": tta, "resume_run_id": resume_run_id,
            "data": data, "expected_records": str(p["expected_records"]).strip()}


def run_name(train: dict) -> str:
    """The parent run's name in `mlflow ui`: what was trained, instead of MLflow's random words."""
    if train.get("model", "auto") == "auto":  # resuming: the killed run's parameters are read by train
        return f"{train['recipe']} (resumed)"
    epochs = f"{train['epochs']} epoch{'s' if train['epochs'] != 1 else ''}"
    length = f"{train['budget_minutes']:g} min" if train["budget_minutes"] else epochs
    return f"{train['recipe']} · {train['model']} · {length}"


def summary(parent_id: str, run_ids: dict, metrics: dict, export_tags: dict) -> str:
    line = "=" * 80
    registered = registry.registered_by(export_tags)
    steps = ", ".join(f"{name} {rid}" for name, rid in run_ids.items())
    tta = f" ({metrics['test_accuracy_tta']:.2%} with test-time augmentation)" if "test_accuracy_tta" in metrics else ""
    return "\n".join([
        line, "CIFAR-10 CNN pipeline finished", line,
        f"  test accuracy : {metrics['test_accuracy']:.2%}{tta}",
        f"  test loss     : {metrics['test_loss']:.4f}",
        f"  ONNX model    : {export_tags.get(C.TAG_ONNX_PATH, '?')}",
        f"  parent run    : {parent_id}",
        f"  step runs     : {steps}",
        f"  registered    : {', '.join(registered)}",
        f"  look at it    : {ui_command(mlflow.get_tracking_uri(), mlflow.get_run(parent_id).info.experiment_id)}",
        line,
    ])


def ui_command(tracking_uri: str, experiment_id: str) -> str:
    """How to open this experiment's runs in the MLflow UI. MLflow 3.17's UI opens an experiment in its GenAI
    mode (a traces overview) unless the browser chose otherwise or the address asks for the model-training
    mode; `--app-name cifar10-cnn` (cifar10_cnn/ui.py) makes that the default for a new browser."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri.rstrip('/')}/{page}"
    return f"mlflow ui --app-name cifar10-cnn --backend-store-uri {tracking_uri}, then open http://127.0.0.1:5000/{page}"


def main(argv=None):
    args = entry_points.parser("main", __doc__).parse_args(argv)
    tracking.run_step("main", run, **vars(args))


if __name__ == "__main__":
    main()
