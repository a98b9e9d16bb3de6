"""tune: search a recipe's hyperparameters with Optuna, choosing on held-out training images, then train the
winner on all of them and evaluate, export and register it as main does, nested under this run.

The study lives in the tracking store (cifar10_cnn/studies.py): a run nested under this one, each trial
a run nested under the study, so a killed search resumes with the same -P study, and other processes or
machines on the same tracking server join it with the same command. Trials never see a test image; the
test accuracy is measured once, on the final model.
"""

import contextlib
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
from mlflow.entities import RunTag

from cifar10_cnn import constants as C
from cifar10_cnn import (
    cores,
    entry_points,
    heartbeat,
    params,
    pipeline,
    plots,
    recipes,
    registry,
    search,
    sources,
    studies,
    tracking,
)
from cifar10_cnn.errors import UserError
from cifar10_cnn.progress import say

PROJECT_DIR = Path(__file__).resolve().parents[1]


def run(**raw: str) -> None:
    started = time.time()
    p = check(raw)
    tune_run = mlflow.active_run()
    mlflow.MlflowClient().update_run(tune_run.info.run_id, name=f"tune · {p['study']}")
    steps = pipeline.Steps(PROJECT_DIR, "tune", p["reuse"])
    ingest_id = steps.ingest(p["data"], p["expected_records"], p["source"])
    mlflow.set_tags({C.TAG_STUDY: p["study"]})

    # The search: this process and workers - 1 more, each asking the study for trials until it has enough
    # or the budget could not fit another trial and the winner's training.
    base = recipes.RECIPES[p["recipe"]]
    job = {"ingest_run_id": ingest_id, "recipe": p["recipe"], "space": p["space_text"], "study": p["study"],
           "space_key": search.key(p["space"]), "data_sha256": mlflow.get_run(ingest_id).data.tags[C.TAG_SHA256],
           "tune_run_id": tune_run.info.run_id, "experiment_id": tune_run.info.experiment_id,
           "trials": p["trials"], "deadline": started + 60 * p["budget_minutes"], "validation": p["validation"],
           "seed": p["seed"], "device": p["device"], "workers": p["workers"]}
    dataset = search.training_images(job)
    search.held_out(dataset.train_labels, job)  # -P validation too large for the data: fail before the study
    opened = open_study(job, worker=0)
    # The tune run beats (every step run does): a run that finds it silent for heartbeat.STALE_S takes the
    # study over and trains its winner; this one, should it wake, checks before each step that is its own.
    def owns() -> bool:
        return studies.owns(opened.study_run_id, tune_run.info.run_id)

    def still_owner() -> None:  # this process was silent for heartbeat.STALE_S (asleep, cut off): the other wins
        if not owns():
            raise UserError(f"study {p['study']!r} was taken over by another tune run while this one was silent "
                            f"for over {heartbeat.STALE_S:g} s; that run trains and registers its winner")

    say("tune", f"study {p['study']!r} ({opened.role}), run {opened.study_run_id}: up to {p['trials']} trials in "
                f"{p['budget_minutes']:g} min over {', '.join(f'{k}={v}' for k, v in p['space'].items())}")
    if opened.stale:
        say("tune", f"resuming: {opened.stale} trial(s) a stopped run left RUNNING are now FAILED")
    try:
        search_with_workers(opened, job, dataset)
        if opened.role == "worker":  # the study's owner trains the winner
            say("tune", f"worker done; the study's owner (run {opened.study_run_id}'s owner) trains the winner")
            return
        studies.take_no_new_trials(opened.study, f"owner run {tune_run.info.run_id} is done asking")
        finished = studies.wait_for_trials(opened.study)
        still_owner()
    except BaseException as exc:  # the owner stops: so do the workers of other processes, after their trial
        if opened.role != "worker":
            with contextlib.suppress(Exception):  # the store may be what failed: report the first error
                if owns():  # never the study of the run that took it over
                    studies.close(opened.study_run_id,
                                  "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    studies.close(opened.study_run_id, "FINISHED")
    summary = search.summary(finished)
    mlflow.log_metrics({"trials_complete": summary["complete"], "trials_pruned": summary["pruned"],
                        "trials_failed": summary["failed"]})
    for name, figure in plots.study_figures(opened.study).items():
        mlflow.log_figure(figure, f"{name}.png")
    mlflow.log_text(opened.study.trials_dataframe().to_csv(index=False), "trials.csv")
    best = search.best(opened.study)
    tuned = replace(base, **best.params)
    mlflow.log_metric("best_val_accuracy", best.value)
    mlflow.log_dict({"recipe": p["recipe"], "trial": best.number, "params": best.params}, "best.json")
    changed = search.changes(best.params, base)
    say("tune", f"best: trial {best.number}, val accuracy {best.value:.2%}; against {p['recipe']}: {changed}")

    # The winner through the real pipeline: trained on every training image, then evaluate, export, register.
    # The tags are for export's model card. An earlier train run with the same parameters is reused only if
    # this study's winner made it (a resumed tune): a card never names a study its model did not come from.
    tags = {C.TAG_STUDY: p["study"], C.TAG_STUDY_RUN: opened.study_run_id, C.TAG_STUDY_TRIALS: summary["total"],
            C.TAG_STUDY_BEST_TRIAL: best.number, C.TAG_STUDY_BEST: f"{best.value:.4f}"}
    still_owner()
    train_id = steps.run("train", {"ingest_run_id": ingest_id, "recipe": p["recipe"], **asdict(tuned),
                                   "validation": 0, "device": p["device"], "nproc_per_node": 1,
                                   "resume_run_id": "none"},
                         match_tags={k: str(v) for k, v in tags.items()})
    mlflow.MlflowClient().log_batch(train_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    still_owner()  # before registering: the winner's training took a while
    evaluate_id, export_id = steps.evaluate_and_export(train_id, p["device"], "auto", p["model_name"], p["int8"])
    test = mlflow.get_run(evaluate_id).data.metrics
    mlflow.log_metrics({k: test[k] for k in ("test_accuracy", "test_accuracy_tta") if k in test})
    text = (f"Study {p['study']!r}: {summary['total']} trials ({summary['complete']} complete, {summary['pruned']} "
            f"pruned, {summary['failed']} failed) in {(time.time() - started) / 60:.1f} min. Best: trial "
            f"{best.number}, held-out accuracy {best.value:.2%}. Against the {p['recipe']} recipe it changes "
            f"{changed}.{search.budget_note(summary['total'], p['trials'], p['budget_minutes'])} "
            f"Trained on every training image: test accuracy {test['test_accuracy']:.2%}"
            + (f" ({test['test_accuracy_tta']:.2%} with TTA)" if "test_accuracy_tta" in test else "")
            + f"; registered by export run {export_id}: "
        + ", ".join(registry.registered_by(mlflow.get_run(export_id).data.tags)) + ".")
    mlflow.set_tag("mlflow.note.content", text)
    say("tune", text)


def check(raw: dict) -> dict:
    """Every check before any trial starts, so bad input fails in seconds."""
    recipe = params.choice("recipe", raw["recipe"], tuple(recipes.RECIPES))
    space_text = search.SPACES[recipe] if str(raw["space"]).strip().lower() == "auto" else str(raw["space"])
    validation = params.POSITIVE_INT("validation", raw["validation"])
    recipes.check(replace(recipes.RECIPES[recipe], validation=validation))  # a multiple of 10
    study = str(raw["study"]).strip()
    if study.lower() == "auto":
        study = f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not study or len(study) > 100 or "'" in study:
        raise UserError(f"study must be 1-100 characters without quotes, got {study!r}")
    params.expected_records(raw["expected_records"])
    data, source = sources.checked_data(raw["data"])
    space = search.parse_space(space_text)
    if fixed := set(space) & {"validation", "budget_minutes"}:  # tune sets these for every trial
        raise UserError(f"space: {', '.join(sorted(fixed))} cannot be searched (tune holds out -P validation "
                        "images and trains each trial for its epochs)")
    search.check_corners(recipes.RECIPES[recipe], space, validation)
    return {"recipe": recipe, "space": space, "space_text": space_text, "study": study,
            "validation": validation, "trials": params.POSITIVE_INT("trials", raw["trials"]),
            "budget_minutes": params.POSITIVE("budget_minutes", raw["budget_minutes"]),
            "workers": params.POSITIVE_INT("workers", raw["workers"]),
            "seed": params.NON_NEGATIVE_INT("search_seed", raw["search_seed"]),
            "device": params.choice("device", raw["device"], params.DEVICES),
            "model_name": params.model_name(raw["model_name"]),
            "int8": str(params.BOOLEAN("int8", raw["int8"])).lower(),
            "reuse": params.BOOLEAN("reuse", raw["reuse"]), "source": source, "data": data,
            "expected_records": str(raw["expected_records"]).strip()}


def open_study(job: dict, worker: int) -> studies.Opened:
    settings = {"recipe": job["recipe"], "space": job["space_key"], "validation": job["validation"],
                "data_sha256": job["data_sha256"]}
    return studies.open_study(job["study"], job["tune_run_id"], job["experiment_id"],
                              lambda before: search.sampler(job["seed"], job["trials"], worker, before),
                              search.pruner(), settings)


def search_with_workers(opened: studies.Opened, job: dict, dataset) -> None:
    """This process and `workers - 1` more ask the study for trials. When this one stops (Ctrl-C, SIGTERM, a
    failure), the others are terminated too (a trial they were training ends FAILED) instead of searching on
    unseen."""
    if job["workers"] == 1:
        search.work(opened.study, job, worker=0, dataset=dataset)
        return
    with ProcessPoolExecutor(job["workers"] - 1) as pool:
        others = [pool.submit(work, {**job, "worker": w}) for w in range(1, job["workers"])]
        try:
            search.work(opened.study, job, worker=0, dataset=dataset)
            for other in others:
                other.result()
        except BaseException:
            for process in list(pool._processes.values()):  # no public way before Python 3.14's terminate_workers
                process.terminate()
            raise


def work(job: dict) -> None:
    """A worker process of `-P workers=K`: the same study, trials until the study has enough."""
    import signal

    import torch

    signal.signal(signal.SIGTERM, tracking.sigterm_as_interrupt)  # its trial ends FAILED, not RUNNING
    torch.set_num_threads(max(1, cores.machine() // job["workers"]))
    search.work(open_study(job, job["worker"]).study, job, job["worker"])


def main(argv=None):
    args = entry_points.parser("tune", __doc__).parse_args(argv)
    tracking.run_step("tune", run, **vars(args))


if __name__ == "__main__":
    main()
