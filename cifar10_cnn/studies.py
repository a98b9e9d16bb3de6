"""An Optuna study kept in the tracking store (MLflow's `mlflow.optuna.storage.MlflowStorage`): the study is a
run, each trial a run nested under it, so a study outlives the process that made it, resumes, and takes
workers from any process or machine that reaches the same tracking store.

Here the study run is itself nested under the tune run that created it. The tune run that owns the study
trains its winner; a tune run started with the same study name while the owner is alive joins as a worker
(trials only); one started after the owner died (Ctrl-C, SIGTERM, SIGKILL, a lost machine) resumes: the
trials the dead process left RUNNING are marked FAILED, the finished ones are kept, and it takes over.
Joining or resuming takes the settings the study was made with (recipe, space, held-out images).

A process tells a live owner or trial from a lost one by its heartbeat (heartbeat.py): the owner's tune run
beats as every step run does, and every trial's process beats on the trial's run, so a worker machine that
dies mid-trial does not keep the owner waiting for good, and a study whose owner's machine died can be
resumed from another machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from . import constants as C
from . import heartbeat
from .errors import UserError

DIRECTION = "maximize"  # the held-out accuracy
TAG_OWNER_RUN = "cifar10.study.owner_run_id"  # study run: the tune run that trains the winner
TAG_OWNER_PROCESS = "cifar10.study.owner_process"  # study run: 'host:pid' of its owner (earlier versions only)
TAG_SETTINGS = "cifar10.study.settings"  # study run: what makes its trials comparable (JSON), set by its maker
TAG_DELETED_TRIAL = "cifar10.study.deleted_trial."  # study run: + number, a trial asked for beyond `trials`
TAG_NO_NEW_TRIALS = "cifar10.study.no_new_trials"  # study run: its owner is done asking (its budget or trials)
TAG_TRIAL_PROCESS = "cifar10.trial.process"  # trial run: 'host:pid' of the process that runs it
TAG_TRIAL_HEARTBEAT = "cifar10.trial.heartbeat"  # trial run: when that process last beat (Unix seconds)


@dataclass(frozen=True)
class Opened:
    study: object  # optuna.Study
    study_run_id: str
    role: str  # "owner" (made it), "resumer" (took over from a dead owner) or "worker"
    stale: int = 0  # trials a dead owner left RUNNING, now FAILED


def storage(experiment_id: str):
    from mlflow.optuna.storage import MlflowStorage

    return MlflowStorage(experiment_id=experiment_id, batch_flush_interval=0.5)


def owner_alive(study_run) -> bool:
    """Whether the tune run that owns the study still works on it: RUNNING (a SIGKILLed or lost run stays
    RUNNING, so also) with its process alive by the tune run's own heartbeat. An owner of an earlier
    version, which did not beat, is alive while RUNNING, on this machine while its process id is."""
    owner = study_run.data.tags.get(TAG_OWNER_RUN)
    if not owner:
        return False
    owner_run = mlflow.get_run(owner)
    if owner_run.info.status != "RUNNING":
        return False
    if C.TAG_PROCESS not in owner_run.data.tags:  # an earlier version's owner
        return heartbeat.lost(study_run, TAG_OWNER_PROCESS, C.TAG_HEARTBEAT, since=None) is None
    return heartbeat.lost(owner_run, C.TAG_PROCESS, C.TAG_HEARTBEAT, since=None) is None


def owns(study_run_id: str, tune_run_id: str) -> bool:
    """Whether `tune_run_id` still owns the study: another run takes it over once this one has been silent
    for heartbeat.STALE_S (a machine that slept or was cut off), and then trains the winner itself."""
    return mlflow.MlflowClient().get_run(study_run_id).data.tags.get(TAG_OWNER_RUN) == tune_run_id


def fail_lost(study, trials: list) -> int:
    """Mark FAILED each of `trials` still RUNNING (read again: it may have ended since the list was made)
    whose process is lost (see `lost`), tagging why; how many."""
    import optuna

    client, failed = mlflow.MlflowClient(), 0
    for trial in trials:
        if trial.state != optuna.trial.TrialState.RUNNING:
            continue
        run = client.get_run(trial._trial_id)
        if run.info.status != "RUNNING":
            continue
        if why := heartbeat.lost(run, TAG_TRIAL_PROCESS, TAG_TRIAL_HEARTBEAT, since=run.info.start_time / 1000):
            client.set_tag(trial._trial_id, C.TAG_TRIAL_FAILED, f"lost: {why}")
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            failed += 1
    return failed


def open_study(name: str, tune_run_id: str, experiment_id: str, sampler_for, pruner, settings: dict) -> Opened:
    """The study `name` of this experiment, made (nested under `tune_run_id`), joined or resumed.
    `sampler_for(n)` makes the sampler given the n trials the study already holds: a process that joins or
    resumes must not replay the proposals the first one drew from the same seed. `settings` (recipe, space,
    held-out images) must be those the study was made with: its trials are ranked against each other, and
    the winner's parameters are applied to that recipe."""
    import json

    import optuna

    client = mlflow.MlflowClient()
    store = storage(experiment_id)
    existing = store.get_study_id_by_name_if_exists(name)
    if existing is None:
        study = optuna.create_study(study_name=name, storage=store, direction=DIRECTION, sampler=sampler_for(0),
                                    pruner=pruner)
        study_run_id = study._study_id
        client.set_tag(study_run_id, C.TAG_PARENT_RUN, tune_run_id)
        client.set_tag(study_run_id, TAG_SETTINGS, json.dumps(settings, sort_keys=True))
        _own(client, study_run_id, tune_run_id)
        return Opened(study, study_run_id, "owner")
    study_run = client.get_run(existing)
    if study_run.data.tags.get("optuna.study_direction", "").lower() != DIRECTION:
        raise UserError(f"study {name!r}: run {existing} of this experiment has that name but is not a study "
                        "this pipeline made; choose another study name")
    made_with = json.loads(study_run.data.tags.get(TAG_SETTINGS, "null")) or settings  # older studies: unknown
    if differ := [k for k in sorted(set(made_with) | set(settings)) if made_with.get(k) != settings.get(k)]:
        raise UserError(f"study {name!r} was made with " + ", ".join(f"{k}={made_with.get(k)}" for k in differ)
                        + "; this run has " + ", ".join(f"{k}={settings.get(k)}" for k in differ)
                        + ": give the same -P values to resume or join it, or another -P study")
    before = len(store.get_all_trials(existing, deepcopy=False))
    study = optuna.load_study(study_name=name, storage=store, sampler=sampler_for(before), pruner=pruner)
    if owner_alive(study_run):
        return Opened(study, existing, "worker")
    # the dead owner's trials; a live worker's keep running, and are waited for
    stale = fail_lost(study, study.get_trials(deepcopy=False))
    _own(client, existing, tune_run_id)
    if study_run.info.status != "RUNNING":  # its owner failed (or chose a winner): open again
        client.update_run(existing, status="RUNNING")
    if TAG_NO_NEW_TRIALS in study_run.data.tags:
        client.delete_tag(existing, TAG_NO_NEW_TRIALS)
    return Opened(study, existing, "resumer", stale)


