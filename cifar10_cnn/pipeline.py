"""The pipeline's steps as nested runs of the active run (main's, or tune's for its winner).

Each step is an entry point of the project, run with `mlflow.projects.run(..., env_manager="local")` in
its own process, so it can be rerun on its own and on other backends; the active run becomes its parent.
Like MLflow's multistep example, a FINISHED run of the same step with the same parameters, made by the
same git commit (and for ingest, from the same archive bytes), is reused instead of run again.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import mlflow

from . import constants as C
from . import cores, sources, tracking
from .errors import UserError
from .progress import say


class Steps:
    """The steps of one pipeline run: `who` names it in what it prints (main, tune)."""

    def __init__(self, project_dir: Path, who: str, reuse: bool):
        if not (project_dir / "MLproject").is_file():
            raise UserError(f"{project_dir} has no MLproject; run {who} from a checkout of the project")
        # Children run `python` from PATH (env_manager=local): make it this interpreter, whatever PATH says.
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        parent = mlflow.active_run()
        self.project_dir, self.who, self.parent_id = project_dir, who, parent.info.run_id
        self.experiment_id = parent.info.experiment_id
        self.reused: list[str] = []
        self.code, why_not = code_version(project_dir)  # tags the step runs made from a clean checkout
        self.commit = self.code if reuse else None  # what reuse matches on
        if reuse and self.commit is None:
            say(who, f"not reusing earlier step runs: {why_not}")

    def run(self, entry_point: str, parameters: dict, can_reuse: bool = True, match_tags: dict | None = None,
            still_good: Callable | None = None) -> str:
        """The run id of `entry_point` with these parameters: an earlier FINISHED one (for which
        `still_good(run)` holds, when given), or a new nested run."""
        parameters = {k: str(v) for k, v in parameters.items()}
        if can_reuse and self.commit and (earlier := reusable(
                self.experiment_id, entry_point, parameters, self.commit, match_tags or {}, still_good)):
            say(self.who, f"step {entry_point}: reusing FINISHED run {earlier} (same parameters, code and data)")
            self.reused.append(entry_point)
            mlflow.set_tag(C.TAG_STEP_RUN.format(step=entry_point), earlier)
            return earlier
        say(self.who, f"step {entry_point} …")
        try:
            submitted = mlflow.projects.run(
                str(self.project_dir), entry_point, parameters=parameters,
                env_manager="local", experiment_id=self.experiment_id, run_name=entry_point, synchronous=True,
            )
        except mlflow.exceptions.ExecutionException:
            raise UserError(f"step {entry_point} failed; its error is printed above") from None
        mlflow.set_tag(C.TAG_STEP_RUN.format(step=entry_point), submitted.run_id)
        if self.code and code_version(self.project_dir)[0] == self.code:  # unchanged while it ran: reusable
            mlflow.MlflowClient().set_tag(submitted.run_id, C.TAG_CODE_COMMIT, self.code)
        return submitted.run_id

    def ingest(self, data: str, expected_records: str, source: sources.Source | None) -> str:
        """ingest, reused only when the archive's bytes are known to be the same (a download is not)."""
        data_tags = {C.TAG_SOURCE_SHA256: sources.source_digest(source)} if self.commit and source else None
        if self.commit and data_tags is None:
            say(self.who, "ingest will download the data, so it runs again (its digest is not known yet)")
        return self.run("ingest", {"data": data, "expected_records": expected_records},
                        can_reuse=data_tags is not None, match_tags=data_tags)

    def evaluate_and_export(self, train_id: str, device: str, tta: str, model_name: str, int8: str) -> tuple[str, str]:
        """(evaluate run id, export run id), the two side by side.

        Both start from the train run; export waits for evaluate's results (its logits, its metrics) only
        before its parity checks, the INT8 timing and registration.
        Each step spends seconds starting (imports, the store), which the cores overlap. Each gets half
        the cores, and takes them all once the other has nothing left to compute (cores.py). MLflow's
        active run is per thread, so the parent run is made active in evaluate's thread too, and evaluate
        nests under it as usual.
        """
        def evaluate_beside() -> str:
            mlflow.start_run(run_id=self.parent_id)
            return self.run("evaluate", {"train_run_id": train_id, "device": device, "tta": tta})

        with cores.shared(processes=2):
            evaluate = in_thread(evaluate_beside)
            evaluate.add_done_callback(lambda _: cores.free("evaluate"))  # reused, done first, or failed
            try:
                evaluate_started = child_run_id(evaluate, self.parent_id, self.experiment_id, "evaluate")
                try:
                    export_id = self.run("export", {"train_run_id": train_id, "evaluate_run_id": evaluate_started,
                                                    "model_name": model_name, "int8": int8},
                                         still_good=still_registered)
                finally:
                    cores.free("export")  # it failed, or was reused: evaluate may still run
            except UserError:
                evaluate.result()  # when evaluate failed, that is the cause to report, not export's wait for it
                raise
            return evaluate.result(), export_id


def code_version(project_dir: Path) -> tuple[str | None, str]:
    """The git commit of the project, or None and why, when the code is not exactly a commit."""
    import subprocess

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


def reusable(experiment_id: str, entry_point: str, parameters: dict, commit: str, tags: dict,
             still_good: Callable | None = None) -> str | None:
    """The newest FINISHED run of `entry_point` made by this commit with these exact parameters and tags.

    Parameters are compared as the strings MLflow stores, like every value `mlflow run` passes. The commit
    is C.TAG_CODE_COMMIT, not MLflow's `mlflow.source.git.commit`: MLflow tags HEAD even when the checkout
    had uncommitted changes, which would make an edited run pass for the commit's.
    """
    import shlex

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", order_by=["attributes.start_time DESC"],
        filter_string=(f"tags.`{C.TAG_STEP}` = '{entry_point}' and attributes.status = 'FINISHED' "
                       f"and tags.`{C.TAG_CODE_COMMIT}` = '{commit}'"),
    )
    for run in runs:
        if all(run.data.params.get(k) in (v, shlex.quote(v)) for k, v in parameters.items()) and all(
                run.data.tags.get(k) == v for k, v in tags.items()) and (still_good is None or still_good(run)):
            return run.info.run_id
    return None


def still_registered(export_run) -> bool:
    """Whether every version an export run registered still exists (a user may have deleted one since:
    then the export runs again rather than report versions that are gone)."""
    return all(version is not None for _, _, version in tracking.registered_versions(export_run.data.tags))


def in_thread(fn: Callable, *args) -> Future:
    """`fn(*args)` in a thread of its own; its Future. The thread is a daemon: a stopped main (Ctrl-C,
    SIGTERM, an error) does not wait for it, and a step process it started is told by its parent-death
    signal. (A ThreadPoolExecutor's threads are joined when the interpreter exits: main would hang.)"""
    future: Future = Future()

    def target():
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    threading.Thread(target=target, name=getattr(fn, "__name__", "step"), daemon=True).start()
    return future


def child_run_id(step: Future, parent_run_id: str, experiment_id: str, entry_point: str) -> str:
    """The run id of the `entry_point` step that `step` runs under the parent run, as soon as MLflow has made
    the run (before its process starts); the step's own result if it ends without making one (reused)."""
    query = f"tags.`{C.TAG_PARENT_RUN}` = '{parent_run_id}' and tags.`{C.TAG_ENTRY_POINT}` = '{entry_point}'"
    while not (runs := mlflow.search_runs([experiment_id], query, output_format="list")):
        if step.done():
            return step.result()
        time.sleep(0.1)
    return runs[0].info.run_id
