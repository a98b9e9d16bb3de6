import os
import socket
from pathlib import Path

import mlflow
import pytest

from cifar10_cnn import constants as C
from cifar10_cnn import synthetic

PROJECT_DIR = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def archive(tmp_path_factory) -> Path:
    """A valid archive: 5 x 40 train records, 100 test records."""
    return synthetic.write_archive(tmp_path_factory.mktemp("archive") / C.ARCHIVE_NAME, synthetic.batch_files())


def isolate(root: Path, monkeypatch) -> str:
    """A fresh tracking store and data cache under `root`; nothing from the developer's environment."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(root / "data"))
    monkeypatch.delenv(C.ARCHIVE_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    # Create the store in this process first: experiment 0 then keeps its artifacts under root/mlruns
    # (the working directory of whoever creates it), and no two processes race to create the schema.
    mlflow.MlflowClient().search_experiments()
    return uri


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    while mlflow.active_run():
        mlflow.end_run()
    previous = mlflow.get_tracking_uri()
    uri = isolate(tmp_path, monkeypatch)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)  # a module's store (e.g. test_steps' chain) is current again


def runs_env() -> dict:
    """The environment for subprocesses: this interpreter's venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(os.sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
