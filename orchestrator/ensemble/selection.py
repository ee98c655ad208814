"""Choosing the members: which trials, and how many votes each, judged on out-of-fold probabilities only.

A functional core of plain NumPy (no torch, no MLflow, no files): every function takes arrays and returns
numbers or indices, so selection can be tested on made-up probabilities and re-run on any subset of rows
(e.g. to estimate, with nested cross-validation, how optimistic the selected ensemble's OOF F1 is).

Two methods, both on macro F1 of the per-row argmax (the competition's score):

- greedy forward selection with replacement (Caruana et al. 2004), the default: start from the best trial
  and keep adding whichever trial raises the ensemble's OOF F1 most; the counts are the vote weights;
- the N best trials with equal votes (``top``).

Candidates are ranked best first (ties: trial id) so that both methods are deterministic and the first
member is always the best single trial.

The selected ensemble's OOF F1 is in-sample: the votes were fitted on those same rows, so with many
candidates it flatters. ``nested_estimate`` scores the selection *procedure* instead: for each fold it
selects on the other folds' rows only and predicts that fold's rows with the result, so no row's
prediction was chosen by looking at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from trainers.labels import NUM_CLASSES
from trainers.metrics import confusion_matrix, macro_f1_present


class Candidate(Protocol):
    """What selection reads of a candidate trial (``candidates.Candidate`` is one): defined here, below the
    room that finds them, so the two never import each other."""

    trial_id: str
    probs: np.ndarray  # OOF probabilities without TTA
    probs_tta: np.ndarray  # with the trial's own TTA views
    own_tta: tuple[str, ...]
    partial: bool


DEFAULT_GREEDY_STEPS = 20  # picks at most; greedy selection usually stops far earlier


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """The competition score of the per-row argmax (any positive scaling of ``probs`` gives the same)."""
    predicted = np.asarray(probs).argmax(axis=1)
    return macro_f1_present(confusion_matrix(np.asarray(labels), predicted, NUM_CLASSES))


def greedy_selection(
    oof_probs: Sequence[np.ndarray], labels: np.ndarray, max_steps: int = DEFAULT_GREEDY_STEPS
) -> list[int]:
    """Counts per candidate: start from the best one, add (with replacement) whichever raises OOF F1 most.

    Stops when no addition improves the score or after ``max_steps`` picks. Ties go to the lower index, so
    order candidates best-first for a deterministic result. The ensemble is ``sum(count * probs)``.
    """
    if not oof_probs:
        raise ValueError("greedy_selection needs at least one candidate")
    counts = [0] * len(oof_probs)
    singles = [macro_f1(labels, probs) for probs in oof_probs]
    first = int(np.argmax(singles))
    counts[first] = 1
    total = np.array(oof_probs[first], dtype=np.float64)
    best = singles[first]
    for _ in range(max(0, max_steps - 1)):
        scores = [macro_f1(labels, total + probs) for probs in oof_probs]
        pick = int(np.argmax(scores))
        if not scores[pick] > best + 1e-12:
            break
        counts[pick] += 1
        total += oof_probs[pick]
        best = scores[pick]
    return counts


def soft_vote(weights: np.ndarray, probs: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the ``weights``-weighted sum of the members' ``probs``, in float64.

    Probabilities, never logits: heads and temperatures differ between trials.
    """
    return np.tensordot(weights, np.stack(probs).astype(np.float64), axes=1)


def top_selection(n_candidates: int, top: int) -> list[int]:
    """Counts per candidate (ordered best first): one vote each for the ``top`` first, none for the rest."""
    return [1 if i < top else 0 for i in range(n_candidates)]


def same_views(a: Sequence[str], b: Sequence[str]) -> bool:
    """TTA views average in probability space, so their order does not matter (repeats do)."""
    return sorted(a) == sorted(b)


def selection_probs(candidate: Candidate, tta: tuple[str, ...] | None) -> tuple[np.ndarray, bool]:
    """The stored OOF probabilities closest to the requested TTA, and whether they are exactly it."""
    if not tta and tta is not None:
        return candidate.probs, True
    views = candidate.own_tta if tta is None else tta
    # a partial trial's stored OOF has no TTA: a proxy for choosing, predicted again if it becomes a member
    exact = same_views(views, candidate.own_tta) and not (candidate.partial and views)
    return candidate.probs_tta, exact


