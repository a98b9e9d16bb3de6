"""Hyperparameter search with Optuna: search spaces over a recipe's fields, and trials that train on the
training images and are scored on held-out ones (never on the test images).

A space is text, `name=low:high[:log]` for a number or `name=a|b|c` for choices, items separated by
commas, e.g. `filter_lr=0.02:0.2:log,momentum=0.6:0.95,batch_size=256|512|1024`. Every name is a
field of `recipes.TrainConfig`, and every bound or choice must pass that field's own check.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import mlflow

from . import constants as C
from . import heartbeat, recipes, studies
from .errors import UserError
from .params import Number

if TYPE_CHECKING:
    import optuna

# Each recipe's default search space, beside the recipe: the fields its results are most sensitive to,
# within ranges where the recipe still trains (wider ranges cost trials to find that out).
SPACES = {
    "seed": "learning_rate=0.0003:0.003:log,batch_size=16|32|64,epochs=3:6",
    "fast": "filter_lr=0.02:0.2:log,learning_rate=0.3:1.5:log,momentum=0.7:0.95,label_smoothing=0:0.3,"
            "weight_decay=0.0003:0.003:log,batch_size=256|512|1024,epochs=6:10",
}
SPACES["fast94"] = SPACES["fast"]  # the same recipe on a wider network
assert set(SPACES) == set(recipes.RECIPES)
# Median pruning: a trial whose validation accuracy after an epoch is below the median of the earlier
# trials' at the same epoch stops there. It needs no budget ladder (successive halving does), so it works
# with the handful of trials a CPU affords; from the second epoch on (the first says little under a
# one-cycle schedule that has barely decayed), and once two trials have finished.
PRUNE_AFTER_TRIALS = 2
PRUNE_FROM_EPOCH = 2
# What the winner costs beyond its training (a process per step, evaluate, export, registration), kept free
# of trials at the end of the budget; the winner's training itself is estimated from the trials'.
PIPELINE_RESERVE_S = 90


@dataclass(frozen=True)
class Dimension:
    name: str
    low: float | None = None  # a range ...
    high: float | None = None
    log: bool = False
    choices: tuple = ()  # ... or choices

    def suggest(self, trial: optuna.Trial):
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def __str__(self) -> str:
        if self.choices:
            return "|".join(str(c).lower() for c in self.choices)
        return f"{self.low:g}:{self.high:g}" + (":log" if self.log else "")


def parse_space(text: str) -> dict[str, Dimension]:
    """The space `text` describes, every item checked against its field's declaration; UserError otherwise."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise UserError(f"space must name at least one training parameter (e.g. {SPACES['fast'].split(',')[0]}), "
                        f"got {text!r}")
    space: dict[str, Dimension] = {}
    for item in items:
        name, sep, spec = (part.strip() for part in item.partition("="))
        if not sep or not spec:
            raise UserError(f"space item {item!r} is not name=low:high[:log] or name=a|b|c")
        if name not in recipes.SPECS:
            raise UserError(f"space: {name!r} is not a training parameter; they are {', '.join(recipes.FIELDS)}")
        if name in space:
            raise UserError(f"space names {name!r} twice")
        check = recipes.SPECS[name]["check"]
        if ":" in spec and "|" not in spec and not isinstance(check, Number):
            raise UserError(f"space: {name} is not a number; give it choices (a|b), not the range {spec!r}")
        if "|" in spec or not isinstance(check, Number):
            values = tuple(recipes.parse(name, v.strip()) for v in spec.split("|"))
            if len(set(values)) < 2:
                raise UserError(f"space: {name}={spec} offers no choice; give two values or more (a|b)")
            space[name] = Dimension(name, choices=values)
            continue
        parts = spec.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2].strip() != "log"):
            raise UserError(f"space: {name}={spec} is not low:high or low:high:log")
        low, high = (recipes.parse(name, p.strip()) for p in parts[:2])
        if not low < high:
            raise UserError(f"space: {name}={spec} is an empty range (low must be below high)")
        log = len(parts) == 3
        if log and low <= 0:
            raise UserError(f"space: {name}={spec} cannot be searched on a log scale from {low} (must be > 0)")
        space[name] = Dimension(name, low, high, log)
    return space


def key(space: dict[str, Dimension]) -> str:
    """The space as text, the same for the same space however it was written (order, spacing, 1e-3 or 0.001)."""
    return ",".join(f"{name}={dimension}" for name, dimension in sorted(space.items()))


