"""main: check every parameter, then run the four steps as nested MLflow runs. Needs no torch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import mlflow

from .. import constants as C
from .. import data as datalib
from .. import params, recipes, tracking
from ..errors import UserError
from .common import cache_dir, say

PROJECT_DIR = Path(__file__).resolve().parents[2]


def check_main_params(p: dict) -> dict:
    """Every check that needs no data and no training, so a bad parameter fails in seconds."""
    overrides = {k: p[k] for k in recipes.FIELDS}
    resume_run_id = str(p["resume_run_id"]).strip()
    if resume_run_id.lower() in ("", "none"):
        resume_run_id = "none"
    if resume_run_id != "none":  # train adopts the killed run's parameters; those given here are checked there
        params.run_id("resume_run_id", resume_run_id)
        recipes.explicit(overrides)
        train = {"recipe": params.choice("recipe", p["recipe"], tuple(recipes.RECIPES)), **overrides}
    else:  # the resolved values, so the train run's params say what was trained (and reuse compares them)
        train = {"recipe": p["recipe"], **asdict(recipes.resolve(p["recipe"], overrides))}
        if train["budget_minutes"] and "epochs" in recipes.explicit(overrides):
            raise UserError("give epochs or budget_minutes, not both: a budget picks the number of epochs itself")
    tta = recipes.tta_level(p["tta"], train["recipe"])
    checked = {
        "device": params.choice("device", p["device"], params.DEVICES),
        "model_name": params.model_name(p["model_name"]),
        "int8": str(params.boolean("int8", p["int8"])).lower(),
        "nproc_per_node": params.positive_int("nproc_per_node", p["nproc_per_node"]),
        "reuse": params.boolean("reuse", p["reuse"]),
    }
    params.expected_records(p["expected_records"])
    if checked["device"] in ("cuda", "mps"):  # only then is torch worth importing here
        from ..training import select_device

        select_device(checked["device"])
    source = datalib.resolve_source(p["data"], cache_dir(), fetch=False)  # None: it needs a download
    data = str(p["data"]).strip()
    if data != "auto" and "://" not in data:  # children run in the project folder: pass an absolute path
        data = str(Path(data).expanduser().resolve())
    return {**checked, "source": source, "train": train, "tta": tta, "resume_run_id": resume_run_id,
            "data": data, "expected_records": str(p["expected_records"]).strip()}


def run(**raw) -> None:
    p = check_main_params(raw)
    if not (PROJECT_DIR / "MLproject").is_file():
        raise UserError(f"{PROJECT_DIR} has no MLproject; run main from a checkout of the project")
    # Children run `python` from PATH (env_manager=local): make it this interpreter, whatever PATH says.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    parent = mlflow.active_run()
    experiment_id = parent.info.experiment_id
    commit = None
    if p["reuse"]:
        commit, why_not = code_version(PROJECT_DIR)
        if commit is None:
            say("main", f"not reusing earlier step runs: {why_not}")
    reused: list[str] = []

    def step(entry_point: str, parameters: dict, can_reuse: bool = True, match_tags: dict | None = None) -> str:
        parameters = {k: str(v) for k, v in parameters.items()}
        if can_reuse and commit and (earlier := reusable(experiment_id, entry_point, parameters, commit,
                                                         match_tags or {})):
            say("main", f"step {entry_point}: reusing FINISHED run {earlier} (same parameters, code and data)")
            reused.append(entry_point)
            mlflow.set_tag(f"cifar10.{entry_point}_run_id", earlier)
            return earlier
        say("main", f"step {entry_point} …")
        try:
            submitted = mlflow.projects.run(
                str(PROJECT_DIR), entry_point, parameters=parameters,
                env_manager="local", experiment_id=experiment_id, run_name=entry_point, synchronous=True,
            )
        except mlflow.exceptions.ExecutionException:
            raise UserError(f"step {entry_point} failed; its error is printed above") from None
        mlflow.set_tag(f"cifar10.{entry_point}_run_id", submitted.run_id)
        return submitted.run_id

    data_tags = {C.TAG_SOURCE_SHA256: datalib.source_digest(p["source"])} if commit and p["source"] else None
    if commit and data_tags is None:
        say("main", "ingest will download the data, so it runs again (its digest is not known yet)")
    ingest_id = step("ingest", {"data": p["data"], "expected_records": p["expected_records"]},
                     can_reuse=data_tags is not None, match_tags=data_tags)
    train_id = step("train", {"ingest_run_id": ingest_id, **p["train"], "device": p["device"],
                              "nproc_per_node": p["nproc_per_node"], "resume_run_id": p["resume_run_id"]})
    evaluate_id = step("evaluate", {"train_run_id": train_id, "device": p["device"], "tta": p["tta"]})
    export_id = step("export", {"train_run_id": train_id, "evaluate_run_id": evaluate_id,
                                "model_name": p["model_name"], "int8": p["int8"]})
    mlflow.set_tag(C.TAG_REUSED, ",".join(reused) or "none")

    metrics = mlflow.get_run(evaluate_id).data.metrics
    mlflow.log_metrics({"test_accuracy": metrics["test_accuracy"], "test_loss": metrics["test_loss"]})
    export_tags = mlflow.get_run(export_id).data.tags
    text = summary(parent.info.run_id, {"ingest": ingest_id, "train": train_id, "evaluate": evaluate_id,
                                        "export": export_id}, metrics, export_tags)
    mlflow.set_tag("mlflow.note.content", f"```\n{text}\n```")  # the run's description in `mlflow ui`
    print(text, flush=True)


def code_version(project_dir: Path) -> tuple[str | None, str]:
    """The git commit of the project, or None and why, when the code is not exactly a commit."""
    try:
        head = subprocess.run(["git", "-C", str(project_dir), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(project_dir), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"git is not usable here ({exc})"
    if head.returncode != 0:
        return None, f"{project_dir} is not a git checkout"
    if dirty.stdout.strip():
        return None, "the project has uncommitted changes, so its code is not a known version"
    return head.stdout.strip(), ""


def reusable(experiment_id: str, entry_point: str, parameters: dict, commit: str, tags: dict) -> str | None:
    """The newest FINISHED run of `entry_point` made by this commit with these exact parameters and tags.

    Parameters are compared as the strings MLflow stores, like every value `mlflow run` passes.
    """
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{tracking.STEP_TAG}` = '{entry_point}' and attributes.status = 'FINISHED' "
                       f"and tags.`mlflow.source.git.commit` = '{commit}'"),
    )
    for run in runs:
        if all(run.data.params.get(k) in (v, shlex.quote(v)) for k, v in parameters.items()) and all(
                run.data.tags.get(k) == v for k, v in tags.items()):
            return run.info.run_id
    return None


def summary(parent_id: str, run_ids: dict, metrics: dict, export_tags: dict) -> str:
    line = "=" * 80
    client = mlflow.MlflowClient()
    registered = []
    for flavor in ("pytorch", "onnx", "onnx_int8"):
        if "/" not in export_tags.get(f"cifar10.registered.{flavor}", ""):  # INT8: off, or lost too much
            continue
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
