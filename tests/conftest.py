import os
import socket
import sys
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
    mlflow.set_tracking_uri(previous)  # whatever store was current before (e.g. a module fixture's) is again


def runs_env() -> dict:
    """The environment for subprocesses: this interpreter's venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(os.sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def snapshot(dest: Path) -> Path:
    """This project's files (tracked and untracked, not ignored) as one git commit at `dest`: a known code
    version, so that step reuse is on, whatever the working tree holds."""
    import shutil
    import subprocess

    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=PROJECT_DIR,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (PROJECT_DIR / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_DIR / name, dest / name)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(dest)]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run(git + cmd, check=True)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MLFLOW = str(Path(os.sys.executable).parent / "mlflow")  # the venv's CLI, whatever PATH says


def step_runs(step: str) -> list:
    """Every run made by pipeline step `step` (tag cifar10.step), oldest first, in every experiment."""
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{C.TAG_STEP}` = '{step}'", order_by=["attributes.start_time ASC"])


def only_run(step: str):
    (run,) = step_runs(step)
    return run


def children(parent_id: str) -> dict:
    """The nested runs of a pipeline run, by entry point."""
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`{C.TAG_PARENT_RUN}` = '{parent_id}'")
    return {r.data.tags.get(C.TAG_ENTRY_POINT, r.info.run_name): r for r in runs}  # a study run has no entry point


def fails(entry, argv: list[str], capsys, message: str) -> str:
    """Run a step's main(argv): it must exit 2 with one line on stderr that contains `message`."""
    with pytest.raises(SystemExit) as exit_:
        entry.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    return err[0]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, archive):
    """ingest -> train -> evaluate -> export once per test process, each step called as its script would be,
    in a store of its own; the model is registered as 'tiny' ('tiny-onnx', 'tiny-onnx-int8'). Tests take
    it through `chain`, and must add to its store only what they check themselves."""
    from steps import evaluate, export, ingest, train

    root = tmp_path_factory.mktemp("chain")
    with pytest.MonkeyPatch.context() as mp:
        isolate(root, mp)
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")  # the tiny train run lasts ~3 s
        ingest.main(["--data", str(archive), "--expected-records", "any"])
        ingest_id = only_run("ingest").info.run_id
        train.main(["--ingest-run-id", ingest_id, "--epochs", "2", "--batch-size", "16", "--device", "cpu"])
        train_id = only_run("train").info.run_id
        evaluate.main(["--train-run-id", train_id, "--device", "cpu"])
        evaluate_id = only_run("evaluate").info.run_id
        export.main(["--train-run-id", train_id, "--evaluate-run-id", evaluate_id, "--model-name", "tiny"])
        export_id = only_run("export").info.run_id
    return {"ingest": ingest_id, "train": train_id, "evaluate": evaluate_id, "export": export_id, "root": root,
            "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture
def chain(pipeline, monkeypatch):
    """The pipeline's run ids, with its store as the current one (working directory, tracking URI)."""
    while mlflow.active_run():
        mlflow.end_run()
    previous = mlflow.get_tracking_uri()
    monkeypatch.chdir(pipeline["root"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline["uri"])
    monkeypatch.setenv(C.CACHE_DIR_ENV, str(pipeline["root"] / "data"))
    monkeypatch.delenv(C.ARCHIVE_ENV, raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(pipeline["uri"])
    yield pipeline
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(previous)


# The files that take longest, first: pytest-xdist (--dist loadfile, without reordering: pyproject.toml) hands
# out files in collection order, and a long file started last keeps one worker busy while the other waits.
LONGEST_FIRST = ["test_end_to_end.py", "test_team_server.py", "test_interrupts.py", "test_bench.py", "test_spark.py",
                 "test_pipeline_steps.py", "test_distributed.py", "test_reliability.py", "test_scoring.py",
                 "test_training.py", "test_export.py", "test_search.py", "test_step_errors.py", "test_registry.py"]


def pytest_configure(config):
    """Each pytest-xdist worker, and every process its tests start, gets its share of the cores (unless the
    user set OMP_NUM_THREADS): two workers whose processes each run a thread per core wait on each other's
    threads and compute about half as fast together as one. (The pipeline splits the cores between its
    side-by-side steps the same way.)"""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays
