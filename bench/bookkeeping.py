"""Bookkeeping: where the time of a whole `mlflow run` goes besides the training epochs.

    python -m bench.bookkeeping --data PATH                      # this checkout, the seed recipe
    python -m bench.bookkeeping --data PATH --project ../old     # another checkout, e.g. an older commit
    python -m bench.bookkeeping --data PATH --runs 3             # median of 3 whole runs
    python -m bench.bookkeeping --data PATH -P recipe=fast -P epochs=1   # the fast recipe's time after training

Each run is `mlflow run PROJECT --env-manager local` in a fresh tracking store, timed from outside;
the steps' times come from the runs' own start and end times, the epochs from the train run's
`epoch_seconds`. "CLI and main" is the wall time no step run covers: `mlflow run` starting, and main
before, between and after its steps. Evaluate and export run side by side, so their rows overlap and
the rows add up to more than the whole. Prints numbers, asserts nothing; compare checkouts on one
machine, in one session.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

from cifar10_cnn import constants as C
from cifar10_cnn.hardware import machine_line

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = str(Path(sys.executable).parent / "mlflow")
ROWS = ("whole run, wall", "training epochs", "everything but the epochs", "ingest", "train outside its epochs",
        "evaluate", "export", "end of training -> end of export", "`mlflow run` CLI and main")


def timed_mlflow_run(project: Path, workdir: Path, params: list[str]) -> tuple[float, dict]:
    """`mlflow run PROJECT --env-manager local -P ...` in a fresh store under `workdir`: its wall seconds
    and its runs by entry point (each with the start and end times MLflow recorded)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           C.CACHE_DIR_ENV: str(workdir / "data"),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    args = [MLFLOW, "run", str(project), "--env-manager", "local", *(a for p in params for a in ("-P", p))]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"mlflow run failed:\n{done.stderr[-3000:]}")
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return wall, {r.data.tags.get(C.TAG_ENTRY_POINT): r
                  for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


def seconds(run) -> float:
    return (run.info.end_time - run.info.start_time) / 1000


def epoch_seconds(train_run) -> float:
    return sum(m.value for m in mlflow.MlflowClient().get_metric_history(train_run.info.run_id, "epoch_seconds"))


def covered(runs) -> float:
    """Seconds during which at least one of `runs` was running (steps may run side by side)."""
    total, end = 0.0, None
    for start, stop in sorted((r.info.start_time, r.info.end_time) for r in runs):
        if end is None or start > end:
            total, end = total + (stop - start), stop
        elif stop > end:
            total, end = total + (stop - end), stop
    return total / 1000


def one_run(project: Path, data: str, workdir: Path, extra: list[str]) -> dict:
    wall, runs = timed_mlflow_run(project, workdir, [f"data={data}", *extra])
    step = {name: seconds(r) for name, r in runs.items()}
    epochs = epoch_seconds(runs["train"])
    steps = covered([runs[s] for s in ("ingest", "train", "evaluate", "export")])
    last = max(runs["evaluate"].info.end_time, runs["export"].info.end_time)
    after_training = (last - runs["train"].info.end_time) / 1000
    print(scores(runs["evaluate"], runs["export"]), flush=True)
    return dict(zip(ROWS, (wall, epochs, wall - epochs, step["ingest"], step["train"] - epochs,
                           step["evaluate"], step["export"], after_training, wall - steps), strict=True))


def scores(evaluate_run, export_run) -> str:
    """What the run measured, so that two checkouts are seen to compute the same results in their times."""
    m = {**evaluate_run.data.metrics, **export_run.data.metrics}
    shown = (("test accuracy", "test_accuracy"), ("with TTA", "test_accuracy_tta"), ("ONNX", "onnx_test_accuracy"),
             ("INT8", "int8_test_accuracy"))
    return "scores: " + ", ".join(f"{label} {m[key]:.2%}" for label, key in shown if key in m) + (
        f"; ONNX max |logit diff| {m['onnx_max_abs_diff']:.1e}" if "onnx_max_abs_diff" in m else "")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.bookkeeping", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="archive or folder, as the data parameter")
    parser.add_argument("--project", default=str(ROOT), help="the checkout to run (default: this one)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("-P", dest="params", action="append", default=[], help="more -P name=value for mlflow run")
    args = parser.parse_args(argv)
    print(machine_line(), flush=True)
    results = []
    project, data = Path(args.project).resolve(), str(Path(args.data).resolve())
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            results.append(one_run(project, data, Path(tmp), args.params))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in results[-1].items()), flush=True)
    print(f"\n{args.project} (median of {len(results)})\n| | seconds |\n|---|---|")
    for row in ROWS:
        print(f"| {row} | {statistics.median(r[row] for r in results):.1f} |")
    return results


if __name__ == "__main__":
    main()
