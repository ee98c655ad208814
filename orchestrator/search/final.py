"""The final phase of a planned search: the best screened configuration trained on every training person.

The screen (``orchestrator.plan``) ends at ``screen_until``; what is left of the budget then goes to one
model of the configuration with the best screened out-of-fold macro F1 (with TTA), refit on every non-holdout
person (``orchestrator.refit.run_refit``, the same refit ``foldtune refit`` runs, with its record, its
holdout predictions and its MLflow run). Its number of epochs is what the time left holds at the cost the
screen measured on this hardware: the chosen trial's median seconds per epoch (``metrics/epochs.csv``) over
the images it trained and scored per epoch (``plan.seconds_per_image``), so a slow backbone gets fewer
epochs and a fast one more, and the learning-rate schedule is built for exactly that many. The model
starts from the screened fold model's weights (its best epoch), so the screen's epochs of the winner are
reused rather than trained again; it then sees every training person under a fresh warmup-cosine schedule.
When the chosen trial's runs converged (``plan.converged_epochs``: its mean F1 stopped gaining, which a
long screen or a promoted run on a GPU node shows and a two-epoch CPU screen never does) and the time left
holds it, the final model instead trains the folds' mean best epoch from scratch, as ``foldtune refit``
does, and the time left trains more seeds of it: epochs that converged, not epochs that fit.

``final.json`` in the search folder says what was decided and why (read by ``foldtune ensemble``, which
then votes the final model with the screened fold models when the holdout persons say it helps). A
final phase that cannot run (no trial finished an epoch, not one epoch fits) is one line, not an error:
the screened models are the search's result then.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.plan import (
    FinalJob,
    converged_epochs,
    describe_final,
    final_cap_seconds,
    final_epochs,
    final_models,
    final_seeds,
    pack_final,
    seconds_per_image,
)
from orchestrator.search.budget import BILL_EVERY_S, TimeBudget
from orchestrator.search.gpu_jobs import Job, JobFailed, Workers, run_jobs, workers_for
from orchestrator.space import SearchSpace
from trainers.io import write_text_atomic

FINAL_RECORD = "final.json"
UNCAPPED = 10**6  # epochs: what the time left holds, before any cap


def train_final(
    data_root: Path,
    space: SearchSpace,
    search_dir: Path,
    budget: TimeBudget,
    cache_dir: Path | None,
    tracking_uri: str | None,
    progress: bool,
    workers: Workers | None = None,
) -> dict[str, Any] | None:
    """Refit the best screened configuration (and, past ``max_final_epochs`` unconverged, the next finished
    ones) for the epochs the budget has left; ``final.json``'s record, or None (with the line saying why)
    when there is nothing to refit or no time for one epoch."""
    from orchestrator.refit import ranked_trials

    workers = workers or workers_for(space)  # where the final models train (``gpu_jobs``)
    phase = _Phase(data_root, space, search_dir, budget, cache_dir, tracking_uri, progress, workers)
    say = phase.say
    try:
        ranked = ranked_trials(search_dir)
    except (OrchestratorError, ValueError) as error:
        say(f"final: no screened configuration to train ({error}); the search's result is its trials")
        return None
    trial_id, score, _ = ranked[0]
    why = f"the best OOF macro F1 with TTA ({score:.4f}) of {len(ranked)} usable trial(s)"
    run_dir = search_dir / "trials" / trial_id
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    cost = measured_cost(run_dir, config)
    left_s = budget.left_s
    if cost is None:
        say(f"final: trial {trial_id} has no measured epoch; the search's result is its trials")
        return None
    per_image_s, refit_images, holdout_images = cost
    views = len(config.get("tta") or ())
    plan = space.plan
    converged = _converged(run_dir, plan.max_final_epochs)
    epochs = final_epochs(
        left_s, per_image_s, refit_images, holdout_images, views, converged or plan.max_final_epochs
    )
    if converged is not None and epochs < converged:  # not enough time to start over: continue, as before
        converged = None
        epochs = final_epochs(left_s, per_image_s, refit_images, holdout_images, views, plan.max_final_epochs)
    if epochs <= 0:
        epoch_s = per_image_s * refit_images
        say(
            f"final: half an epoch of trial {trial_id} on every training person (~{epoch_s / 2:.0f} s) does "
            f"not fit in the {max(left_s, 0) / 60:.1f} min left; the search's result is its trials"
        )
        return None
    if converged is None:
        fit_epochs = final_epochs(left_s, per_image_s, refit_images, holdout_images, views, UNCAPPED)
        # on GPUs the models train at once, one per GPU: each has the whole time left
        count = final_models(fit_epochs * workers.at_once, plan.max_final_epochs, plan.max_final_seeds)
        if count > 1:  # past the cap: the time is shared by the best finished screens, each continued
            return _train_shared(phase, ranked, count, why)
    seeds = final_seeds(
        left_s, per_image_s, refit_images, holdout_images, views, epochs, plan.max_final_seeds
    )
    say(describe_final(trial_id, str(config["backbone"]), epochs, per_image_s, refit_images, left_s, seeds))
    epochs_from = (
        f"converged: the folds' mean best epoch ({converged}), from scratch"
        if converged is not None
        else "the time left (at most max_final_epochs), continuing the screened fold model"
    )
    say(f"final: epochs from {epochs_from}")
    figures = {"epochs_from": epochs_from, "seconds_per_image": per_image_s, "train_images": refit_images}
    continue_fold = None if converged is not None else 0
    model = _Model(trial_id, why, epochs, seeds, continue_fold, figures, left_s, trial_device(config))
    return phase.write_record(phase.train(1, lambda _index, _busy: model), why, left_s)


@dataclass(frozen=True)
class _Model:
    """One final model as planned: the trial it continues (``continue_fold``: from that fold model's
    weights; None: from scratch), why, its epochs and seeds, how they were chosen (``figures``) and the
    time it was planned in (``left_s``)."""

    trial_id: str
    why: str
    epochs: float
    seeds: int
    continue_fold: int | None
    figures: dict[str, Any]
    left_s: float
    device: str  # the trial's ``device`` setting
    planned_s: float | None = None  # how long it should take (``left_s`` when None): a cap may stop it sooner

    def record(self, refit: dict[str, Any], seconds: float) -> dict[str, Any]:
        """Its entry in ``final.json``, from ``foldtune refit``'s record of it."""
        return {
            "trial_id": self.trial_id,
            "chosen_by": self.why,
            "epochs": self.epochs,
            "seeds": self.seeds,
            "seconds": round(seconds, 1),
            "holdout_f1": refit.get("holdout_f1"),
            "holdout_f1_tta": refit.get("holdout_f1_tta"),
            **self.figures,
            "left_s": round(self.left_s, 1),
        }


