"""Bad input to a step: one line naming the problem, exit 2, the run FAILED, nothing written downstream.
Every parameter's own check is pinned once in test_params.py; these show what the steps do with it."""

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from cifar10_cnn import constants as C
from cifar10_cnn import synthetic
from steps import export, ingest, main, train
from tests.conftest import fails, only_run, step_runs


def step_run(step: str, status: str = "FINISHED") -> str:
    """A run that says it was made by `step` (no artifacts): enough for the checks that come before any data."""
    client = MlflowClient()
    run_id = client.create_run("0", tags={C.TAG_STEP: step}).info.run_id
    client.set_terminated(run_id, status)
    return run_id


def test_a_bad_parameter_fails_the_train_run_before_it_reads_or_logs_anything(store, capsys):
    """Every hyperparameter's check is pinned in test_params.py; here, what a step does with a bad one."""
    line = fails(train, ["--ingest-run-id", step_run("ingest"), "--label-smoothing", "1.5"], capsys,
                 "label_smoothing must be a number in [0, 1), got '1.5'")  # the ingest run has no data at all
    assert line.startswith("error: train: ")
    failed = only_run("train")
    assert failed.info.status == "FAILED"
    assert MlflowClient().list_artifacts(failed.info.run_id) == []  # no checkpoint, no model


def test_train_rejects_a_run_of_another_step(store, capsys):
    fails(train, ["--ingest-run-id", step_run("evaluate")], capsys, "was made by 'evaluate', not by 'ingest'")


def test_train_rejects_a_missing_run(store, capsys):
    fails(train, ["--ingest-run-id", "0" * 32], capsys, f"ingest_run_id {'0' * 32}: no such run")


def test_export_rejects_an_evaluation_of_another_train_run(store, capsys):
    fails(export, ["--train-run-id", step_run("train"), "--evaluate-run-id", step_run("ingest")], capsys,
          "was made by 'ingest', not by 'evaluate'")


def test_ingest_missing_data_fails_and_caches_nothing(store, tmp_path, capsys):
    fails(ingest, ["--data", str(tmp_path / "nope.tar.gz")], capsys, "nope.tar.gz does not exist")
    (run,) = step_runs("ingest")
    assert run.info.status == "FAILED" and MlflowClient().list_artifacts(run.info.run_id) == []
    assert not (tmp_path / "data").exists()


def test_a_full_disk_is_one_line_and_leaves_no_partial_dataset(store, archive, monkeypatch, capsys):
    """The artifact store fills up while ingest logs the dataset: one file copied, then ENOSPC."""
    import errno
    import re

    def copy_one_then_fill_up(local_dir, artifact_path):
        mlflow.log_artifact(f"{local_dir}/meta.json", artifact_path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlflow, "log_artifacts", copy_one_then_fill_up)
    line = fails(ingest, ["--data", str(archive), "--expected-records", "any"], capsys, "no space left on device: ")
    (run,) = step_runs("ingest")
    local = run.info.artifact_uri.removeprefix("file://")
    assert re.search(re.escape(local) + r" \([\d,]+ MiB free\)", line), line  # the store, with its free space
    assert line.endswith("free some space and run the step again")
    assert run.info.status == "FAILED" and MlflowClient().list_artifacts(run.info.run_id, C.DATASET_DIR) == []


def test_ingest_corrupt_archive_fails(store, tmp_path, capsys):
    path = synthetic.write_archive(tmp_path / "evil.tar.gz", synthetic.batch_files(),
                                   extra=[synthetic_link()])
    fails(ingest, ["--data", str(path), "--expected-records", "any"], capsys, "refusing a hostile archive")
    assert only_run("ingest").info.status == "FAILED"


def synthetic_link():
    import tarfile

    info = tarfile.TarInfo("cifar-10-batches-bin/evil")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    return info


def test_train_on_a_failed_ingest_run(store, tmp_path, capsys):
    fails(ingest, ["--data", str(tmp_path / "nope")], capsys, "does not exist")
    failed = only_run("ingest").info.run_id
    fails(train, ["--ingest-run-id", failed], capsys, f"ingest_run_id {failed} ended FAILED")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "epochs must be a whole number >= 1, got '0'"),  # a hyperparameter
        (["--device", "gpu"], "device must be one of auto, cpu, cuda, mps; got 'gpu'"),  # a step argument
        (["--data", "/nonexistent/cifar.tar.gz"], "data: /nonexistent/cifar.tar.gz does not exist"),  # the data
    ],
)
def test_main_rejects_bad_input_before_any_step(store, capsys, argv, message):
    line = fails(main, argv, capsys, message)
    assert line.startswith("error: main: ")
    (parent,) = step_runs("main")
    assert parent.info.status == "FAILED"
    everything = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.run_id for r in everything] == [parent.info.run_id]  # no child runs
    assert MlflowClient().search_registered_models() == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_main_rejects_cuda_without_a_gpu(store, capsys):
    fails(main, ["--device", "cuda"], capsys, "device 'cuda' was requested but torch sees no CUDA GPU")


def test_a_step_tags_its_experiment_kind_unless_it_has_one(store, capsys):
    client = MlflowClient()
    genai = client.create_experiment("genai-already", tags={C.EXPERIMENT_KIND_TAG: "genai_development"})
    plain = client.create_experiment("plain")
    for experiment_id in (genai, plain):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
            fails(main, ["--epochs", "abc"], capsys, "epochs must be a whole number >= 1, got 'abc'")
    assert client.get_experiment(genai).tags[C.EXPERIMENT_KIND_TAG] == "genai_development"  # kept
    assert client.get_experiment(plain).tags[C.EXPERIMENT_KIND_TAG] == C.EXPERIMENT_KIND == "custom_model_development"
