"""The hyperparameter search below the tune step: spaces, the checks before any trial, and the trial loop on a
real study in the tracking store (trials nested under the study, pruning, a diverging trial, resuming)."""

import signal
import socket
import subprocess
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from cifar10_cnn import constants as C
from cifar10_cnn import heartbeat, recipes, search, studies
from cifar10_cnn.errors import UserError
from steps import ingest, tune
from tests.conftest import fails, only_run


def test_spaces_parse_into_checked_dimensions():
    space = search.parse_space("filter_lr=0.02:0.2:log, momentum=0.6:0.95,batch_size=256|512|1024,augment=true|false")
    assert space["filter_lr"] == search.Dimension("filter_lr", 0.02, 0.2, log=True)
    assert space["momentum"] == search.Dimension("momentum", 0.6, 0.95)
    assert space["batch_size"].choices == (256, 512, 1024) and space["augment"].choices == (True, False)
    assert isinstance(search.parse_space("epochs=3:6")["epochs"].low, int)  # an int field: integers
    for recipe in recipes.RECIPES:  # every recipe's own space is valid
        assert search.default_space(recipe)


@pytest.mark.parametrize("text, message", [
    ("warmup=0:1", "space: 'warmup' is not a training parameter"),
    ("optimizer=0:1", "space: optimizer is not a number; give it choices (a|b), not the range '0:1'"),
    ("momentum=0.9:0.5", "space: momentum=0.9:0.5 is an empty range"),
    ("momentum=0.5:1.2", "momentum must be a number in [0, 1), got '1.2'"),  # the field's own check
    ("batch_size=256|0", "batch_size must be a whole number >= 1, got '0'"),  # a choice the field refuses
    ("weight_decay=0:0.01:log", "cannot be searched on a log scale from 0.0"),
    ("epochs=3:6:linear", "is not low:high or low:high:log"),
    ("epochs", "is not name=low:high[:log] or name=a|b|c"),
    ("lr_schedule=cosine", "offers no choice"),
    ("epochs=3:6,epochs=2:4", "space names 'epochs' twice"),
    ("", "space must name at least one training parameter"),
])
def test_a_bad_space_is_named(text, message):
    with pytest.raises(UserError) as err:
        search.parse_space(text)
    assert message in str(err.value)


RAW = {"recipe": "seed", "trials": "4", "budget_minutes": "5", "space": "auto", "study": "s", "workers": "1",
       "validation": "50", "search_seed": "0", "data": "auto", "expected_records": "any", "device": "cpu",
       "model_name": "m", "int8": "true", "reuse": "true"}


