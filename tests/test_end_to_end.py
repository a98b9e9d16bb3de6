"""The recipe through the real `mlflow run` CLI, as a user runs it. Slow: each step is a process."""

import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cifar10_cnn import constants as C
from cifar10_cnn import registry
from tests.conftest import MLFLOW, PROJECT_DIR, children, free_port, isolate, runs_env, snapshot, step_runs

pytestmark = pytest.mark.slow

EXPERIMENT = "cifar10-cnn"  # as `make run` names it
COMMON = ["expected_records=any", "epochs=1", "model_name=e2e"]


def mlflow_run(*params: str, project: Path = PROJECT_DIR, experiment: str | None = None, log: Path | None = None,
               entry_point: str = "main"):
    """`mlflow run` as a user types it: started (a Popen writing to `log`) when a log is given, else run to its end."""
    args = [MLFLOW, "run", str(project), "-e", entry_point, "--env-manager", "local",
            *(a for p in params for a in ("-P", p))]
    if experiment:
        args += ["--experiment-name", experiment]
    if log is None:
        return subprocess.run(args, capture_output=True, text=True, env=runs_env(), timeout=600)
    with log.open("w") as out:
        return subprocess.Popen(args, env=runs_env(), stdout=out, stderr=subprocess.STDOUT, text=True)


def parents() -> list:
    return step_runs("main")


TUNE = ["expected_records=200,100", "recipe=seed", "trials=2", "workers=2", "budget_minutes=5", "validation=50",
        "study=e2e-study", "model_name=e2e", "reuse=false"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, archive):
    """Two users at the same moment on one new SQLite store, from a clean git snapshot of the project (a
    known code version, so later runs can reuse steps), in the experiment `make run` uses: one runs the
    recipe, the other a search (`-e tune`, two trial processes) whose winner goes through the same steps and
    registers under the same name. (The search reads the archive with other ingest parameters, so a later
    rerun of the recipe can reuse the recipe's own ingest.)"""
    root = tmp_path_factory.mktemp("e2e")
    checkout = snapshot(root / "project")
    with pytest.MonkeyPatch.context() as mp:
        isolate(root, mp)
        logs = [root / "recipe.log", root / "tune.log"]
        recipe = mlflow_run(f"data={archive}", *COMMON, "seed=1", "reuse=false", project=checkout,
                            experiment=EXPERIMENT, log=logs[0])
        while mlflow.get_experiment_by_name(EXPERIMENT) is None and recipe.poll() is None:  # made by the first
            time.sleep(0.2)
        tune = mlflow_run(f"data={archive}", *TUNE, project=checkout, experiment=EXPERIMENT, log=logs[1],
                          entry_point="tune")
        for process, log in zip((recipe, tune), logs, strict=True):
            assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
        yield {"stdout": [log.read_text() for log in logs], "checkout": checkout, "archive": archive}


