"""How a search with a time budget spends it: screen configurations cheaply, then train the chosen one.

A k-fold trial costs k models' compute. Under a budget that is far short of "every configuration trained to
convergence on k folds" (most nights on a GPU node, every CPU budget) spending it that way leaves every
model unconverged, and one model trained on all persons with the same compute beats the whole search
(BENCHMARKS.md, "The 30-minute CPU preset"). A strong practitioner splits the budget instead:

1. **screen**: each configuration trains only its first ``screen_folds`` fold(s) (``train_folds`` in the
   trial's config: one fold of three is a third of the compute), judged by ASHA and Optuna as usual, until
   ``1 - final_share`` of the budget is spent; no configuration starts that cannot finish its screen in
   that time (measured on the configurations already screened);
2. **promote**: when the time left holds more than the final model needs at its epoch cap
   (``max_final_epochs``: a GPU node's night, not a CPU half-hour), the best ``promote_top`` screens, in the
   order of their screened out-of-fold F1, train their other folds for the same epochs, their screened
   fold models reused (``orchestrator.search.promote``): successive halving's rung over folds, as many as
   the measured cost affords after the final model's share;
3. **final**: the best configuration is refit on every training person for as many epochs as the
   rest of the budget holds, measured from the screen's own seconds per image (not a guess, not the
   screen's few epochs), so the budget ends with a model trained to the end of its schedule; when its
   runs converged (``converged_epochs``: a long screen or a promoted run on a GPU node), for the epochs
   that converged instead, from scratch, the time left training more seeds. Unconverged, one model trains
   at most ``max_final_epochs``; a final phase that holds more is shared evenly by ``final_models``
   models, the next best finished screens' each continued from its screened fold model (more
   configurations in the vote rather than epochs of one that no run showed to pay).

``make ensemble`` then votes the screened fold models with the final model where the holdout persons say
it helps (``ensemble.refit_mix``). Without a time budget the plan is not used: every trial trains all k
folds. This module is the arithmetic only (no Ray, no torch): the space's ``plan`` section, the cost
model, and the lines the search prints.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Scoring an image costs about a third of training on it (a forward pass, no backward pass, no
# optimizer step); the cost model counts a validation image as this share of a training image.
VALIDATION_COST = 1 / 3
# What the final phase keeps back for predicting the holdout persons and writing the record, as a share of
# the time it has (on top of the predicted holdout pass), so the refit ends inside the budget.
FINAL_MARGIN = 0.05
MIN_FINAL_EPOCHS = 0.5  # less is not worth the final model's start-up and holdout pass
# A run whose mean validation F1 has not gained for this many epochs after its best has converged: the final
# model then trains its folds' mean best epoch from scratch (as ``foldtune refit`` does) rather than all the
# budget holds. A two-epoch CPU screen never shows it (its best is at most one epoch before its end).
CONVERGED_AFTER = 2
# ``pack_final`` tries every way to place the waiting final models in the slots up to this many; past it
# (more final models than a space's max_final_seeds would give on a few slots) each gets an even share
MAX_PACKINGS = 50_000
PLAN_KEYS = ("screen_folds", "final_share", "max_final_epochs", "max_final_seeds", "promote_top")


class PlanError(ValueError):
    """A ``plan`` section a user must fix (raised as the space's error with the key named)."""


@dataclass(frozen=True)
class Plan:
    """The space's ``plan`` section: how many folds a screened configuration trains, and the share of the
    budget kept for the final model."""

    screen_folds: int = 1
    final_share: float = 0.5
    # a budget larger than the final model needs is not spent on epochs no run showed to pay: the final
    # model trains at most this many; past them the time is shared by up to max_final_seeds final models
    # (converged: seeds of the chosen one, from scratch; else the best finished screens, each continued)
    max_final_epochs: int = 30
    max_final_seeds: int = 3
    # when the final phase holds more than the final model at max_final_epochs, the best screened
    # configurations (up to this many) are first confirmed on all k folds, their screened folds reused
    promote_top: int = 3

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_plan(raw: Any, k: int, set_fields: Collection[str] = ()) -> Plan | None:
    """The ``plan`` mapping of a space file (None when absent or ``none``); PlanError names the bad key.
    ``set_fields``: the TrainConfig fields the space fixes or searches (the plan sets ``train_folds``)."""
    if raw is None or raw == "none":
        return None
    if "train_folds" in set_fields:
        raise PlanError("sets train_folds for the screen itself; take train_folds out of fixed and search")
    if not isinstance(raw, Mapping) or set(map(str, raw)) - set(PLAN_KEYS):
        raise PlanError(f"must be 'none' or a mapping with keys {list(PLAN_KEYS)}, got {raw!r}")
    folds = raw.get("screen_folds", 1)
    share = raw.get("final_share", 0.5)
    if isinstance(folds, bool) or not isinstance(folds, int) or not 1 <= folds < k:
        raise PlanError(f"screen_folds must be a whole number from 1 to k-1={k - 1}, got {folds!r}")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < float(share) < 1:
        raise PlanError(f"final_share must be a share of the budget above 0 and below 1, got {share!r}")
    caps = {key: raw.get(key, getattr(Plan, key)) for key in PLAN_KEYS[2:]}
    for key, value in caps.items():
        least = 0 if key == "promote_top" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise PlanError(f"{key} must be a whole number of at least {least}, got {value!r}")
    return Plan(screen_folds=folds, final_share=float(share), **caps)


@dataclass(frozen=True)
class Phases:
    """The wall-clock seconds of each phase of one driver's budget (what is left of it when it starts)."""

    screen_s: float
    final_s: float


def split_budget(plan: Plan, left_s: float) -> Phases:
    """The screen gets ``1 - final_share`` of what is left, the final model the rest."""
    final = left_s * plan.final_share
    return Phases(screen_s=left_s - final, final_s=final)


def seconds_per_image(epoch_seconds: float, train_images: int, val_images: int) -> float:
    """A training image's seconds on this hardware, from one measured epoch of a screened fold (its
    training images plus its validation images at ``VALIDATION_COST`` each)."""
    work = train_images + VALIDATION_COST * val_images
    return float(epoch_seconds) / work if work > 0 else math.nan


def final_epochs(
    left_s: float,
    per_image_s: float,
    train_images: int,
    holdout_images: int,
    views: int,
    max_epochs: int = Plan.max_final_epochs,
) -> float:
    """How many epochs of the final model on ``train_images`` fit in ``left_s`` (at most ``max_epochs``),
    after its holdout pass (``views`` TTA passes plus the plain one) and ``FINAL_MARGIN``, in tenths of an
    epoch: the schedule ends within the last epoch rather than leave most of an epoch's time unused (the
    final model continues a screened one, so even part of an epoch helps); 0 below ``MIN_FINAL_EPOCHS``."""
    if not (per_image_s > 0 and math.isfinite(per_image_s)) or train_images <= 0:
        return 0
    usable = left_s * (1 - FINAL_MARGIN) - _holdout_s(per_image_s, holdout_images, views)
    epochs = min(float(max_epochs), math.floor(10 * usable / (per_image_s * train_images)) / 10)
    return epochs if epochs >= MIN_FINAL_EPOCHS else 0


def final_seeds(
    left_s: float,
    per_image_s: float,
    train_images: int,
    holdout_images: int,
    views: int,
    epochs: float,
    max_seeds: int = Plan.max_final_seeds,
) -> int:
    """How many final models of ``epochs`` each fit in ``left_s`` one after another (at least 1, at most
    ``max_seeds``): the time a capped final model leaves is spent on more seeds of it, not left idle."""
    one = final_seconds(per_image_s, train_images, holdout_images, views, epochs)
    if not (one > 0 and math.isfinite(one)):
        return 1
    return max(1, min(int(max_seeds), math.floor(left_s * (1 - FINAL_MARGIN) / one)))


def final_models(fit_epochs: float, max_epochs: int, max_models: int = Plan.max_final_seeds) -> int:
    """How many final models share the final phase when the runs do not show convergence: one while the
    time left holds at most ``max_epochs`` of it; past that cap the time is split evenly among
    ``ceil(fit_epochs / max_epochs)`` models (at most ``max_models``), each continuing a screened fold model,
    rather than spend it all on epochs of one model that no run showed to pay (BENCHMARKS.md: at equal
    compute past the cap, models of more configurations in the vote beat more epochs of one)."""
    if not (math.isfinite(fit_epochs) and fit_epochs > max_epochs > 0):
        return 1
    return max(1, min(int(max_models), math.ceil(fit_epochs / max_epochs)))


@dataclass(frozen=True)
class FinalJob:
    """A final model waiting to start, as ``pack_final`` sees it: the seconds it needs to reach its epoch
    cap (``final_cap_seconds``: every seed, holdout passes included) and its seeds (shares are per seed)."""

    cap_s: float
    seeds: int = 1


def final_cap_seconds(
    per_image_s: float, train_images: int, holdout_images: int, views: int, max_epochs: int, seeds: int = 1
) -> float:
    """The share of the time left in which ``final_epochs`` gives each of ``seeds`` models ``max_epochs``."""
    one = final_seconds(per_image_s, train_images, holdout_images, views, max_epochs) / (1 - FINAL_MARGIN)
    return seeds * one * (1 + 1e-6)  # the tenths ``final_epochs`` floors to reach the cap itself


def pack_final(
    left_s: float, busy_s: Sequence[float], at_once: int, waiting: Sequence[FinalJob]
) -> tuple[int, float]:
    """(which of ``waiting``, in rank order, starts in the slot free now; the seconds it may take).

    Why not an even share: final models train ``at_once`` at a time and none moves to another slot once
    started, so the time a model leaves (it reached ``max_final_epochs``, a cheaper backbone) is lost to its
    slot unless the plan knew it when it gave out the shares (the 2-core T=30 run idled a slot for 5.7 of
    its 17.8 min). So every placement of the waiting models in the slots is tried: this one (free for
    ``left_s``), the other free ones (the next models start there now) and those still busy for
    ``busy_s`` (free for what is left after). In a slot, models at their cap take what it needs and the
    rest share the remainder evenly per seed. The placement that trains most wins; ties go to the fairest
    (the least share of its cap), then to shares in rank order. Of this slot's models, one that reaches
    its cap starts first (the others are re-planned from what it really took), else the best ranked."""
    if not waiting:
        raise ValueError("pack_final needs at least one waiting final model")
    free_others = max(0, at_once - 1 - len(busy_s))
    capacities = [left_s] * (1 + free_others) + [max(0.0, left_s - b) for b in busy_s]
    if 1 + free_others >= len(waiting):  # a free slot each: each takes all it can use
        return 0, min(left_s, waiting[0].cap_s)
    if len(capacities) ** len(waiting) > MAX_PACKINGS:  # an even share of the slots' time, per seed
        seeds = sum(job.seeds for job in waiting)
        return 0, min(left_s, sum(capacities) * waiting[0].seeds / seeds)
    best_key, best_shares, best_slots = None, [], ()
    for slots in itertools.product(range(len(capacities)), repeat=len(waiting)):
        if 0 not in slots:  # the slot free now starts one of them
            continue
        shares = [0.0] * len(waiting)
        for slot, capacity in enumerate(capacities):
            members = [j for j, placed in enumerate(slots) if placed == slot]
            for j, share in zip(members, _fill(capacity, [waiting[j] for j in members]), strict=True):
                shares[j] = share
        key = (
            round(sum(shares)),
            round(min(share / job.cap_s for share, job in zip(shares, waiting, strict=True)), 3),
            tuple(round(share / job.seeds) for share, job in zip(shares, waiting, strict=True)),
        )
        if best_key is None or key > best_key:
            best_key, best_shares, best_slots = key, shares, slots
    here = [j for j, slot in enumerate(best_slots) if slot == 0]
    at_cap = [j for j in here if best_shares[j] >= waiting[j].cap_s]
    pick = (at_cap or here)[0]
    return pick, best_shares[pick]


def _fill(capacity: float, jobs: Sequence[FinalJob]) -> list[float]:
    """Shares of one slot's ``capacity``: water-filling per seed, each job at most its ``cap_s``."""
    shares = [0.0] * len(jobs)
    room, seeds = capacity, sum(job.seeds for job in jobs)
    for j in sorted(range(len(jobs)), key=lambda j: jobs[j].cap_s / jobs[j].seeds):
        shares[j] = min(jobs[j].cap_s, room * jobs[j].seeds / seeds)
        room, seeds = room - shares[j], seeds - jobs[j].seeds
    return shares


def converged_epochs(best_epoch: int, epochs_trained: int, fold_best_epochs: Sequence[int]) -> int | None:
    """The folds' rounded mean best epoch when the run converged (no mean F1 gain for ``CONVERGED_AFTER``
    epochs after its best epoch); None when it may still gain (the final model trains what the time holds)."""
    if not fold_best_epochs or epochs_trained - best_epoch < CONVERGED_AFTER:
        return None
    return max(1, math.floor(sum(fold_best_epochs) / len(fold_best_epochs) + 0.5))


def final_seconds(
    per_image_s: float, train_images: int, holdout_images: int, views: int, epochs: float
) -> float:
    """One final model of ``epochs`` on ``train_images``, with its holdout pass, at the measured cost."""
    return per_image_s * train_images * epochs + _holdout_s(per_image_s, holdout_images, views)


def promotion_seconds(
    per_image_s: float, fold_images: Sequence[tuple[int, int]], epochs: int, views: int
) -> float:
    """Training the folds a screen left (their (training, validation) images) for ``epochs``, then their
    out-of-fold pass with ``views`` TTA views: what promoting one screened configuration costs."""
    train = sum(images for images, _ in fold_images)
    val = sum(images for _, images in fold_images)
    return per_image_s * ((train + VALIDATION_COST * val) * epochs + VALIDATION_COST * val * (1 + views))


def promotions_that_fit(left_s: float, costs: Sequence[float], final_need_s: float, at_once: int = 1) -> int:
    """How many of the best screened configurations, in rank order (``costs``: each one's promotion),
    are promoted, ``at_once`` at a time (one per GPU; each starts when the earliest running one ends), and
    still leave ``final_need_s`` for the final model at its cap: the final model is where the compute pays
    first (BENCHMARKS.md), promotion gets only what it leaves."""
    spare = left_s * (1 - FINAL_MARGIN) - final_need_s
    ends = [0.0] * max(1, at_once)  # when each slot is free again
    count = 0
    for cost in costs:
        slot = ends.index(min(ends))
        if not (math.isfinite(cost) and cost > 0) or ends[slot] + cost > spare:
            break
        ends[slot] += cost
        count += 1
    return count


def _holdout_s(per_image_s: float, holdout_images: int, views: int) -> float:
    return per_image_s * VALIDATION_COST * holdout_images * (1 + views)


def describe_plan(plan: Plan, phases: Phases, k: int) -> str:
    """The line a planned search prints when it starts."""
    fold_word = "fold" if plan.screen_folds == 1 else "folds"
    return (
        f"plan: screen configurations on {plan.screen_folds} {fold_word} of {k} for "
        f"{phases.screen_s / 60:.1f} min, then train the best one on every training person for the last "
        f"{phases.final_s / 60:.1f} min (epochs from the screen's measured seconds per image; past "
        f"{plan.max_final_epochs} epochs the next best finished screens share that time)"
    )


def describe_final(
    trial_id: str,
    backbone: str,
    epochs: float,
    per_image_s: float,
    train_images: int,
    left_s: float,
    seeds: int = 1,
) -> str:
    """The re-plan line printed when the screen ends: the final model's epochs from the measured cost."""
    epoch_s = per_image_s * train_images
    models = f"{seeds} seed models of " if seeds > 1 else ""
    return (
        f"final: trial {trial_id} ({backbone}) on {train_images} training images, {models}{epochs:g} "
        f"epoch(s) of ~{epoch_s:.0f} s (measured {per_image_s * 1000:.1f} ms per image) in the "
        f"{left_s / 60:.1f} min left"
    )


def describe_promotions(
    chosen: Sequence[tuple[str, str, float]], candidates: int, final_need_s: float
) -> str:
    """The line printed when the screen ends: which screened configurations are confirmed on all k folds
    ((trial id, backbone, seconds) each), or why none is."""
    if not chosen:
        return (
            f"promote: none of the {candidates} screened configuration(s): the final model at its epoch cap "
            f"(~{final_need_s / 60:.1f} min) takes the time left"
        )
    listed = ", ".join(
        f"{trial} ({backbone}, ~{seconds / 60:.1f} min)" for trial, backbone, seconds in chosen
    )
    return (
        f"promote: {len(chosen)} of {candidates} screened configuration(s) confirmed on all folds, their "
        f"screened folds reused: {listed}; then the final model (~{final_need_s / 60:.1f} min at its cap)"
    )
