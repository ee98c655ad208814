"""Promotion in a planned search: the best screened configurations confirmed on all k folds.

The screen (``orchestrator.plan``) judges each configuration on its first fold(s) only. When the screen
ends and the time left holds more than the final model needs at its epoch cap (``max_final_epochs``:
a GPU node's night, not a CPU half-hour), the best screened configurations, up to ``promote_top`` of them
in the order of their screened out-of-fold macro F1 (with TTA), earn their other folds: each one's run
folder trains its remaining folds for the same epochs (``trainers.fit(..., promote=True)``) while its
screened fold models are reused as they are, not trained again (``trainers.screened``). A promoted trial is
an ordinary k-fold trial afterwards: ``make ensemble`` weighs it on out-of-fold predictions of every
person instead of one fold's, and the final model is chosen among all trials after promotion.

Promotion is rung two of successive halving over folds × epochs: Tune's ASHA already halved over epochs
within the screen; this rung halves over folds, sized by the cost the screen measured on this hardware
(``plan.promotion_seconds``) and by what the final model is owed first (``plan.promotions_that_fit``).
It runs where the final models do (``search.gpu_jobs``): one per GPU at once as Ray tasks, or in the
driver one configuration after another on a cluster without GPUs, billed to the budget while it trains.
``promoted.json`` in the search folder records what was promoted and why.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from orchestrator.plan import describe_promotions, final_seconds, promotion_seconds, promotions_that_fit
from orchestrator.search.budget import TimeBudget
from orchestrator.search.final import (
    billed,
    fold_images,
    measured_cost,
    trial_device,
    use_the_search_threads,
)
from orchestrator.search.gpu_jobs import Job, JobFailed, Workers, run_jobs
from orchestrator.space import SearchSpace
from orchestrator.tracking.store import error_line
from trainers.errors import FoldtuneError
from trainers.io import write_text_atomic

PROMOTED_RECORD = "promoted.json"


def promote_screened(
    data_root: Path,
    space: SearchSpace,
    search_dir: Path,
    budget: TimeBudget,
    cache_dir: Path | None,
    progress: bool,
    on_promoted: Callable[[dict[str, Any]], None] | None = None,
    workers: Workers | None = None,
) -> list[dict[str, Any]]:
    """Promote the best screened configurations the time left affords, ``workers`` at a time (default: in
    the driver, one after another; ``gpu_jobs``); their records
    (also in ``promoted.json``; a resumed search's earlier ones first), [] when none is promoted (the line
    printed says why). ``on_promoted`` gets each new record once ``promoted.json`` has it (the driver logs
    it to MLflow). A promotion that fails is recorded as failed and the next one goes on: the final model
    is owed its time whatever happens here."""
    say = print if progress else (lambda line: None)
    plan = space.plan
    records = settled_promotions(search_dir, on_promoted)  # a resumed search keeps what it promoted
    if plan is None or plan.promote_top <= len(records):
        return records
    done = {str(record["trial_id"]) for record in records}
    try:
        ranked = [(t, f1) for t, f1 in rank_screened(search_dir) if t not in done]
    except FoldtuneError as error:  # e.g. no screen kept its checkpoints: the final model says so too
        say(f"promote: none ({error_line(error)})")
        return records
    costs: list[tuple[str, str, float]] = []
    devices: dict[str, str] = {}  # each trial's ``device`` setting, which its promotion trains with
    final_need = 0.0  # the final model at its cap, of the slowest configuration it may choose
    for trial_id, _ in ranked[: plan.promote_top - len(records)]:
        run_dir = search_dir / "trials" / trial_id
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        devices[trial_id] = trial_device(config)
        measured = measured_cost(run_dir, config)
        if measured is None:
            break
        per_image_s, refit_images, holdout_images = measured
        views = len(config.get("tta") or ())
        final_need = max(
            final_need,
            final_seconds(per_image_s, refit_images, holdout_images, views, plan.max_final_epochs),
        )
        seconds = promotion_seconds(per_image_s, left_folds(run_dir, config), int(config["epochs"]), views)
        costs.append((trial_id, str(config["backbone"]), seconds))
    if not costs:
        return records
    workers = workers or Workers()
    count = promotions_that_fit(
        budget.left_s, [seconds for *_, seconds in costs], final_need, workers.at_once
    )
    where = f" ({workers.describe()})" if not workers.in_driver and count else ""
    say(describe_promotions(costs[:count], len(ranked), final_need) + where)
    screened_f1 = dict(ranked)
    chosen = costs[:count]
    started: dict[int, float] = {}
    stopped = False

    def start(index: int) -> Job | None:
        nonlocal stopped
        trial_id, _, planned_s = chosen[index]
        if not stopped and promotions_that_fit(budget.left_s, [planned_s], final_need) < 1:
            say(f"promote: trial {trial_id} not started: its ~{planned_s / 60:.1f} min no longer fit")
            stopped = True  # an earlier one overran: the final model's time is not given away
        if stopped:
            return None
        started[index] = time.monotonic()
        args = (data_root, search_dir, trial_id, space, cache_dir, progress)
        return Job(promote_trial, args, device=devices[trial_id])

    def done(index: int, outcome: Any) -> None:
        trial_id, _, planned_s = chosen[index]
        record: dict[str, Any] = {"trial_id": trial_id, "screened_oof_f1_tta": screened_f1[trial_id]}
        if isinstance(outcome, JobFailed):  # its screened run is as it was; the next promotion goes on
            say(f"promoting trial {trial_id} failed: {outcome.line}; its screened fold model stays")
            record.update(status="failed", error=outcome.line)
        else:
            record.update(status=outcome.status, oof_f1=outcome.oof_f1, oof_f1_tta=outcome.oof_f1_tta)
        record.update(planned_s=round(planned_s, 1), seconds=round(time.monotonic() - started[index], 1))
        records.append(record)
        write_text_atomic(json.dumps(records, indent=2, default=float), search_dir / PROMOTED_RECORD)
        budget.record()
        if on_promoted is not None:
            on_promoted(record)

    if workers.in_driver:
        use_the_search_threads(space)
    with billed(budget):
        run_jobs(workers, len(chosen), start, done)
    return records


def settled_promotions(
    search_dir: Path, on_promoted: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """``promoted.json``'s records, with any promotion a killed driver finished but did not record (its
    run folder promoted, no record yet) added from its ``result.json`` and written back."""
    from trainers.screened import was_promoted

    records = read_promoted(search_dir)
    known = {str(record.get("trial_id")) for record in records}
    found = []
    trials = search_dir / "trials"
    for run_dir in sorted(d for d in trials.iterdir() if d.is_dir()) if trials.is_dir() else ():
        if run_dir.name in known or not was_promoted(run_dir):
            continue
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except (OSError, ValueError):
            continue
        found.append(
            {
                "trial_id": run_dir.name,
                "status": result.get("status"),
                "oof_f1": result.get("oof_f1"),
                "oof_f1_tta": result.get("oof_f1_tta"),
                "recorded": "after a restart (its driver was stopped before it wrote this record)",
            }
        )
    if found:
        records += found
        write_text_atomic(json.dumps(records, indent=2, default=float), search_dir / PROMOTED_RECORD)
        for record in found:
            if on_promoted is not None:
                on_promoted(record)
    return records


def rank_screened(search_dir: Path) -> list[tuple[str, float]]:
    """(trial id, out-of-fold macro F1 with TTA) of every finished screen (a trial that trained all its
    epochs on fewer than k folds), best first; a screen cut by the budget or by ASHA is not promoted."""
    from orchestrator.ensemble.candidates import discover, left_out_by_search, oof_f1_tta, read_search_summary
    from trainers.config import folds_trained_of
    from trainers.screened import FINISHED

    candidates, _ = discover(search_dir, *left_out_by_search(read_search_summary(search_dir)))
    scored = []
    for candidate in candidates:
        try:
            result = json.loads((search_dir / "trials" / candidate.trial_id / "result.json").read_text())
        except (OSError, ValueError):
            continue
        config = result.get("config") or {}
        if result.get("status") not in FINISHED or folds_trained_of(config) >= int(config.get("k", 0)):
            continue
        scored.append((oof_f1_tta(candidate), candidate.trial_id))
    return [(trial_id, score) for score, trial_id in sorted(scored, key=lambda pair: -pair[0])]


def left_folds(run_dir: Path, config: dict) -> list[tuple[int, int]]:
    """(training images, validation images) of each fold the screen in ``run_dir`` did not train."""
    import pandas as pd

    from trainers.config import folds_trained_of

    fold_of = pd.read_csv(run_dir / "folds.csv", usecols=["fold"])["fold"].to_numpy()
    return fold_images(fold_of, range(folds_trained_of(config), int(config["k"])))


def promote_trial(
    data_root: Path,
    search_dir: Path,
    trial_id: str,
    space: SearchSpace,
    cache_dir: Path | None,
    progress: bool,
):
    """Train the folds the screen of ``trial_id`` left, in its own run folder (``trainers.fit``'s
    ``promote``): the FitResult. A promotion killed halfway leaves the screened run as it was, and a
    resumed search promotes it again from the resume state on this node's disk."""
    from orchestrator.refit import _check_trial, _read_data, _resolve_weights
    from trainers.cache import default_cache_dir
    from trainers.fit import fit
    from trainers.folds import read_folds
    from trainers.resume import local_resume_dir

    run_dir, cfg, _ = _check_trial(search_dir, trial_id, search_dir.name)
    folds = read_folds(run_dir / "folds.csv")
    data = _read_data(Path(data_root), search_dir, cfg, folds, trial_id)
    result = fit(
        dataclasses.replace(cfg, train_folds=0),
        data.drop(columns=["fold"]),
        folds,
        run_dir,
        Path(cache_dir) if cache_dir else default_cache_dir(),
        resolved_weights=_resolve_weights(cfg),
        log=print if progress else None,
        resume_dir=local_resume_dir(run_dir),
        promote=True,
    )
    if result.status == "diverged" and progress:  # the screened run stays as it was (fit keeps it)
        print(f"promoting trial {trial_id} stopped: {result.message}; its screened fold model stays")
    return result


def read_promoted(search_dir: Path) -> list[dict[str, Any]]:
    """``promoted.json``'s records ([] when the search promoted nothing)."""
    try:
        records = json.loads((Path(search_dir) / PROMOTED_RECORD).read_text())
    except (OSError, ValueError):
        return []
    return records if isinstance(records, list) else []
