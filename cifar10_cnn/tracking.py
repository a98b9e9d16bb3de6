"""MLflow glue shared by the steps: run a step so it always ends FINISHED, FAILED or KILLED, and find
what an upstream step left in the tracking store."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from . import constants as C
from . import heartbeat
from .errors import UserError
from .progress import quiet_mlflow_bars_unless_interactive, say


def sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def end_with_parent() -> None:
    """Make this process get SIGTERM when its parent exits (Linux), so no step outlives the recipe.

    `mlflow run` cancels its child only on Ctrl-C; killed with SIGTERM it dies alone and its child would
    train on as an orphan, its run RUNNING forever. With this, the orphan is told at once, and its SIGTERM
    handler ends its own run and cancels its own child step in turn. The request survives exec, so
    torchrun, which replaces the train step's process, is told too (and stops its ranks).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_step(step: str, body: Callable[..., None], system_metrics: bool = False, **kwargs) -> None:
    """Run `body(**kwargs)` inside the active MLflow run (the one `mlflow run` made, or a new one).

    With `system_metrics`, MLflow samples CPU, memory (and GPU where present) into the run, every 2 s
    unless $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL says otherwise.

    A UserError becomes one line on stderr, a FAILED run and exit code 2; Ctrl-C or SIGTERM a KILLED
    run (which a parent `mlflow run` may then record as FAILED) and exit code 130; any other exception a
    FAILED run and the traceback.
    """
    signal.signal(signal.SIGTERM, sigterm_as_interrupt)
    # A process started in the background inherits SIGINT ignored; Ctrl-C must still stop a step.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    end_with_parent()
    quiet_mlflow_bars_unless_interactive()
    if system_metrics:
        # Its INFO lines (start, stop, "skip GPU metrics") would bury a step's one-line error.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        # Every 2 s unless the user chose otherwise (MLflow's default, 10 s, is most of a short run).
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "2")
        os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING", "1")
    run = mlflow.start_run(log_system_metrics=system_metrics)
    try:
        tag_experiment_kind(run.info.experiment_id)
        # the step's process beats while it works: e.g. a resume tells a live train run from a killed one
        mlflow.set_tags({C.TAG_STEP: step, **heartbeat.first_beat(C.TAG_PROCESS, C.TAG_HEARTBEAT)})
        # The step's own arguments are its params, as `mlflow run` would log them: downstream steps
        # read them from here (e.g. evaluate finds the ingest run through the train run's params).
        log_new_params(kwargs)
        with heartbeat.beating(run.info.run_id, C.TAG_HEARTBEAT):
            body(**kwargs)
    except UserError as exc:
        mlflow.end_run("FAILED")
        print(f"error: {step}: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        print(f"error: {step}: interrupted; its run is ended and nothing more is logged", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            mlflow.end_run("FAILED")
            raise
        message = no_space(exc, run.info.artifact_uri)
        with contextlib.suppress(Exception):  # ending the run writes to the store too, which may be full
            mlflow.end_run("FAILED")
        print(f"error: {step}: {message}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def no_space(exc: OSError, artifact_uri: str) -> str:
    """A full disk in one line: where the write failed (when the error says), the run's artifact store and
    the temporary folder, each with its free space."""
    import shutil
    import tempfile

    local = urllib.parse.urlparse(artifact_uri).path if artifact_uri.startswith("file:") else (
        artifact_uri if "://" not in artifact_uri else None)
    places = []
    for place in dict.fromkeys(p for p in (exc.filename, local, tempfile.gettempdir()) if p):
        existing = Path(place)
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        try:
            places.append(f"{place} ({shutil.disk_usage(existing).free / 2**20:,.0f} MiB free)")
        except OSError:  # the error is what the user needs; a place we cannot measure is named without a figure
            places.append(place)
    return f"no space left on device: {', '.join(places)}; free some space and run the step again"


def log_artifacts_whole(local_dir: str, artifact_path: str) -> None:
    """mlflow.log_artifacts, with what it copied deleted again when it fails partway (a full disk): a FAILED
    run keeps no partial artifacts that look like data. Where the store cannot delete, the run says so in
    its TAG_PARTIAL tag."""
    try:
        mlflow.log_artifacts(local_dir, artifact_path)
    except BaseException:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            get_artifact_repository(mlflow.active_run().info.artifact_uri).delete_artifacts(artifact_path)
        except Exception:
            with contextlib.suppress(Exception):
                mlflow.set_tag(C.TAG_PARTIAL, artifact_path)
        raise


def log_new_params(params: dict) -> None:
    """Log params the run does not have yet. `mlflow run` already logged the MLproject's parameters,
    and re-logging a key with another spelling ('1e-3' vs '0.001') is an error in MLflow."""
    run = mlflow.active_run()
    have = mlflow.get_run(run.info.run_id).data.params
    mlflow.log_params({k: str(v) for k, v in params.items() if k not in have})


def log_input(dataset, context: str, tags: dict, attempts: int = 3) -> None:
    """mlflow.log_input, safe when another run logs the same dataset at the same moment.

    MLflow looks for the dataset's row, then inserts it: two runs doing that together (two recipes started
    at once on one store) make the second fail on the unique constraint, its transaction rolled back. The
    row exists by then, so logging again only links this run to it.
    """
    for attempt in range(attempts):
        try:
            return mlflow.log_input(dataset, context=context, tags=tags)
        except MlflowException as exc:
            if "unique constraint" not in str(exc).lower() or attempt == attempts - 1:
                raise


def upstream(run_id: str, step: str, wait_in_pipeline: bool = False) -> Run:
    """The FINISHED run of `step` with this id, or a UserError saying what is wrong with it.

    With `wait_in_pipeline`, a run that this run's own pipeline still runs beside it (main starts evaluate
    and export together) is waited for; a run from anywhere else must have ended already.
    """
    run = _run(run_id, step)
    if wait_in_pipeline and running_beside(run_id, step):
        say(mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get(C.TAG_STEP, "step"),
            f"waiting for the {step} run {run_id} to end")
        while run.info.status == "RUNNING":
            time.sleep(0.5)
            run = _run(run_id, step)
    made_by = run.data.tags.get(C.TAG_STEP)
    if made_by != step:
        raise UserError(f"{step}_run_id {run_id} was made by {made_by or 'no pipeline step'!r}, not by {step!r}")
    if run.info.status != "FINISHED":
        raise UserError(f"{step}_run_id {run_id} ended {run.info.status}; use a FINISHED {step} run")
    return run


def running_beside(run_id: str, step: str) -> bool:
    """Whether the run of `step` is still RUNNING as a step of the active run's own pipeline (parent run)."""
    run = _run(run_id, step)
    if run.info.status != "RUNNING":
        return False
    parent = run.data.tags.get(C.TAG_PARENT_RUN)
    return bool(parent) and parent == mlflow.get_run(mlflow.active_run().info.run_id).data.tags.get(C.TAG_PARENT_RUN)


def _run(run_id: str, step: str) -> Run:
    try:
        return mlflow.get_run(run_id)
    except MlflowException:
        raise UserError(f"{step}_run_id {run_id}: no such run in {mlflow.get_tracking_uri()}") from None


@contextmanager
def artifact(run_id: str, path: str, files: tuple[str, ...] = ()):
    """The local path of a run's artifact while the block runs (see `download`): a file, or a folder; with
    `files`, a folder holding only those files of it."""
    with tempfile.TemporaryDirectory(prefix="cifar10-download-") as folder:
        try:
            uri = f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{path}"
            if files:  # each file lands in `folder` (from a server) or is the store's own
                local = [download(f"{uri}/{name}", folder) for name in files][0].parent
            else:
                local = download(uri, folder)
        except (MlflowException, OSError) as exc:
            raise UserError(f"run {run_id} has no readable artifact {path!r}: {exc}") from None
        yield local


def download(artifact_uri: str, folder: str) -> Path:
    """The artifact at `artifact_uri` as a local path: the file itself in a local store (no copy), else a
    download into `folder`, which the caller deletes. (Left to itself, MLflow downloads into a new temporary
    folder each time and never deletes it: on a team server every step left its copy of the dataset.)"""
    local = urllib.parse.urlparse(artifact_uri).scheme in ("", "file")
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=None if local else folder))


