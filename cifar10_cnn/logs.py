"""Keeping other libraries' log chatter out of what the steps print, without hiding their errors."""

from __future__ import annotations

import logging
from contextlib import contextmanager


@contextmanager
def quiet(*names: str, level: int = logging.ERROR):
    """Within the block, the loggers `names` ('' is the root logger) pass only records of `level` and up."""
    loggers = [logging.getLogger(name or None) for name in names]
    before = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(level)
    try:
        yield
    finally:
        for log, old in zip(loggers, before, strict=True):
            log.setLevel(old)