def rank(single_f1: Sequence[float], trial_ids: Sequence[str]) -> list[int]:
    """Candidate indices best first: highest single OOF F1, ties broken by trial id."""
    return sorted(range(len(single_f1)), key=lambda i: (-single_f1[i], trial_ids[i]))


@dataclass
class Selection:
    """The candidates best first, what each was judged on, and how many votes each received."""

    candidates: list[Candidate]  # best single OOF F1 first (ties: trial id)
    probs: list[np.ndarray]  # each one's selection OOF probabilities on the judged rows
    exact: list[bool]  # whether ``probs`` were made with exactly the requested TTA
    single_f1: list[float]  # each one's OOF macro F1 alone
    method: str  # "greedy" or "top"
    counts: list[int]  # votes per candidate; the ensemble is sum(count * probs) / sum(counts)

    @property
    def chosen(self) -> list[int]:
        """Indices of the members (candidates with at least one vote), best first."""
        return [i for i, count in enumerate(self.counts) if count > 0]

    @property
    def total(self) -> int:
        return sum(self.counts)


def select(
    candidates: Sequence[Candidate],
    labels: np.ndarray,
    rows: np.ndarray,
    tta: tuple[str, ...] | None,
    top: int | None,
    greedy_steps: int = DEFAULT_GREEDY_STEPS,
) -> Selection:
    """Rank ``candidates`` on their OOF F1 over ``rows`` (``labels`` are those rows'), then give out votes:
    the ``top`` best once each, or greedily when ``top`` is None."""
    probs, exact = zip(*(selection_probs(c, tta) for c in candidates), strict=True)
    probs = [p[rows] for p in probs]
    single_f1 = [macro_f1(labels, p) for p in probs]
    order = rank(single_f1, [c.trial_id for c in candidates])
    probs = [probs[i] for i in order]
    if top is not None:
        method, counts = "top", top_selection(len(order), top)
    else:
        method, counts = "greedy", greedy_selection(probs, labels, max_steps=greedy_steps)
    return Selection(
        candidates=[candidates[i] for i in order],
        probs=probs,
        exact=[exact[i] for i in order],
        single_f1=[single_f1[i] for i in order],
        method=method,
        counts=counts,
    )


@dataclass
class NestedEstimate:
    """The selection procedure scored on rows it did not select on (see the module docstring)."""

    f1: float  # macro F1 of the pooled nested predictions: comparable with the in-sample OOF F1
    fold_f1: list[float]  # macro F1 on each outer fold's rows
    picks: list[list[str]]  # per outer fold, the trial ids that received votes


def nested_estimate(
    probs: Sequence[np.ndarray],
    labels: np.ndarray,
    fold: np.ndarray,
    trial_ids: Sequence[str],
    top: int | None,
    greedy_steps: int = DEFAULT_GREEDY_STEPS,
) -> NestedEstimate:
    """For each fold: rank and select on the other folds' rows, vote on this fold's rows; pooled F1.

    ``probs`` are the candidates' OOF probabilities (any order), ``fold`` each row's fold. The same ranking
    and selection as ``select`` (greedy, or the ``top`` best), so the figure describes what ``select`` does.
    """
    nested = np.zeros(np.shape(probs[0]), dtype=np.float64)
    fold_f1, picks = [], []
    for held_out in np.unique(fold):
        inner, outer = fold != held_out, fold == held_out
        single = [macro_f1(labels[inner], p[inner]) for p in probs]
        order = rank(single, trial_ids)
        if top is not None:
            counts = top_selection(len(order), top)
        else:
            counts = greedy_selection([probs[i][inner] for i in order], labels[inner], greedy_steps)
        weights = np.array(counts, dtype=np.float64) / sum(counts)
        nested[outer] = soft_vote(weights, [probs[i][outer] for i in order])
        fold_f1.append(macro_f1(labels[outer], nested[outer]))
        picks.append([trial_ids[order[j]] for j, count in enumerate(counts) if count])
    return NestedEstimate(f1=macro_f1(labels, nested), fold_f1=fold_f1, picks=picks)