@contextmanager
def store_lock(name: str):
    """An exclusive lock beside a local tracking store (SQLite file or ./mlruns folder), held for the block.

    Yields True when locked. A tracking server offers no lock, so there it yields False and callers
    run unlocked (the docs say so).
    """
    from filelock import FileLock

    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?")[0] + f".{name}.lock")
    elif uri.startswith("file:") or "://" not in uri:
        path = Path(urllib.parse.urlparse(uri).path if uri.startswith("file:") else uri) / f".{name}.lock"
    else:
        yield False
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):  # waits for the other holder
        yield True


def dataset_of(ingest_run_id: str, splits: tuple[str, ...]):
    """The dataset a FINISHED ingest run logged, with only `splits` loaded."""
    from . import data

    upstream(ingest_run_id, "ingest")
    with artifact(ingest_run_id, C.DATASET_DIR, data.files(splits)) as folder:  # from a server: only these
        return data.load(folder, splits)


def tag_experiment_kind(experiment_id: str) -> None:
    """Make `mlflow ui` open the experiment on its runs table, not MLflow 3's GenAI traces overview.

    The UI picks its mode from the experiment tag mlflow.experimentKind; a kind set already (by the
    user, or by MLflow for a GenAI experiment) is left as it is.
    """
    client = mlflow.MlflowClient()
    if C.EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, C.EXPERIMENT_KIND_TAG, C.EXPERIMENT_KIND)


def registered_versions(export_tags: dict) -> list[tuple[str, str, object]]:
    """(name, version, its ModelVersion or None when deleted since) of each model an export run registered,
    from its C.TAG_REGISTERED tags (INT8: none where it was off or lost too much)."""
    client, found = mlflow.MlflowClient(), []
    for flavor in ("pytorch", "onnx", "onnx_int8"):
        name, _, number = export_tags.get(C.TAG_REGISTERED.format(flavor=flavor), "").partition("/")
        if number:
            try:
                found.append((name, number, client.get_model_version(name, number)))
            except MlflowException:
                found.append((name, number, None))
    return found