def test_the_recipe_is_one_parent_with_four_nested_steps(store):
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
    assert parent.info.run_name == "seed · simple_cnn · 1 epoch"
    experiment = MlflowClient().get_experiment(parent.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.tags[C.EXPERIMENT_KIND_TAG] == C.EXPERIMENT_KIND == "custom_model_development"
    assert not any("database is locked" in out for out in store["stdout"])


def test_two_pipelines_at_once_register_a_version_each(store):
    client = MlflowClient()
    (tune_run,) = step_runs("tune")
    pipelines = {children(r.info.run_id)["train"].info.run_id: r for r in (*parents(), tune_run)}
    for name in ("e2e", "e2e-onnx"):
        versions = client.search_model_versions(f"name = '{name}'")
        assert sorted(int(v.version) for v in versions) == [1, 2]
        assert {v.tags["train_run_id"] for v in versions} == set(pipelines)  # one each, nothing shared or lost
        for v in versions:
            assert v.tags["pipeline_run_id"] == pipelines[v.tags["train_run_id"]].info.run_id
    for run in pipelines.values():
        assert children(run.info.run_id)["export"].data.metrics["onnx_argmax_mismatches"] == 0
    # The two exports took the registry lock in turn: @candidate of every model is on one run's set.
    head = client.get_model_version_by_alias("e2e", C.CANDIDATE_ALIAS)
    for name, tag in registry.Names("e2e").twins():
        if tag in head.tags:
            twin = client.get_model_version_by_alias(name, C.CANDIDATE_ALIAS)
            assert str(twin.version) == head.tags[tag] and twin.tags["train_run_id"] == head.tags["train_run_id"]


def test_summary_names_accuracy_runs_and_versions(store):
    client = MlflowClient()
    for out in store["stdout"][:1]:
        assert "CIFAR-10 CNN pipeline finished" in out
        parent = mlflow.get_run(out.split("parent run    : ")[1].split()[0])
        acc = parent.data.metrics["test_accuracy"]
        assert f"test accuracy : {acc:.2%}" in out
        registered = re.search(r"registered    : e2e v(\d+).*, e2e-onnx v(\d+)", out)
        for name, version in zip(("e2e", "e2e-onnx"), registered.groups(), strict=True):
            assert client.get_model_version(name, version).tags["pipeline_run_id"] == parent.info.run_id
        assert "mlflow ui --app-name cifar10-cnn --backend-store-uri sqlite:///" in out
        page = f"#/experiments/{parent.info.experiment_id}/runs?workflowType=machine_learning"
        assert f"then open http://127.0.0.1:5000/{page}" in out
        assert out.split("=" * 80)[2].strip() in parent.data.tags["mlflow.note.content"]  # the run's description
        onnx_path = out.split("ONNX model    : ")[1].split()[0]
        assert Path(onnx_path).is_file() and onnx_path.endswith(".onnx")


def test_the_same_recipe_again_reuses_every_step(store, tmp_path):
    (first,) = parents()
    again = mlflow_run(f"data={store['archive']}", *COMMON, "seed=1", project=store["checkout"], experiment=EXPERIMENT)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = parents()[-1]
    assert rerun.data.tags[C.TAG_REUSED] == "ingest,train,evaluate,export"
    for step in ("ingest", "train", "evaluate", "export"):
        assert rerun.data.tags[f"cifar10.{step}_run_id"] == first.data.tags[f"cifar10.{step}_run_id"]
        assert f"step {step}: reusing FINISHED run {first.data.tags[f'cifar10.{step}_run_id']}" in again.stdout
    assert rerun.data.metrics["test_accuracy"] == first.data.metrics["test_accuracy"]
    assert len(MlflowClient().search_model_versions("name = 'e2e'")) == 2  # nothing registered again


def test_two_promotions_at_once_leave_one_champion_in_both_flavors(store):
    promotions = [subprocess.Popen([MLFLOW, "run", str(PROJECT_DIR), "--env-manager", "local", "-e", "promote",
                                    "-P", "model_name=e2e", "-P", f"version={v}"], env=runs_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for v in (1, 2)]
    results = [p.wait(timeout=300) for p in promotions]
    assert 0 in results  # whoever came first promoted; the other promoted too or was refused by the gate
    client = MlflowClient()
    champion = client.get_model_version_by_alias("e2e", "champion")
    onnx_champion = client.get_model_version_by_alias("e2e-onnx", "champion")
    assert champion.tags["train_run_id"] == onnx_champion.tags["train_run_id"]  # the flavors never mix
    first_promoted = [v for v in client.search_model_versions("name = 'e2e'")
                      if v.tags.get("promotion", "").startswith("promoted: no champion yet")]
    assert len(first_promoted) == 1
    if results == [0, 0]:  # both promoted, one after the other: the loser of the race is now @previous
        previous = client.get_model_version_by_alias("e2e", "previous")
        assert {str(champion.version), str(previous.version)} == {"1", "2"}


def test_tune_searches_on_held_out_images_and_registers_its_winner(store):
    """The fixture's search (two trial processes): a study run under the tune run, its trials under the
    study, and the best trial's parameters trained on every image and registered @candidate."""
    client = MlflowClient()
    (tune_run,) = step_runs("tune")
    assert tune_run.info.status == "FINISHED" and tune_run.info.run_name == "tune · e2e-study"
    nested = children(tune_run.info.run_id)
    study_run = next(r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
                     if r.info.run_name == "e2e-study")
    assert study_run.data.tags[C.TAG_PARENT_RUN] == tune_run.info.run_id
    assert {"train", "evaluate", "export"} <= set(nested)
    trials = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.`{C.TAG_PARENT_RUN}` = '{study_run.info.run_id}'")
    assert sorted(int(t.data.tags["numbers"]) for t in trials) == [0, 1]  # two in all (one per process), none twice
    assert all(not any(k.startswith("test") for k in t.data.metrics) for t in trials)  # never the test images
    best = mlflow.artifacts.load_dict(f"runs:/{tune_run.info.run_id}/best.json")
    train_run = nested["train"]
    assert train_run.data.params["validation"] == "0" and train_run.data.params["train_records"] == "200"
    for name, value in best["params"].items():  # the winner is trained with the best trial's parameters
        assert float(train_run.data.params[name]) == pytest.approx(float(value)), name
    (version,) = [v for v in client.search_model_versions("name = 'e2e-onnx'") if "study" in v.tags]
    assert version.tags["train_run_id"] == train_run.info.run_id and version.tags["study"] == "e2e-study"
    card = client.get_model_version("e2e-onnx", version.version).description
    assert f"Tuned: the parameters of trial {best['trial']} of study `e2e-study`" in card
    artifacts = {a.path for a in client.list_artifacts(tune_run.info.run_id)}
    assert {"optimization_history.png", "parallel_coordinate.png", "trials.csv", "best.json"} <= artifacts
    assert f"Best: trial {best['trial']}" in tune_run.data.tags["mlflow.note.content"]
    assert "test_accuracy" in tune_run.data.metrics and "test_accuracy" not in study_run.data.metrics


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


# --- the MLflow UI in a real browser -----------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOTS = PROJECT_DIR / "test-artifacts"


@pytest.fixture(scope="module")
def ui(store, tmp_path_factory):
    port = free_port()
    home = tmp_path_factory.mktemp("ui")
    server = subprocess.Popen([MLFLOW, "ui", "--app-name", "cifar10-cnn", "--backend-store-uri",
                               mlflow.get_tracking_uri(), "--host", "127.0.0.1", "--port", str(port)], cwd=home,
                              env=runs_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    parent = parents()[0]
    printed = store["stdout"][0].split("then open http://127.0.0.1:5000/")[1].split()[0]  # the address main printed
    page = visible_text(browse(f"{ui}/{printed}", tmp_path))  # no screenshot: each is one more Chromium start
    assert parent.info.run_name in page, page[:2000]  # the runs table lists the parent run by its name
    assert "No data available" not in page and "Token Usage" not in page  # not the GenAI traces overview


@pytest.mark.browser
@NEEDS_CHROMIUM
def test_a_newcomer_clicks_the_experiment_on_the_home_page_and_lands_on_its_runs(store, ui, tmp_path):
    """A fresh browser, as a newcomer's: the home page links the experiment by its plain address, and that
    address opens the runs table (`mlflow ui --app-name cifar10-cnn`; plain `mlflow ui` opens an empty GenAI
    overview there, whatever the experiment's tags say: cifar10_cnn/ui.py)."""
    experiment_id = MlflowClient().get_experiment_by_name(EXPERIMENT).experiment_id
    home = browse(f"{ui}/", tmp_path)
    assert re.search(rf'href="[^"]*#/experiments/{experiment_id}"', home), visible_text(home)[:2000]
    page = visible_text(browse(f"{ui}/#/experiments/{experiment_id}", tmp_path))  # the same browser, clicked
    assert parents()[0].info.run_name in page, page[:2000]
    assert "No data available" not in page and "Token Usage" not in page


@pytest.mark.browser
@NEEDS_CHROMIUM
def test_mlflow_ui_shows_nested_steps_metrics_and_images(ui, tmp_path):
    parent = parents()[0]
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
                 "/artifacts/confusion_matrix.png", tmp_path)
    assert re.search(r'<img alt="confusion_matrix\.png" src="blob:', dom), "the UI did not load the image"