def _open(study_run) -> bool:
    return study_run.info.status == "RUNNING" and TAG_NO_NEW_TRIALS not in study_run.data.tags


def is_open(study) -> bool:
    """Whether the study still takes trials: not once its owner is done asking (its budget or its trials
    are spent: a worker that joined later must not keep the owner waiting), nor once its run has ended."""
    return _open(mlflow.MlflowClient().get_run(study._study_id))


def take_no_new_trials(study, why: str) -> None:
    """The owner is done asking: workers of other processes finish their trial and stop."""
    mlflow.MlflowClient().set_tag(study._study_id, TAG_NO_NEW_TRIALS, why)


def trials_before(study, trial) -> int | None:
    """How many trials the study held before `trial`, deleted ones not counted, or None when the study
    has closed meanwhile. From the trial's number (MLflow's storage writes what numbers a trial at once)
    less the numbers deleted before it; not by listing trials, whose runs the storage tags as the study's
    only when it next flushes, up to half a second later."""
    study_run = mlflow.MlflowClient().get_run(study._study_id)
    if not _open(study_run):
        return None
    deleted = [int(k[len(TAG_DELETED_TRIAL):]) for k in study_run.data.tags if k.startswith(TAG_DELETED_TRIAL)]
    return trial.number - sum(n < trial.number for n in deleted)


def delete_trial(study, trial) -> None:
    """Remove a trial that never ran (one too many), keeping its number taken for trials_before."""
    client = mlflow.MlflowClient()
    client.set_tag(study._study_id, f"{TAG_DELETED_TRIAL}{trial.number}", trial._trial_id)
    client.delete_run(trial._trial_id)


def close(study_run_id: str, status: str) -> None:
    """End the study run (FINISHED, FAILED or KILLED): the workers of other processes stop asking for trials."""
    mlflow.MlflowClient().set_terminated(study_run_id, status)


def _own(client, study_run_id: str, tune_run_id: str) -> None:
    """Take the study: its owner from now on (alive while that tune run beats)."""
    client.set_tag(study_run_id, TAG_OWNER_RUN, tune_run_id)


def ask(study):
    """study.ask(), one process of this machine at a time. MLflow's storage numbers a trial by where its
    timestamped `trial_id` metric falls in the study run's history, read back just after writing it, so two
    processes asking in the same instant can both read 0 (it happened in CI with -P workers=2). Under the
    lock, and with the clock past this trial's millisecond before letting go, each trial lands after the last.
    """
    import hashlib
    import tempfile

    from filelock import FileLock
    from mlflow.entities import RunTag

    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{study.study_name}".encode()).hexdigest()[:16]
    with FileLock(Path(tempfile.gettempdir()) / f"cifar10-tune-{key}.lock"):
        trial = study.ask()
        time.sleep(0.005)
    beat = heartbeat.first_beat(TAG_TRIAL_PROCESS, TAG_TRIAL_HEARTBEAT)
    mlflow.MlflowClient().log_batch(trial._trial_id, tags=[RunTag(k, v) for k, v in beat.items()])
    return trial


def wait_for_trials(study, poll_s: float = 2.0) -> list:
    """Every trial, once none is RUNNING (other workers' included). A trial whose process is lost is marked
    FAILED (`fail_lost`): a worker machine that died mid-trial keeps the owner waiting heartbeat.STALE_S,
    not for good."""
    while True:
        trials = study.get_trials(deepcopy=False)
        if not any(t.state.name == "RUNNING" for t in trials):
            return trials
        fail_lost(study, trials)
        time.sleep(poll_s)
