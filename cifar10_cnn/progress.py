"""Progress bars on a terminal, nothing in log files.

Inside `mlflow run`, CI or a redirected log, stderr is not a TTY: bars are disabled there so the logs
hold only the one-line-per-epoch messages the steps print themselves.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def say(step: str, text: str) -> None:
    """One line of a step's story on stdout, flushed at once so that logs interleave in order."""
    print(f"[{step}] {text}", flush=True)


def interactive() -> bool:
    return sys.stderr.isatty()


def quiet_mlflow_bars_unless_interactive() -> None:
    """MLflow's own artifact bars would fill a log file or a redirected output with carriage returns."""
    if not interactive():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    # disable=None: tqdm switches itself off when its stream (stderr) is not a terminal.
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=None, dynamic_ncols=True, **kwargs)