def check_corners(base: recipes.TrainConfig, space: dict[str, Dimension], validation: int) -> None:
    """Every corner of the space (each range's ends, each choice, together) must be a recipe that passes its
    checks: a space like epochs=1:3,warmup_epochs=0:5 fails here, before any trial, not in the trial that
    draws warmup > epochs. Fields are checked one by one when parsed; this checks them together."""
    import itertools

    ends = [[(d.name, v) for v in (d.choices or (d.low, d.high))] for d in space.values()]
    for corner in itertools.islice(itertools.product(*ends), 4096):  # 12 two-ended fields; spaces are smaller
        try:
            recipes.check(replace(base, **dict(corner), validation=validation, budget_minutes=0.0))
        except UserError as exc:
            shown = ", ".join(f"{k}={str(v).lower()}" for k, v in corner)
            raise UserError(f"space: at {shown} the recipe is invalid ({exc}); narrow the ranges") from None


def default_space(recipe: str) -> dict[str, Dimension]:
    return parse_space(SPACES[recipe])


def suggest(trial: optuna.Trial, space: dict[str, Dimension]) -> dict:
    return {name: dimension.suggest(trial) for name, dimension in space.items()}


def sampler(seed: int, trials: int, worker: int = 0, before: int = 0) -> optuna.samplers.BaseSampler:
    """TPE, seeded: each worker differently, and a process that finds `before` trials in the study (it resumes
    or joins) differently again, or they would propose the same trials. Random proposals for the first third
    of the trials (at least 2), then TPE's model of what scored well."""
    import optuna

    return optuna.samplers.TPESampler(seed=(seed + 1000 * worker + 1_000_003 * before) % 2**32,  # numpy's range
                                      n_startup_trials=max(2, math.ceil(trials / 3)))


def pruner() -> optuna.pruners.BasePruner:
    import optuna

    # optuna prunes at a reported step >= n_warmup_steps; our steps are epochs, from 1
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=PRUNE_FROM_EPOCH)


def changes(params: dict, base: recipes.TrainConfig) -> str:
    """What a trial's parameters change against the recipe: 'learning_rate 0.001 -> 0.0023, ...'."""
    def shown(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v).lower()

    moved = [f"{k} {shown(getattr(base, k))} -> {shown(v)}" for k, v in params.items() if getattr(base, k) != v]
    return ", ".join(moved) or "nothing (the recipe's own values)"


# --- trials: each trains on the training images less the held-out ones, scored on those after each epoch


def work(study: optuna.Study, job: dict, worker: int, dataset=None) -> None:
    """Ask the study for trials and run them until it has `job['trials']` or the budget would not fit one
    more trial and the winner's training. Any number of processes may do this on one study at once.
    `dataset`: the ingest run's training split, if the caller has it already."""
    import optuna

    from . import training
    from .progress import say

    if dataset is None:
        dataset = training_images(job)
    split = held_out(dataset.train_labels, job)
    client = mlflow.MlflowClient()
    while fits_another(study, job):
        trial = studies.ask(study)
        try:  # from here on the trial is never left RUNNING, whatever store request is interrupted
            before = studies.trials_before(study, trial)
            if before is None or before >= job["trials"]:  # closed, or another worker took the last one
                studies.delete_trial(study, trial)
                return
            client.set_tag(trial._trial_id, "mlflow.runName", f"trial {trial.number}")
            with heartbeat.beating(trial._trial_id, studies.TAG_TRIAL_HEARTBEAT):
                value = run_trial(trial, job, dataset, split, worker)
        # An owner that heard no heartbeat for heartbeat.STALE_S (this machine was cut off) may have marked the
        # trial FAILED meanwhile, and that stands: skip_if_finished, and a reason tagged only if it was told.
        except optuna.exceptions.UpdateFinishedTrialError:
            say("tune", f"trial {trial.number} was marked lost by the study's owner meanwhile; going on")
        except optuna.TrialPruned as pruned:
            if study.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True).state.name == "PRUNED":
                client.set_tag(trial._trial_id, C.TAG_TRIAL_PRUNED, str(pruned))
        except training.Diverged as exc:  # a NaN loss fails this trial, and the search goes on
            client.set_tag(trial._trial_id, C.TAG_TRIAL_FAILED, str(exc))
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        except BaseException:  # Ctrl-C, SIGTERM (KeyboardInterrupt here) or a bug: never left RUNNING
            study.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise
        else:
            study.tell(trial, value, skip_if_finished=True)


