"""Progress bars on a terminal, nothing in log files.

Inside `mlflow run`, CI or a redirected log, stderr is not a TTY: bars are disabled there so the logs
hold only the one-line-per-epoch messages the steps print themselves.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    return tqdm(
        iterable, total=total, desc=desc, unit=unit, leave=False, disable=not interactive(),
        dynamic_ncols=True, **kwargs,
    )
