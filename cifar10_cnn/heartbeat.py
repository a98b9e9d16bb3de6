"""A run's heartbeat: the process working on a run tags it with the time every BEAT_S seconds, so another
process, on any machine that reaches the same tracking store, tells a live one from one whose process or
machine is gone (SIGKILL, out of memory, a power cut, a cut cable): silent for STALE_S, or, on the same
machine, its process id ended. Every step run beats (tracking.run_step), and so do tune's trials."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import mlflow

# A beat costs one tag write; a process silent for STALE_S (eight beats missed) is gone, which is how long a
# lost worker machine keeps a study's owner waiting. Machines' clocks must agree to well within it (NTP).
BEAT_S = 15.0
STALE_S = 120.0


def this_process() -> str:
    """'host:pid', then where that pid means something (Linux: this boot and this pid namespace, so two
    containers sharing a hostname, or a machine rebooted since, never read each other's process ids)."""
    return f"{socket.gethostname()}:{os.getpid()}" + (f"/{space}" if (space := _pid_space()) else "")


def first_beat(process_key: str, heartbeat_key: str) -> dict:
    """The tags that name this process and beat once, for a run it starts working on."""
    return {process_key: this_process(), heartbeat_key: _now()}


def _now() -> str:
    return f"{time.time():.0f}"


def _pid_space() -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        return f"{boot}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


def lost(run, process_key: str, heartbeat_key: str, since: float | None) -> str | None:
    """Why the process named by `run`'s tag `process_key` no longer works on it, or None while it may: on
    this machine (and pid namespace) its process id has ended; on another, its heartbeat is over STALE_S old.
    Before its first heartbeat, the time counts from `since` (Unix seconds); None: no heartbeat, not lost."""
    import psutil

    process = run.data.tags.get(process_key, "")
    who, _, space = process.partition("/")
    host, _, pid = who.rpartition(":")
    here = host == socket.gethostname() and (not space or space == _pid_space())  # none: an earlier version's tag
    if here and pid.isdigit():  # its process id says it all (a busy or stopped process may not beat)
        return None if psutil.pid_exists(int(pid)) else f"its process {who} has ended"
    last = run.data.tags.get(heartbeat_key)
    if last is None and since is None:
        return None
    if (age := time.time() - float(last or since)) > STALE_S:
        return f"no heartbeat from {who or 'its process'} for {age:.0f} s (over {STALE_S:g} s)"
    return None


@contextlib.contextmanager
def beating(run_id: str, heartbeat_key: str):
    """While the block runs, tag run `run_id` with the time every BEAT_S seconds, from a thread (training
    releases the GIL in torch's kernels). A failed write is retried at the next beat, never raised; leaving
    does not wait for a write the store is slow to answer."""
    client, stop = mlflow.MlflowClient(), threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            with contextlib.suppress(Exception):  # the store may be out for a moment: the next beat retries
                client.set_tag(run_id, heartbeat_key, _now())

    thread = threading.Thread(target=beat, name=f"heartbeat of run {run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)  # a daemon: one stuck in the store's retries does not hold the process