def training_images(job: dict):
    """The ingest run's training split; the test split is never loaded by a search."""
    from . import tracking

    return tracking.dataset_of(job["ingest_run_id"], ("train",))


def held_out(labels, job: dict):
    """(kept, held out) training images, the same for every trial of the study: drawn with the recipe's own
    seed, not the trial's (a searched seed would score each trial on other images, some of them another
    trial's training images). A UserError when the training set is too small for -P validation."""
    from . import data

    return data.holdout(labels, job["validation"], recipes.RECIPES[job["recipe"]].seed)


def run_trial(trial: optuna.Trial, job: dict, dataset, split, worker: int) -> float:
    """Train the recipe with the trial's parameters; its run gets their curves. The last epoch's held-out
    accuracy is the trial's value (the model the winner's retraining will reproduce)."""
    import time

    import optuna
    import torch
    from mlflow.entities import Metric, Param

    from . import hardware, models, training
    from .progress import say

    chosen = suggest(trial, parse_space(job["space"]))
    config = recipes.check(replace(recipes.RECIPES[job["recipe"]], **chosen, validation=job["validation"],
                                   budget_minutes=0.0))
    target = hardware.select_device(job["device"])
    config, _ = hardware.decide(config, hardware.capabilities(target))
    client, run_id = mlflow.MlflowClient(), trial._trial_id
    fixed = {k: v for k, v in asdict(config).items() if k not in chosen}  # the chosen ones: logged by the study
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in {**fixed, "recipe": job["recipe"]}.items()])
    kept, held = split
    images, labels = torch.from_numpy(dataset.train_images), torch.from_numpy(dataset.train_labels).long()

    def on_epoch(r: training.EpochResult) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, r.epoch) for k, v in (
            ("val_accuracy", r.val_accuracy), ("val_loss", r.val_loss), ("train_loss", r.loss),
            ("epoch_seconds", r.seconds))])
        say("tune", f"trial {trial.number} (worker {worker}) epoch {r.epoch}/{config.epochs}: val accuracy "
                    f"{r.val_accuracy:.2%}")
        trial.report(r.val_accuracy, r.epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"val accuracy {r.val_accuracy:.4f} after epoch {r.epoch} is below the "
                                     "median of the trials before it")

    history = training.train(models.build(config.model, seed=config.seed), images[kept], labels[kept], config,
                             target, on_epoch, held_out=(images[held], labels[held]))
    return history[-1].val_accuracy


def fits_another(study: optuna.Study, job: dict) -> bool:
    """Whether one more trial (and then the winner's training) fits: the study still open, fewer trials than
    asked for, and the median finished trial's time, plus the longest one's again for the winner, before the
    deadline."""
    import time

    trials = [t for t in study.get_trials(deepcopy=False) if t.state.name != "WAITING"]  # enqueued: not yet begun
    if len(trials) >= job["trials"] or not studies.is_open(study):  # the owner has chosen the winner, or failed
        return False
    took = sorted((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                  if t.datetime_complete is not None and t.state.name == "COMPLETE")
    if not took:
        return time.time() < job["deadline"]
    winner = took[-1] * 1.15 + PIPELINE_RESERVE_S  # every training image, not 90 % of them; then its steps
    return time.time() + took[len(took) // 2] + winner < job["deadline"]


def budget_note(total: int, trials: int, budget_minutes: float) -> str:
    """Why a search ran fewer trials than asked for, or '' when it ran them all: a user who asked for 20 and
    got 2 should learn it was the budget, not a fault."""
    if total >= trials:
        return ""
    return (f" The {budget_minutes:g}-minute budget fitted {total} of the {trials} trials asked for (a trial and "
            "the winner's training must fit what is left): give more budget_minutes for more trials.")


def summary(trials: list) -> dict:
    states = [t.state.name for t in trials]
    return {"total": len(trials), "complete": states.count("COMPLETE"), "pruned": states.count("PRUNED"),
            "failed": states.count("FAIL")}


def best(study: optuna.Study):
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        raise UserError("no trial of the study finished (all pruned, failed or cut by the budget): give more "
                        "budget_minutes or trials, or a space in which the recipe trains")
    return max(complete, key=lambda t: (t.value, -t.number))