@dataclass(frozen=True)
class _Phase:
    """What every final model of one search's final phase is trained with, and where it is recorded."""

    data_root: Path
    space: SearchSpace
    search_dir: Path
    budget: TimeBudget
    cache_dir: Path | None
    tracking_uri: str | None
    progress: bool
    workers: Workers

    def say(self, line: str) -> None:
        if self.progress:
            print(line)

    def train(
        self, count: int, plan_model: Callable[[int, list[float]], _Model | None]
    ) -> list[dict[str, Any]]:
        """Train ``count`` final models where the phase's ``workers`` are (``gpu_jobs.workers_for``: one per
        GPU at once, or one after another in the driver), billed to the budget while they train; each is
        planned by ``plan_model(index, busy_s)`` when a slot frees (None skips it), so from the time left
        then and ``busy_s``, the seconds each model still running is planned to take. Their records, in the
        order they ended."""
        workers = self.workers
        if workers.in_driver:
            use_the_search_threads(self.space)
        else:
            self.say(f"final: {workers.describe()}")
        running: dict[int, tuple[_Model, float]] = {}  # each running model and when it started
        models: list[dict[str, Any]] = []

        def start(index: int) -> Job | None:
            now = time.monotonic()
            busy_s = [
                max(0.0, started + (model.planned_s or model.left_s) - now)
                for model, started in running.values()
            ]
            model = plan_model(index, busy_s)
            if model is None:
                return None
            running[index] = (model, time.monotonic())
            return self._job(model)

        def done(index: int, outcome: Any) -> None:
            model, started = running.pop(index)
            if isinstance(outcome, JobFailed):
                raise OrchestratorError(f"the final model of trial {model.trial_id} failed: {outcome.line}")
            models.append(model.record(outcome, time.monotonic() - started))

        with billed(self.budget):
            run_jobs(workers, count, start, done)
        return models

    def _job(self, model: _Model) -> Job:
        """``foldtune refit``'s run of ``model`` (its record, holdout predictions and MLflow run)."""
        from orchestrator.refit import run_refit

        kwargs = {
            "storage": self.search_dir.parent,
            "trial": model.trial_id,
            "epochs": model.epochs,
            "seeds": model.seeds,
            "device": model.device,
            "tracking_uri": self.tracking_uri,
            "cache_dir": Path(self.cache_dir) if self.cache_dir else None,
            "log": print if self.progress else None,
            "chosen_by": f"the screen: {model.why}",
            "continue_fold": model.continue_fold,  # unconverged, the screened fold model goes on
        }
        return Job(run_refit, (self.data_root, self.search_dir.name), kwargs, device=model.device)

    def write_record(self, models: list[dict[str, Any]], why: str, left_s: float) -> dict:
        """``final.json``: the chosen trial's model at the top (as a single final model's record always
        was), every final model in ``models``, the whole phase's seconds and the time it started with."""
        record = {**models[0], "chosen_by": why, "models": models}
        record["seconds"] = round(sum(m["seconds"] for m in models), 1)
        record["left_s"] = round(left_s, 1)
        record["trained"] = self.workers.describe()  # where: in the driver, or how many at once
        write_text_atomic(json.dumps(record, indent=2), self.search_dir / FINAL_RECORD)
        self.budget.record()
        return record