@pytest.mark.parametrize("bad, message", [
    ({"trials": "0"}, "trials must be a whole number >= 1, got '0'"),
    ({"budget_minutes": "0"}, "budget_minutes must be a finite number > 0, got '0'"),
    ({"workers": "0"}, "workers must be a whole number >= 1, got '0'"),
    ({"validation": "55"}, "validation must be a multiple of 10"),
    ({"recipe": "slow"}, "recipe must be one of seed, fast, fast94"),
    ({"study": "it's"}, "study must be 1-100 characters without quotes"),
    ({"space": "validation=0|100"}, "space: validation cannot be searched"),
    ({"space": "epochs=1:3,warmup_epochs=0:5"}, "space: at epochs=1, warmup_epochs=5.0 the recipe is invalid"),
])
def test_tune_checks_everything_before_any_trial(bad, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tune.check({**RAW, **bad})
    assert tune.check(RAW)["space"] == search.default_space("seed")


def test_a_bad_space_fails_the_tune_run_before_any_trial(store, capsys):
    fails(tune, [f"--{k.replace('_', '-')}={v}" for k, v in {**RAW, "space": "momentum=2:3"}.items()], capsys,
          "momentum must be a number in [0, 1), got '2'")
    assert only_run("tune").info.status == "FAILED"
    assert len(mlflow.search_runs(search_all_experiments=True, output_format="list")) == 1  # no study, no trial


@pytest.fixture
def job(store, archive):
    """A tune run (as `mlflow run` would make it) with an ingest run of the small archive, and the search's job."""
    ingest.main(["--data", str(archive), "--expected-records", "any"])
    client = MlflowClient()
    tune_run = client.create_run("0", tags={C.TAG_STEP: "tune"}).info.run_id
    return {"ingest_run_id": only_run("ingest").info.run_id, "recipe": "seed", "study": "unit",
            "space": "learning_rate=0.0000001:1000000000:log,epochs=2:3", "space_key": "the space",
            "data_sha256": "the data", "tune_run_id": tune_run,
            "experiment_id": "0", "trials": 5, "deadline": float("inf"), "validation": 50, "seed": 0,
            "device": "cpu", "workers": 1}


def opened(job) -> studies.Opened:
    return tune.open_study(job, worker=0)


def ended_pid() -> int:
    """The id of a process that has ended (what a SIGKILLed one leaves)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_trials_are_runs_under_the_study_with_their_curves_and_no_test_metric(job):
    study = opened(job).study
    # two good trials, then a hopeless one (pruned) and a diverging one (failed); the search goes on past both
    for count, learning_rates in ((2, (3e-3, 2e-3)), (3, (1e-7,)), (4, (1e9,))):
        for learning_rate in learning_rates:
            study.enqueue_trial({"learning_rate": learning_rate, "epochs": 3})
        search.work(study, {**job, "trials": count}, worker=0)
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED", "FAIL"]
    assert len(trials[2].intermediate_values) == search.PRUNE_FROM_EPOCH  # stopped at the first epoch it could
    client = MlflowClient()
    study_run = client.get_run(trials[0]._trial_id).data.tags[C.TAG_PARENT_RUN]
    assert client.get_run(study_run).data.tags[C.TAG_PARENT_RUN] == job["tune_run_id"]  # study under the tune run
    for t in trials:
        run = client.get_run(t._trial_id)
        assert run.data.tags[C.TAG_PARENT_RUN] == study_run and run.info.run_name == f"trial {t.number}"
        assert not any(k.startswith("test") for k in run.data.metrics), run.data.metrics  # never the test images
        assert run.data.params["validation"] == "50" and float(run.data.params["learning_rate"]) == t.params[
            "learning_rate"]
    curve = client.get_metric_history(trials[0]._trial_id, "val_accuracy")
    assert [m.step for m in curve] == [1, 2, 3] and curve[-1].value == trials[0].value
    assert "diverged" in client.get_run(trials[3]._trial_id).data.tags[C.TAG_TRIAL_FAILED]
    assert search.best(study).number in (0, 1)


def test_a_search_stops_at_its_trials_and_a_stopped_one_resumes(job, monkeypatch):
    study = opened(job).study
    real, calls = search.run_trial, []

    def interrupted_second(trial, *args):  # the second trial is interrupted (Ctrl-C, SIGTERM) mid-training
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(trial, *args)

    monkeypatch.setattr(search, "run_trial", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        search.work(study, {**job, "trials": 3}, worker=0)
    assert sorted(t.state.name for t in study.get_trials()) == ["COMPLETE", "FAIL"]  # never left RUNNING
    MlflowClient().set_terminated(job["tune_run_id"], "KILLED")  # the tune run that owned it ended too
    killed = studies.ask(study)  # and a trial whose process was SIGKILLed: RUNNING for good
    MlflowClient().set_tag(killed._trial_id, studies.TAG_TRIAL_PROCESS, f"{socket.gethostname()}:{ended_pid()}")
    resumed_by = MlflowClient().create_run("0", tags={C.TAG_STEP: "tune"}).info.run_id
    again = opened({**job, "tune_run_id": resumed_by})
    assert again.role == "resumer" and again.stale == 1
    search.work(again.study, {**job, "trials": 4}, worker=0)
    states = sorted(t.state.name for t in again.study.get_trials())
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]  # the finished trial kept, 4 trials in all
    proposed = [t.params for t in again.study.get_trials() if t.params]
    assert len({tuple(sorted(p.items())) for p in proposed}) == len(proposed)  # the resumer replays nothing
    study_run = MlflowClient().get_run(again.study_run_id)
    assert study_run.data.tags[studies.TAG_OWNER_RUN] == resumed_by
    # a third run while this one owns the study (alive) only joins it
    assert opened({**job, "tune_run_id": MlflowClient().create_run("0").info.run_id}).role == "worker"


def test_the_description_says_when_the_budget_cut_the_trials():
    assert search.budget_note(4, 4, 5) == ""
    note = search.budget_note(2, 20, 60)
    assert "60-minute budget fitted 2 of the 20 trials" in note and "budget_minutes" in note


def test_every_trial_is_scored_on_the_same_held_out_images(job, monkeypatch):
    from types import SimpleNamespace

    from cifar10_cnn import training

    seen = []

    def scored(model, images, labels, config, device, on_epoch, held_out):  # no training: what it was given
        seen.append((config.seed, held_out[0].sum().item(), len(images) + len(held_out[0])))
        return [SimpleNamespace(val_accuracy=0.5)]

    monkeypatch.setattr(training, "train", scored)
    study = opened({**job, "space": "seed=1|2"}).study
    for seed in (1, 2):
        study.enqueue_trial({"seed": seed})
    search.work(study, {**job, "space": "seed=1|2", "trials": 2}, worker=0)
    # a searched seed changes the trial's initialisation, not which training images it is scored on
    assert sorted(s for s, _, _ in seen) == [1, 2] and seen[0][1:] == seen[1][1:]


def test_a_study_counts_its_trials_and_stops_when_its_owner_is_done_asking(job, monkeypatch):
    monkeypatch.setattr(search, "run_trial", lambda trial, *args: 0.5)
    study = opened(job).study
    study.tell(study.ask(), 0.4)
    studies.delete_trial(study, study.ask())  # one too many (another worker's): its number stays taken
    search.work(study, {**job, "trials": 2}, worker=0)
    assert sorted(t.number for t in study.get_trials()) == [0, 2]  # two trials, though numbered 0 and 2
    studies.take_no_new_trials(study, "the owner's budget is spent")  # it only waits: no worker asks for more
    search.work(study, {**job, "trials": 5}, worker=0)
    assert len(study.get_trials()) == 2
    MlflowClient().set_terminated(job["tune_run_id"], "KILLED")  # the owner died; a resumer opens it again
    again = opened({**job, "tune_run_id": MlflowClient().create_run("0").info.run_id})
    assert again.role == "resumer" and studies.is_open(again.study)
    assert search.sampler(2**32 - 1, 4, worker=1, before=3)  # seeds past numpy's range wrap instead of failing


def test_joining_a_study_takes_the_settings_it_was_made_with(job):
    owner = opened(job)
    for changed, message in [({"recipe": "fast"}, "was made with recipe=seed; this run has recipe=fast"),
                             ({"space_key": "epochs=2:4"}, "was made with space=the space"),
                             ({"validation": 100}, "was made with validation=50; this run has validation=100"),
                             ({"data_sha256": "other data"}, "was made with data_sha256=the data")]:
        joiner = MlflowClient().create_run("0").info.run_id
        with pytest.raises(UserError, match=message):
            opened({**job, **changed, "tune_run_id": joiner})
    assert opened({**job, "trials": 9, "tune_run_id": MlflowClient().create_run("0").info.run_id}).study_run_id == \
        owner.study_run_id  # more trials, another budget: the same study


def slow_worker(job):  # a worker process of the test below: never stops by itself within the test
    import time
    from pathlib import Path

    Path(job["started"]).touch()
    time.sleep(30)
    Path(job["finished"]).touch()


def test_when_the_search_stops_its_worker_processes_stop_too(job, tmp_path, monkeypatch):
    import time

    started, finished = tmp_path / "started", tmp_path / "finished"

    def interrupted(study, job, worker, dataset=None):  # Ctrl-C in this process, the other one mid-trial
        for _ in range(600):
            if started.exists():
                raise KeyboardInterrupt
            time.sleep(0.05)
        raise AssertionError("the worker process never started")

    monkeypatch.setattr(tune, "work", slow_worker)
    monkeypatch.setattr(search, "work", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune.search_with_workers(studies.Opened(None, "study run", "owner"),
                                 {**job, "workers": 2, "started": str(started), "finished": str(finished)}, None)
    assert not finished.exists()  # stopped, not waited for


def test_a_lost_process_is_told_by_its_heartbeat(job, monkeypatch):
    """A worker machine that died mid-trial does not keep the owner waiting for good, a live one is waited
    for, and a study whose owner's machine died can be taken over from another machine."""
    client = MlflowClient()
    owner = opened(job)
    silent, beating = studies.ask(owner.study), studies.ask(owner.study)
    long_ago = f"{time.time() - heartbeat.STALE_S - 1:.0f}"
    for trial, beat in ((silent, long_ago), (beating, f"{time.time():.0f}")):
        client.set_tag(trial._trial_id, studies.TAG_TRIAL_PROCESS, "another-machine:42")
        client.set_tag(trial._trial_id, studies.TAG_TRIAL_HEARTBEAT, beat)
    assert heartbeat.lost(client.get_run(beating._trial_id), studies.TAG_TRIAL_PROCESS, studies.TAG_TRIAL_HEARTBEAT,
                        since=0) is None  # a live one is waited for
    owner.study.tell(beating, 0.5)
    previous = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the owner waits for a lost trial"))
    signal.alarm(30)
    try:
        trials = studies.wait_for_trials(owner.study, poll_s=0.01)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert {t.number: t.state.name for t in trials} == {silent.number: "FAIL", beating.number: "COMPLETE"}
    assert client.get_run(silent._trial_id).data.tags[C.TAG_TRIAL_FAILED].startswith(
        "lost: no heartbeat from another-machine:42 for ")

    # the owner's machine: alive while its tune run beats, taken over once it has been silent for STALE_S
    client.set_tag(job["tune_run_id"], C.TAG_PROCESS, "another-machine:7")
    client.set_tag(job["tune_run_id"], C.TAG_HEARTBEAT, f"{time.time():.0f}")
    assert opened({**job, "tune_run_id": client.create_run("0").info.run_id}).role == "worker"
    client.set_tag(job["tune_run_id"], C.TAG_HEARTBEAT, long_ago)
    taker = client.create_run("0").info.run_id
    resumer = opened({**job, "tune_run_id": taker})
    assert resumer.role == "resumer"
    assert client.get_run(owner.study_run_id).data.tags[studies.TAG_OWNER_RUN] == taker
    # the silent owner, should it wake, no longer owns the study (tune checks before closing it or training)
    assert not studies.owns(owner.study_run_id, job["tune_run_id"])


def test_a_trial_is_failed_as_lost_only_while_it_runs_and_its_process_is_gone(job):
    client, study = MlflowClient(), opened(job).study
    done, elsewhere = studies.ask(study), studies.ask(study)
    client.set_tag(done._trial_id, studies.TAG_TRIAL_PROCESS, f"{socket.gethostname()}:{ended_pid()}")
    # the same hostname, another pid namespace (a container): its process ids say nothing here
    client.set_tag(elsewhere._trial_id, studies.TAG_TRIAL_PROCESS, f"{socket.gethostname()}:{ended_pid()}/other")
    listed = study.get_trials()
    study.tell(done, 0.7)  # it finished after the owner listed it RUNNING: its result stands
    assert studies.fail_lost(study, listed) == 0
    assert {t.number: t.state.name for t in study.get_trials()} == {done.number: "COMPLETE",
                                                                    elsewhere.number: "RUNNING"}


def test_a_trial_beats_while_it_trains_and_a_late_result_stands_down(job, monkeypatch):
    monkeypatch.setattr(heartbeat, "BEAT_S", 0.02)
    study, client, beats = opened(job).study, MlflowClient(), []

    def trains(trial, *args):  # meanwhile the owner, hearing nothing (a cut-off link), marks the trial FAILED
        for _ in range(500):
            beats.append(client.get_run(trial._trial_id).data.tags[studies.TAG_TRIAL_HEARTBEAT])
            if len(set(beats)) > 1:
                break
            time.sleep(0.01)
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        return 0.9

    monkeypatch.setattr(search, "run_trial", trains)
    search.work(study, {**job, "trials": 1}, worker=0)  # its late value is dropped, not raised
    assert len(set(beats)) > 1  # the heartbeat moved on while the trial ran
    assert [t.state.name for t in study.get_trials()] == ["FAIL"]
