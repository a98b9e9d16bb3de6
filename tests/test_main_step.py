"""main on its own: its parameters, the order and overlap of its steps, the cores they share, reuse and naming
(no real steps run)."""

import os
import subprocess
import threading
from types import SimpleNamespace

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from cifar10_cnn import constants as C
from cifar10_cnn import cores, pipeline, recipes, tracking
from cifar10_cnn.errors import UserError
from steps import main
from tests.conftest import fails, step_runs


def test_main_parameters_resolve_the_recipe(store):
    from steps.main import check_main_params

    raw = {k: "auto" for k in (*recipes.FIELDS, "tta")}
    raw.update(recipe="fast", device="cpu", data="auto", expected_records="any", model_name="m",
               resume_run_id="none", int8="true", reuse="false", nproc_per_node="1")
    p = check_main_params({**raw, "epochs": "3"})
    assert p["train"]["model"] == "airnet" and p["train"]["epochs"] == 3 and p["train"]["optimizer"] == "muon"
    assert p["train"]["precision"] == "auto"  # decided by the train step, on the device it trains on
    assert p["tta"] == "crops" and p["reuse"] is False and p["resume_run_id"] == "none"
    assert check_main_params({**raw, "recipe": "seed"})["tta"] == "false"
    assert check_main_params({**raw, "tta": "true"})["tta"] == "flip"  # true kept its old meaning
    assert check_main_params({**raw, "budget_minutes": "5"})["train"]["budget_minutes"] == 5.0
    with pytest.raises(UserError, match="give epochs or budget_minutes, not both"):
        check_main_params({**raw, "budget_minutes": "5", "epochs": "3"})
    with pytest.raises(UserError, match="tta must be one of false, flip, crops; got 'maybe'"):
        check_main_params({**raw, "tta": "maybe"})
    with pytest.raises(UserError, match="recipe must be one of seed, fast, fast94; got 'slow'"):
        check_main_params({**raw, "recipe": "slow"})
    with pytest.raises(UserError, match="warmup_epochs .3.0. is longer than the training .2 epochs."):
        check_main_params({**raw, "epochs": "2", "warmup_epochs": "3"})
    killed = MlflowClient().create_run("0").info.run_id  # a fast run to resume: its recipe, and so its TTA
    MlflowClient().log_param(killed, "recipe", "fast")
    resumed = check_main_params({**raw, "recipe": "seed", "resume_run_id": killed})
    assert resumed["train"]["recipe"] == "fast" and resumed["tta"] == "crops"


def test_main_runs_evaluate_beside_export_and_names_a_failed_evaluate(store, archive, monkeypatch, capsys):
    """Export starts before evaluate ends, with evaluate's run id; when evaluate fails, that is what main
    reports (export, which waited for it, fails too). mlflow.projects.run is replaced by a fake that makes
    the nested run as MLflow does, then plays the step; events, not sleeps, order the two."""
    client, started = MlflowClient(), []
    export_started, evaluate_done = threading.Event(), threading.Event()

    def fake_projects_run(uri, entry_point, parameters, experiment_id, **_):
        run = client.create_run(experiment_id, tags={C.TAG_PARENT_RUN: mlflow.active_run().info.run_id,
                                                      C.TAG_ENTRY_POINT: entry_point, C.TAG_STEP: entry_point})
        started.append((entry_point, parameters, evaluate_done.is_set()))
        if entry_point == "evaluate":
            assert export_started.wait(30), "export did not start while evaluate ran"
            client.set_terminated(run.info.run_id, "FAILED")
            evaluate_done.set()
            raise mlflow.exceptions.ExecutionException("evaluate failed")
        if entry_point == "export":
            export_started.set()
            assert evaluate_done.wait(30)  # as export waits for its sibling, then finds it FAILED
            client.set_terminated(run.info.run_id, "FAILED")
            raise mlflow.exceptions.ExecutionException("export failed")
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info

    monkeypatch.setattr(mlflow.projects, "run", fake_projects_run)
    fails(main, ["--data", str(archive), "--reuse", "false"], capsys, "step evaluate failed")
    names = [name for name, _, _ in started]
    assert names == ["ingest", "train", "evaluate", "export"]
    (evaluate_id,) = [r.info.run_id for r in step_runs("evaluate")]
    export_params, evaluate_had_ended = started[3][1:]
    assert export_params["evaluate_run_id"] == evaluate_id and not evaluate_had_ended
    (parent,) = step_runs("main")
    assert parent.info.status == "FAILED"