def _train_shared(
    phase: _Phase, ranked: list[tuple[str, float, bool]], count: int, why: str
) -> dict[str, Any] | None:
    """``count`` final models share the time left (``plan.final_models``): the chosen trial's and the next
    best finished screens' (a screen ASHA stopped or the budget cut is not one), each continuing its own
    screened fold model; fewer finished screens than ``count``, and the chosen trial trains the rest as
    more seeds. Each model is planned when a slot frees (``plan.pack_final``), from the time really left
    then and the models still running: a model its cap stops early (a cheaper backbone) leaves time that
    the plan gives to the others, so no slot idles while another model could have used it; each model's
    epochs come from its own measured cost."""
    say, plan = phase.say, phase.space.plan
    chosen = ranked[0][0]
    runners_up = [trial for trial, _, finished in ranked[1:] if finished][: count - 1]
    jobs = [(chosen, count - len(runners_up))] + [(trial, 1) for trial in runners_up]
    configs = {
        trial: yaml.safe_load((phase.search_dir / "trials" / trial / "config.yaml").read_text())
        for trial, _ in jobs
    }
    costs = {trial: measured_cost(phase.search_dir / "trials" / trial, configs[trial]) for trial, _ in jobs}
    for trial, _ in jobs:
        if not _usable(costs[trial]):
            say(f"final: trial {trial} has no measured epoch; skipped")
    jobs = [job for job in jobs if _usable(costs[job[0]])]

    views = {trial: len(configs[trial].get("tta") or ()) for trial, _ in jobs}
    cap_s = {  # what each model needs to reach max_final_epochs, all its seeds
        trial: final_cap_seconds(*costs[trial], views[trial], plan.max_final_epochs, seeds)
        for trial, seeds in jobs
    }

    at_once = phase.workers.at_once
    listed = ", ".join(f"{t}" + (f" x{s} seeds" if s > 1 else "") for t, s in jobs)
    if at_once == 1:
        say(
            f"final: the time left holds more than {plan.max_final_epochs} epochs (max_final_epochs) of "
            f"trial {chosen}, and no run showed more pays: {count} final models share it ({listed}), each "
            "continuing its screened fold model"
        )
    else:
        say(
            f"final: {count} final models, {at_once} at once ({listed}), each continuing its screened "
            "fold model for its share of the time left (at most max_final_epochs)"
        )
    order = [trial for trial, _, _ in ranked]
    phase_left_s = phase.budget.left_s
    waiting = list(jobs)

    def plan_model(_index: int, busy_s: list[float]) -> _Model | None:
        sizes = [FinalJob(cap_s[trial], seeds) for trial, seeds in waiting]
        pick, share_s = pack_final(phase.budget.left_s, busy_s, at_once, sizes)
        trial_id, seeds = waiting.pop(pick)
        per_image_s, refit_images, holdout_images = costs[trial_id]
        epochs = final_epochs(
            share_s / seeds, per_image_s, refit_images, holdout_images, views[trial_id], plan.max_final_epochs
        )
        if epochs <= 0:
            say(
                f"final: trial {trial_id} not started: half an epoch does not fit in its share "
                f"({share_s / 60:.1f} min)"
            )
            return None
        backbone = str(configs[trial_id]["backbone"])
        say(describe_final(trial_id, backbone, epochs, per_image_s, refit_images, share_s, seeds))
        rank = 1 + order.index(trial_id)
        reason = (
            why if trial_id == chosen else f"a runner-up of the screen (#{rank} on OOF macro F1 with TTA)"
        )
        epochs_from = (
            f"a share of the time left among {count} final models, {at_once} at once (at most "
            "max_final_epochs), continuing the screened fold model"
        )
        figures = {"epochs_from": epochs_from, "seconds_per_image": per_image_s, "train_images": refit_images}
        planned_s = min(share_s, cap_s[trial_id])
        device = trial_device(configs[trial_id])
        return _Model(trial_id, reason, epochs, seeds, 0, figures, share_s, device, planned_s)

    models = phase.train(len(jobs), plan_model)
    models.sort(key=lambda model: order.index(model["trial_id"]))  # the record in rank order, chosen first
    return phase.write_record(models, why, phase_left_s) if models else None


