"""The recipe through the real `mlflow run` CLI, as a user runs it. Slow: each step is a process."""

import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cifar10_cnn import constants as C
from tests.conftest import PROJECT_DIR, free_port, isolate, runs_env

pytestmark = pytest.mark.slow

MLFLOW = str(Path(sys.executable).parent / "mlflow")


EXPERIMENT = "cifar10-cnn"  # as `make run` names it


def mlflow_run(*params: str, timeout=600, experiment: str | None = None) -> subprocess.CompletedProcess:
    args = [MLFLOW, "run", str(PROJECT_DIR), "--env-manager", "local"]
    if experiment:
        args += ["--experiment-name", experiment]
    for p in params:
        args += ["-P", p]
    return subprocess.run(args, capture_output=True, text=True, env=runs_env(), timeout=timeout)


def children(parent_id: str) -> dict:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.data.tags["mlflow.project.entryPoint"]: r for r in runs}


def parents() -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`mlflow.project.entryPoint` = 'main'",
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def store(tmp_path_factory, archive):
    with pytest.MonkeyPatch.context() as mp:
        isolate(tmp_path_factory.mktemp("e2e"), mp)
        done = mlflow_run("epochs=2", f"data={archive}", "expected_records=any", "model_name=e2e",
                          experiment=EXPERIMENT)
        assert done.returncode == 0, done.stderr[-3000:]
        yield done


