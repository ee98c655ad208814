"""Refit models in the vote: found for the members, and weighed against their fold models on the holdout.

A member's refit models (``foldtune refit``, or a planned search's final model: ``search.final``) saw every
training person; its fold models each saw (k-1)/k of them, and in a planned search only its screened
fold(s), for a few epochs. How much each should count is not known beforehand, so with the default
(``with_refit`` None, "auto") the holdout persons decide among three votes of the same members:

- ``folds``: the fold models only (as without refit models);
- ``folds+refit``: every model of the member counts once (``--with-refit``'s vote);
- ``refit``: the refit models only, for the members that have them.

The best holdout macro F1 wins (ties: the order above, the simpler vote first). Choosing among three on the
holdout makes its figure slightly optimistic; the report gives all three so a user can see the margin.
Without holdout persons there is nothing to decide on: refit models join as ``folds+refit`` (a planned
search's final model is the bulk of its compute). ``--with-refit`` forces ``folds+refit`` and fails when no
member has refit models; ``--without-refit`` leaves them out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from orchestrator.ensemble.estimates import Holdout
from orchestrator.ensemble.members import Predicted
from orchestrator.ensemble.selection import Selection, macro_f1, soft_vote
from orchestrator.errors import OrchestratorError

MIXES = ("folds", "folds+refit", "refit")
FORCED = "folds+refit"  # --with-refit


def refit_members(
    search_dir: Path, selection: Selection, with_refit: bool | None, log: Callable[[str], None]
) -> tuple[Selection, dict[str, list[Path]]]:
    """The members with any left-out trial that has refit models joined (``join_refit_trials``), and each
    member's refit models (``find_refit``)."""
    selection = join_refit_trials(search_dir, selection, with_refit, log)
    return selection, find_refit(search_dir, selection, with_refit)


def find_refit(search_dir: Path, selection: Selection, with_refit: bool | None) -> dict[str, list[Path]]:
    """Each member's refit models: none with ``with_refit`` False; those on disk with None (auto); with
    True, an error naming the command to run when no member has any."""
    if with_refit is False:
        return {}
    from orchestrator.refit import refit_models

    found = {
        selection.candidates[i].trial_id: refit_models(search_dir, selection.candidates[i].trial_id)
        for i in selection.chosen
    }
    if with_refit and not any(found.values()):
        first = selection.candidates[selection.chosen[0]].trial_id
        raise OrchestratorError(
            f"--with-refit: no member has refit models in {search_dir / 'refit'}; run `foldtune refit "
            f"--search {search_dir.name} --trial {first}` first, or leave --with-refit out"
        )
    return {trial: paths for trial, paths in found.items() if paths}


def join_refit_trials(
    search_dir: Path, selection: Selection, with_refit: bool | None, log: Callable[[str], None]
) -> Selection:
    """Greedy selection's members plus, with one vote each, the candidates it left out that have refit
    models (a planned search's final models: ``search.final``): they are where most of the search's
    compute went, and greedy selection judged only their screened fold model. Not with ``--top`` (the
    members are then what was asked for) nor ``--without-refit``."""
    if with_refit is False or selection.method != "greedy":
        return selection
    from orchestrator.refit import refit_models

    counts = list(selection.counts)
    for i, candidate in enumerate(selection.candidates):
        if counts[i] == 0 and refit_models(search_dir, candidate.trial_id):
            counts[i] = 1
            log(
                f"trial {candidate.trial_id} joins the vote (one vote): it has refit models, which greedy "
                "selection on the screened out-of-fold predictions never saw"
            )
    return dataclasses.replace(selection, counts=counts)


def mixed(kfold: np.ndarray, refit: np.ndarray | None, n_folds: int, n_refit: int, mix: str) -> np.ndarray:
    """One member's probabilities under ``mix`` (a member without refit models votes with its folds)."""
    if refit is None or mix == "folds":
        return kfold
    if mix == "refit":
        return refit
    return (n_folds * kfold + n_refit * refit) / (n_folds + n_refit)


def choose_mix(
    weights: np.ndarray,
    kfold: Sequence[np.ndarray],
    refit: Sequence[np.ndarray | None],
    counts: Sequence[tuple[int, int]],
    holdout_labels: np.ndarray,
    n_eval: int,
) -> tuple[str, dict[str, float]]:
    """(the mix with the best holdout macro F1, every mix's figure). ``kfold`` and ``refit`` are each
    member's probabilities on the eval images followed by the holdout images; ``counts`` its (fold models,
    refit models)."""
    scores = {}
    for mix in MIXES:
        holdout = [
            mixed(k[n_eval:], None if r is None else r[n_eval:], nf, nr, mix)
            for k, r, (nf, nr) in zip(kfold, refit, counts, strict=True)
        ]
        scores[mix] = macro_f1(holdout_labels, soft_vote(weights, holdout))
    best = max(MIXES, key=lambda mix: (scores[mix], -MIXES.index(mix)))
    return best, scores


def weigh_refit(
    predicted: Predicted, with_refit: bool | None, holdout: Holdout, n_eval: int, log: Callable[[str], None]
) -> None:
    """Auto (``with_refit`` None) with holdout persons: the vote of fold and refit models they score best;
    else every model counts once (``FORCED``). Sets each member's eval and holdout probabilities."""
    mix = FORCED
    if with_refit is None and len(holdout):
        weights = np.array([m.weight for m in predicted.members], dtype=np.float64)
        mix, scores = choose_mix(
            weights, predicted.kfold_all, predicted.refit_all, predicted.model_counts, holdout.label, n_eval
        )
        predicted.refit_mix_holdout = scores
        log(describe_choice(mix, scores, holdout.persons))
    apply_mix(predicted, mix, n_eval)


def apply_mix(predicted: Predicted, mix: str, n_eval: int) -> None:
    """Each member's eval and holdout probabilities as the vote ``mix`` combines its fold and refit models."""
    for i, (kfold, refit, (n_folds, n_refit)) in enumerate(
        zip(predicted.kfold_all, predicted.refit_all, predicted.model_counts, strict=True)
    ):
        probs = mixed(kfold, refit, n_folds, n_refit, mix)
        predicted.eval[i], predicted.holdout[i] = probs[:n_eval], probs[n_eval:]
    predicted.refit_mix = mix


def describe_choice(mix: str, scores: dict[str, float], holdout_persons: int) -> str:
    """The line the ensemble prints about its choice."""
    figures = ", ".join(f"{m} {scores[m]:.4f}" for m in MIXES)
    return (
        f"refit models: the vote '{mix}' has the best holdout macro F1 on {holdout_persons} persons "
        f"({figures}); chosen on the holdout, so its holdout figure is slightly optimistic"
    )