def test_a_step_takes_the_cores_the_other_step_freed(monkeypatch):
    """Side by side each step gets an equal share of the cores; once one of them frees its share, the
    other's next forward pass runs on the whole machine, and its own freeing changes nothing for itself.
    The folder of freed shares is gone afterwards; a user's OMP_NUM_THREADS is kept, and nothing shared out."""
    if cores.machine() < 2:
        pytest.skip("one core: there is nothing to share")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    try:
        with cores.shared(processes=2):
            folder = os.environ[cores.FOLDER]
            assert os.environ["OMP_NUM_THREADS"] == str(cores.machine() // 2)
            torch.set_num_threads(1)  # as a step starts, from OMP_NUM_THREADS
            threads_in_forward = cores.taking_freed("evaluate", lambda images: torch.get_num_threads())
            cores.free("evaluate")
            assert threads_in_forward(None) == 1
            cores.free("export")
            assert threads_in_forward(None) == cores.machine()
        assert not os.path.exists(folder)
        assert cores.FOLDER not in os.environ and "OMP_NUM_THREADS" not in os.environ
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        with cores.shared(processes=2):
            assert cores.FOLDER not in os.environ and os.environ["OMP_NUM_THREADS"] == "1"
            cores.free("export")  # a no-op: nothing is shared out
    finally:
        torch.set_num_threads(threads)


def test_export_waits_only_for_an_evaluate_run_of_its_own_pipeline(store, monkeypatch):
    """main runs evaluate beside export: export waits for such a run to end, and for no other."""
    client = MlflowClient()
    pipeline = client.create_run("0").info.run_id

    def step_run(step, parent):
        return client.create_run("0", tags={C.TAG_STEP: step, **({C.TAG_PARENT_RUN: parent} if parent else {})})
    sibling, stranger = step_run("evaluate", pipeline).info.run_id, step_run("evaluate", None).info.run_id
    polls = []

    def poll(seconds):  # export's wait between two looks at the store: the sibling ends on the third
        polls.append(seconds)
        if len(polls) == 3:
            client.set_terminated(sibling, "FINISHED")

    monkeypatch.setattr(tracking, "time", SimpleNamespace(sleep=poll))  # tracking's clock only
    with mlflow.start_run(run_id=step_run("export", pipeline).info.run_id):
        assert tracking.running_beside(sibling, "evaluate") and not tracking.running_beside(stranger, "evaluate")
        with pytest.raises(UserError, match="ended RUNNING"):  # not waited for: no pipeline of ours runs it
            tracking.upstream(stranger, "evaluate", wait_in_pipeline=True)
        assert polls == []
        assert tracking.upstream(sibling, "evaluate", wait_in_pipeline=True).info.status == "FINISHED"
        assert len(polls) == 3  # it looked until the run had ended
        client.set_terminated(stranger, "FAILED")
        with pytest.raises(UserError, match="ended FAILED"):
            tracking.upstream(stranger, "evaluate", wait_in_pipeline=True)


def test_reuse_takes_only_a_finished_run_of_the_same_code_parameters_and_data(store):
    client = MlflowClient()
    params = {"ingest_run_id": "a" * 32, "epochs": "2"}

    def step_run(status="FINISHED", commit="c0ffee", **changed):
        run = client.create_run("0", tags={C.TAG_STEP: "train", C.TAG_CODE_COMMIT: commit,
                                           "mlflow.source.git.commit": "c0ffee", C.TAG_SOURCE_SHA256: "d1"})
        for key, value in {**params, **changed}.items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id

    step_run(epochs="3"), step_run(commit="0ther"), step_run(status="FAILED")
    dirty = client.create_run("0", tags={C.TAG_STEP: "train", "mlflow.source.git.commit": "c0ffee"})  # edited code
    for key, value in params.items():
        client.log_param(dirty.info.run_id, key, value)
    client.set_terminated(dirty.info.run_id, "FINISHED")
    assert pipeline.reusable("0", "train", params, "c0ffee", {}) is None
    same = step_run()
    assert pipeline.reusable("0", "train", params, "c0ffee", {}) == same
    assert pipeline.reusable("0", "train", params, "c0ffee", {C.TAG_SOURCE_SHA256: "d2"}) is None  # other data
    assert pipeline.reusable("0", "train", {**params, "epochs": "3"}, "c0ffee", {}) != same
    # an export whose registered version was deleted since runs again
    export = client.create_run("0", tags={C.TAG_STEP: "export", C.TAG_CODE_COMMIT: "c0ffee",
                                          C.TAG_REGISTERED.format(flavor="onnx"): "m-onnx/1"}).info.run_id
    client.set_terminated(export, "FINISHED")
    assert pipeline.reusable("0", "export", {}, "c0ffee", {}, pipeline.still_registered) is None
    client.create_registered_model("m-onnx")
    client.create_model_version("m-onnx", "file:///nowhere")
    assert pipeline.reusable("0", "export", {}, "c0ffee", {}, pipeline.still_registered) == export


def test_code_version_is_a_clean_git_commit(tmp_path):
    from cifar10_cnn.pipeline import code_version

    assert code_version(tmp_path) == (None, f"{tmp_path} is not a git checkout")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "code.py").write_text("x = 1\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "one"]):
        subprocess.run(git + cmd, check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == (head, "")
    (tmp_path / "notes.txt").write_text("untracked files do not change the code\n")
    assert code_version(tmp_path) == (head, "")
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path) == (None, "the project has uncommitted changes, so its code is not a known version")


def test_parent_runs_are_named_after_what_they_train():
    from steps.main import run_name

    assert run_name({"recipe": "seed", "model": "simple_cnn", "epochs": 5, "budget_minutes": 0.0}) == \
        "seed · simple_cnn · 5 epochs"
    assert run_name({"recipe": "seed", "model": "vgg11", "epochs": 1, "budget_minutes": 0.0}) == \
        "seed · vgg11 · 1 epoch"
    assert run_name({"recipe": "fast", "model": "airnet", "epochs": 10, "budget_minutes": 7.5}) == \
        "fast · airnet · 7.5 min"
    assert run_name({"recipe": "fast", "model": "auto"}) == "fast (resumed)"  # train reads the killed run's


def test_the_summary_points_at_the_runs_table_of_a_local_store_or_a_server():
    from steps.main import ui_command

    page = "#/experiments/7/runs?workflowType=machine_learning"
    assert ui_command("http://team:5000/", "7") == f"open http://team:5000/{page}"  # the server is the UI
    assert ui_command("sqlite:////x/mlflow.db", "7") == (
        f"mlflow ui --app-name cifar10-cnn --backend-store-uri sqlite:////x/mlflow.db, then open "
        f"http://127.0.0.1:5000/{page}")