def test_one_parent_with_four_nested_steps(store):
    (parent,) = parents()
    assert parent.info.status == "FINISHED"
    steps = children(parent.info.run_id)
    assert set(steps) == {"ingest", "train", "evaluate", "export"}
    assert all(r.info.status == "FINISHED" for r in steps.values())
    assert len({r.info.experiment_id for r in [parent, *steps.values()]}) == 1
    # Each step received the run id of the step before it, through the tracking store.
    assert steps["train"].data.params["ingest_run_id"] == steps["ingest"].info.run_id
    assert steps["evaluate"].data.params["train_run_id"] == steps["train"].info.run_id
    assert steps["export"].data.params["evaluate_run_id"] == steps["evaluate"].info.run_id
    assert parent.data.metrics["test_accuracy"] == steps["evaluate"].data.metrics["test_accuracy"]
    # A name that says what was trained, in the named experiment, which the UI opens on its runs table
    assert parent.info.run_name == "seed · simple_cnn · 2 epochs"
    experiment = MlflowClient().get_experiment(parent.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.tags[C.EXPERIMENT_KIND_TAG] == C.EXPERIMENT_KIND == "custom_model_development"


def test_both_flavors_registered_with_the_alias(store):
    client = MlflowClient()
    (parent,) = parents()
    steps = children(parent.info.run_id)
    for name in ("e2e", "e2e-onnx"):
        version = client.get_model_version_by_alias(name, C.CANDIDATE_ALIAS)
        assert version.tags["pipeline_run_id"] == parent.info.run_id
        assert version.tags["train_run_id"] == steps["train"].info.run_id
    assert steps["export"].data.metrics["onnx_argmax_mismatches"] == 0


def test_summary_names_accuracy_runs_and_versions(store):
    (parent,) = parents()
    out = store.stdout
    assert "CIFAR-10 CNN pipeline finished" in out
    assert f"parent run    : {parent.info.run_id}" in out
    acc = parent.data.metrics["test_accuracy"]
    assert f"test accuracy : {acc:.2%}" in out
    assert "e2e v1 (@candidate), e2e-onnx v1 (@candidate)" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert f"open http://127.0.0.1:5000/#/experiments/{parent.info.experiment_id}?workflowType=machine_learning" in out
    assert out.split("=" * 80)[2].strip() in parent.data.tags["mlflow.note.content"]  # the run's description
    onnx_path = out.split("ONNX model    : ")[1].split()[0]
    assert Path(onnx_path).is_file() and onnx_path.endswith(".onnx")


def test_divergence_fails_the_recipe_and_registers_nothing(store, archive):
    client = MlflowClient()
    before = {n: [str(v.version) for v in client.search_model_versions(f"name = '{n}'")] for n in ("e2e", "e2e-onnx")}
    done = mlflow_run("epochs=1", "learning_rate=1e9", f"data={archive}", "expected_records=any", "model_name=e2e",
                      "reuse=false")  # a fresh ingest run too, whatever the code version
    assert done.returncode != 0
    assert "training diverged" in done.stderr and "lower learning_rate" in done.stderr
    parent = parents()[-1]
    assert parent.info.status == "FAILED"
    steps = children(parent.info.run_id)
    assert set(steps) == {"ingest", "train"} and steps["train"].info.status == "FAILED"
    after = {n: [str(v.version) for v in client.search_model_versions(f"name = '{n}'")] for n in ("e2e", "e2e-onnx")}
    assert after == before
    assert str(client.get_model_version_by_alias("e2e", C.CANDIDATE_ALIAS).version) == before["e2e"][0]


def test_bad_parameter_fails_before_any_step(store):
    n_runs = len(mlflow.search_runs(search_all_experiments=True, output_format="list"))
    done = mlflow_run("epochs=abc")
    assert done.returncode != 0
    assert "error: main: epochs must be a whole number >= 1, got 'abc'" in done.stderr
    parent = parents()[-1]
    assert parent.info.status == "FAILED" and children(parent.info.run_id) == {}
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == n_runs + 1
    # without --experiment-name it lands in Default, which gets the kind too (before the parameter check)
    default = MlflowClient().get_experiment(parent.info.experiment_id)
    assert default.name == "Default" and default.tags[C.EXPERIMENT_KIND_TAG] == C.EXPERIMENT_KIND


def test_promote_entry_point_moves_champion_on_both_flavors(store):
    args = [MLFLOW, "run", str(PROJECT_DIR), "--env-manager", "local", "-e", "promote", "-P", "model_name=e2e"]
    done = subprocess.run(args, capture_output=True, text=True, env=runs_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    client = MlflowClient()
    pt = client.get_model_version_by_alias("e2e", "champion")
    onnx_v = client.get_model_version_by_alias("e2e-onnx", "champion")
    assert pt.tags["train_run_id"] == onnx_v.tags["train_run_id"]
    assert pt.tags["promotion"].startswith("promoted: no champion yet")


# --- the MLflow UI in a real browser -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = PROJECT_DIR / "test-artifacts"


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory):
    port = free_port()
    home = tmp_path_factory.mktemp("ui")
    server = subprocess.Popen([MLFLOW, "ui", "--backend-store-uri", mlflow.get_tracking_uri(), "--host", "127.0.0.1",
                               "--port", str(port)], cwd=home, env=runs_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=1).read() == b"OK":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow ui did not answer /health within 60 s")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def browse(url: str, tmp_path, screenshot: Path | None = None) -> str:
    """The page's DOM after its scripts ran, from headless Chromium; optionally a screenshot too."""
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=20000", "--window-size=1400,1000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    if screenshot:
        subprocess.run([*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
    return dom


def visible_text(dom: str) -> str:
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


NEEDS_CHROMIUM = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                    "`make test-browser` installs it and runs this test")


@pytest.mark.browser
@NEEDS_CHROMIUM
def test_mlflow_ui_opens_the_experiment_on_its_runs_table(store, ui, tmp_path):
    (parent,) = [p for p in parents() if p.info.status == "FINISHED"]
    printed = store.stdout.split("then open http://127.0.0.1:5000/")[1].split()[0]  # the address main printed
    page = visible_text(browse(f"{ui}/{printed}", tmp_path))  # no screenshot: each is one more Chromium start
    assert parent.info.run_name in page, page[:2000]  # the runs table lists the parent run by its name
    assert "No data available" not in page and "Token Usage" not in page  # not the GenAI traces overview


@pytest.mark.browser
@NEEDS_CHROMIUM
def test_mlflow_ui_shows_nested_steps_metrics_and_images(ui, tmp_path):
    (parent,) = [p for p in parents() if p.info.status == "FINISHED"]
    steps = children(parent.info.run_id)
    SCREENSHOTS.mkdir(exist_ok=True)
    shot = SCREENSHOTS / "mlflow-ui-parent-run.png"
    page = visible_text(browse(f"{ui}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}",
                               tmp_path, shot))
    child_list = re.search(r"Child runs ((?:\w+ ?,? ?){4})", page)
    assert child_list, page[:2000]
    assert set(re.findall(r"\w+", child_list.group(1))) == {"ingest", "train", "evaluate", "export"}
    assert f"test_accuracy {parent.data.metrics['test_accuracy']:.3f}".rstrip("0") in page
    assert shot.is_file() and shot.read_bytes().startswith(b"\x89PNG")

    evaluate = steps["evaluate"]
    dom = browse(f"{ui}/#/experiments/{evaluate.info.experiment_id}/runs/{evaluate.info.run_id}"
                 "/artifacts/confusion_matrix.png", tmp_path, SCREENSHOTS / "mlflow-ui-confusion-matrix.png")
    assert re.search(r'<img alt="confusion_matrix\.png" src="blob:', dom), "the UI did not load the image"