def _usable(cost: tuple[float, int, int] | None) -> bool:
    """A measured cost a final model can be planned from (a positive, finite time per image)."""
    return cost is not None and math.isfinite(cost[0]) and cost[0] > 0 and cost[1] > 0


def trial_device(config: dict[str, Any]) -> str:
    """The trial's ``device`` setting, which its promotion and final model train with."""
    return str(config.get("device", "auto"))


def _converged(run_dir: Path, cap: int) -> int | None:
    """The epochs the trial's runs converged at (``plan.converged_epochs``, at most ``cap``), from its
    ``result.json``; None when they may still gain or the record does not say."""
    try:
        result = json.loads((run_dir / "result.json").read_text())
        best, trained = int(result["best_epoch"]), int(result["epochs_trained"])
        converged = converged_epochs(best, trained, list(result["extra"]["fold_best_epochs"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if converged is None else min(converged, cap)


def read_final(search_dir: Path) -> dict[str, Any] | None:
    """The search's ``final.json`` (its planned final model), or None when it has none."""
    path = Path(search_dir) / FINAL_RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def measured_cost(run_dir: Path, config: dict) -> tuple[float, int, int] | None:
    """(seconds per training image, images a refit trains on, holdout images) from a screened trial's
    epochs and fold file; None when it has no timed epoch.

    The images counted per epoch are the trained folds' training images plus their validation images (at
    ``plan.VALIDATION_COST``); rows of ``drop_ages`` are counted on both sides alike, so they cancel."""
    from trainers.config import folds_trained_of
    from trainers.folds import HOLDOUT_FOLD
    from trainers.screened import history_of

    epochs_path = history_of(run_dir, config)  # a cut promotion's: the screen's epochs, as config.yaml says
    if not epochs_path.is_file():
        return None
    history = pd.read_csv(epochs_path, dtype={"fold": str})
    if "epoch_seconds" not in history.columns:
        return None
    timed_rows = history["fold"] == "mean"
    if "timed_from" in history.columns:  # a promoted run: its own epochs, not the screen's before them
        timed_rows &= history["timed_from"].notna()
    seconds = history.loc[timed_rows, "epoch_seconds"].dropna()
    if seconds.empty:
        return None
    fold_of = pd.read_csv(run_dir / "folds.csv", usecols=["fold"])["fold"].to_numpy()
    in_folds = fold_of != HOLDOUT_FOLD
    # a promoted run timed only the folds it trained (``timed_from`` on); its screened ones were reused
    first = int(history["timed_from"].dropna().max()) if "timed_from" in history.columns else 0
    timed = fold_images(fold_of, range(first, folds_trained_of(config)))
    train_images, val_images = sum(train for train, _ in timed), sum(val for _, val in timed)
    per_image = seconds_per_image(float(seconds.median()), train_images, val_images)
    return per_image, int(in_folds.sum()), int((~in_folds).sum())


def fold_images(fold_of, folds: Iterable[int]) -> list[tuple[int, int]]:
    """(training images, validation images) of each of ``folds``, from a fold file's ``fold`` column
    (``fold_of``): a fold validates on its own rows and trains on every other non-holdout row."""
    from trainers.folds import HOLDOUT_FOLD

    in_folds = fold_of != HOLDOUT_FOLD
    return [(int((in_folds & (fold_of != fold)).sum()), int((fold_of == fold).sum())) for fold in folds]


@contextlib.contextmanager
def billed(budget: TimeBudget) -> Iterator[None]:
    """While the final model trains (no Tune stopper runs then), the seconds used are written every
    ``BILL_EVERY_S``, so a driver killed in the final phase has that time billed on resume too."""
    done = threading.Event()

    def bill() -> None:
        while not done.wait(BILL_EVERY_S):
            with contextlib.suppress(OSError):
                budget.record()

    thread = threading.Thread(target=bill, name="foldtune-budget", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def use_the_search_threads(space: SearchSpace) -> None:
    """The final model gets the CPU threads the screen's trials had together (never more than here)."""
    import torch

    at_once = space.max_concurrent if isinstance(space.max_concurrent, int) else 1
    threads = max(1, int(space.cpus_per_trial * at_once))
    torch.set_num_threads(min(threads, len(os.sched_getaffinity(0))))
