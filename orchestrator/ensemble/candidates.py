"""Finding the trials an ensemble can be made of: what the search recorded, what is on disk, what agrees.

A search folder holds one folder per trial under ``trials/``, in every state a search can leave it: finished,
failed, diverged, pruned (its checkpoints deleted), stopped early by ASHA, cut by the time budget, or still
running. Every trial that trained at least one epoch on every fold is a candidate: a finished one with its
``oof.npz``, an unfinished one (``partial``) with the OOF probabilities of its best epoch, which each fold
checkpoint carries; greedy selection decides whether it helps. Every other trial is named with the reason
it is left out, so a surprising selection can be explained. Pruned trials (OOF kept, checkpoints deleted)
can be listed too, to say when one would have been picked.

Candidates are then checked to agree on the images, folds, labels and classes they were trained on: their
OOF probabilities are added row by row, which is only meaningful when row i is the same image, held out of
the same fold, with the same label, in every trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from orchestrator.errors import OrchestratorError
from trainers.labels import AgeBands, class_names

FAILED_STATUSES = frozenset({"diverged", "failed", "error", "errored"})
OOF_ARRAYS = ("rel_path", "label", "fold", "probs", "probs_tta")
PRUNED = "no checkpoints (pruned: outside the search's top K)"
NO_EPOCH = "no checkpoints and no out-of-fold predictions: it ended before every fold finished an epoch"


@dataclass
class Candidate:
    """A trial whose OOF probabilities and fold checkpoints are all there (or, pruned, only its OOF)."""

    trial_id: str
    run_dir: Path
    config: dict
    status: str
    checkpoints: list[Path]
    rel_path: np.ndarray
    label: np.ndarray
    fold: np.ndarray
    probs: np.ndarray  # OOF, no TTA (float32)
    probs_tta: np.ndarray  # OOF with the trial's own ``tta`` (float32); a partial trial's: without TTA
    partial: bool = False  # unfinished (stopped early, cut, interrupted): OOF of its best epoch, no TTA
    checkpoints_kept: bool = True  # False: pruned by keep_top; an OOF record only, not a possible member

    @property
    def own_tta(self) -> tuple[str, ...]:
        return tuple(self.config.get("tta") or ())


def read_search_summary(search_dir: Path) -> dict:
    """What the search recorded about itself: ``summary.json`` (written when it ends) laid over
    ``tracking.json`` (written when it starts), or {} for a bare folder of trials.

    Keys used here: ``tracking_uri``, ``experiment_name``, ``parent_run_id`` and ``trials`` (each with
    ``trial_id`` and ``status``).
    """
    record: dict = {}
    for name in ("tracking.json", "summary.json"):
        path = search_dir / name
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise OrchestratorError(
                f"{path} is unreadable ({error}); restore it, or delete it to ensemble from trials/ alone"
            ) from None
        if isinstance(values, dict):
            record.update(values)
    return record


def left_out_by_search(summary: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Why the search itself leaves trials out: (failed, stopped early by ASHA), trial id -> reason.

    A failed trial's folder may still hold files from an earlier attempt; a stopped one has no result.
    """
    failed, stopped = {}, {}
    for trial in summary.get("trials") or []:
        if not isinstance(trial, dict):
            continue
        trial_id = str(trial.get("trial_id"))
        if trial.get("status") == "failed":
            failed[trial_id] = f"failed in the search ({trial.get('error') or 'error'})"
        elif trial.get("status") == "stopped_early":
            after = f" after {trial['epochs']} epoch(s)" if trial.get("epochs") else ""
            stopped[trial_id] = f"stopped early by ASHA{after}: a weak trial"
    return failed, stopped


def discover(
    search_dir: Path,
    failed: dict[str, str],
    stopped: dict[str, str] | None = None,
    with_pruned: bool = False,
) -> tuple[list[Candidate], dict[str, str]]:
    """Every usable trial under ``trials/`` and, for the others, why they are left out.

    ``with_pruned`` also returns trials whose checkpoints were pruned but whose OOF probabilities are kept
    (``checkpoints_kept`` False); they are never members, but selection can say one would have been picked.
    """
    trials_dir = search_dir / "trials"
    if not trials_dir.is_dir():
        raise OrchestratorError(
            f"{search_dir} has no trials/ folder: it is not a foldtune search (or it never started a trial); "
            "run `foldtune search` first or check --search/--storage"
        )
    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    for run_dir in sorted(p for p in trials_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        trial_id = run_dir.name
        if trial_id in failed:
            skipped[trial_id] = failed[trial_id]
            continue
        found = _read_trial(run_dir, stopped or {}, with_pruned)
        if isinstance(found, str):
            skipped[trial_id] = found
        else:
            candidates.append(found)
    if not any(c.checkpoints_kept for c in candidates):
        for pruned in candidates:
            skipped[pruned.trial_id] = PRUNED
        skipped = dict(sorted(skipped.items()))
        why = "\n".join(f"  {trial}: {reason}" for trial, reason in list(skipped.items())[:50]) or "  (none)"
        raise OrchestratorError(
            f"no trial with out-of-fold predictions and all fold checkpoints in {trials_dir}:\n"
            f"{why}\n"
            "let the search finish (`foldtune search --resume`) or re-run it"
        )
    return candidates, skipped


def _read_trial(run_dir: Path, stopped: dict[str, str], with_pruned: bool = False) -> Candidate | str:
    """One trial folder as a candidate, or the reason it cannot be one."""
    trial_id = run_dir.name
    found = _trial_config(run_dir, stopped)
    if isinstance(found, str):
        return found
    config, status = found
    from trainers.config import folds_trained_of  # inside: trainers.config brings torch

    k, trained = int(config.get("k", 0)), folds_trained_of(config)
    checkpoints = [run_dir / "checkpoints" / f"fold{i}.pt" for i in range(trained)]
    missing = [p.name for p in checkpoints if not p.is_file()]
    oof_path = run_dir / "oof.npz"
    pruned = len(missing) == trained
    if pruned and not (with_pruned and oof_path.is_file()):
        return PRUNED if oof_path.is_file() else NO_EPOCH  # keep_top leaves a pruned trial's OOF record
    if missing and not pruned:
        if status in ("unfinished", "stopped_early"):
            why = f"stopped before every fold finished an epoch ({', '.join(missing)} missing)"
            return f"{stopped[trial_id]}; {why}" if trial_id in stopped else why
        return f"checkpoints {', '.join(missing)} missing in {run_dir / 'checkpoints'}"
    arrays = _read_oof(run_dir, k, trained, status, pruned)
    if isinstance(arrays, str):
        return arrays
    order = np.argsort(arrays["rel_path"], kind="stable")  # one shared image order for every trial
    return Candidate(
        trial_id=trial_id,
        run_dir=run_dir,
        config=config,
        status=status,
        checkpoints=checkpoints,
        rel_path=arrays["rel_path"].astype(str)[order],
        label=arrays["label"].astype(np.int64)[order],
        fold=arrays["fold"].astype(np.int64)[order],
        probs=arrays["probs"].astype(np.float32)[order],  # as stored; sums are taken in float64
        probs_tta=arrays["probs_tta"].astype(np.float32)[order],
        partial=bool(arrays.get("partial", False)),
        checkpoints_kept=not pruned,
    )


def _trial_config(run_dir: Path, stopped: dict[str, str]) -> tuple[dict, str] | str:
    """The trial's config and how it ended: fit's ``result.json`` when it finished, else its
    ``config.yaml`` (written when it started) with status "stopped_early" or "unfinished"."""
    result_path = run_dir / "result.json"
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
            config, status = dict(result["config"]), str(result.get("status", ""))
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"{result_path} is unreadable ({error})"
        return (config, status) if status not in FAILED_STATUSES else f"status {status}"
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        return stopped.get(run_dir.name, "no result.json or config.yaml (it never started training)")
    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as error:
        return f"{config_path} is unreadable ({error})"
    if not isinstance(config, dict):
        return f"{config_path} is not a trial config"
    return config, "stopped_early" if run_dir.name in stopped else "unfinished"


def _read_oof(
    run_dir: Path, k: int, trained: int, status: str, pruned: bool = False
) -> dict[str, np.ndarray] | str:
    """``oof.npz``, or for an unfinished trial the OOF arrays rebuilt from its fold checkpoints (also when
    a partial ``oof.npz`` was saved before but the checkpoints are there: they may have moved on since)."""
    path = run_dir / "oof.npz"
    if path.is_file() and not (status in ("unfinished", "stopped_early") and not pruned):
        try:
            with np.load(path, allow_pickle=False) as oof:
                arrays = {key: oof[key] for key in OOF_ARRAYS}
                if "partial" in oof.files:
                    arrays["partial"] = oof["partial"]
            return arrays
        except (OSError, ValueError, KeyError) as error:
            return f"{path} is unreadable ({error})"
    if status not in ("unfinished", "stopped_early"):
        return "no oof.npz (stopped before its out-of-fold predictions were written)"
    from trainers.errors import FoldtuneError
    from trainers.run_outputs import assemble_out_of_fold  # torch: only for unfinished trials

    try:
        return assemble_out_of_fold(run_dir, k, trained)
    except (OSError, ValueError, KeyError, FoldtuneError) as error:
        return f"no out-of-fold predictions: {error}"


def most_folds(
    candidates: list[Candidate], skipped: dict[str, str]
) -> tuple[list[Candidate], dict[str, str]]:
    """The candidates with the most fold models, and ``skipped`` with the others added (and why).

    In a planned search that promoted its best screens to all k folds (``search.promote``), the screens it
    did not promote lost that round of successive halving: the vote is among the promoted trials, judged
    on every person's out-of-fold prediction rather than one fold's (and one vote's fold models must be
    of one count). Without promotion every candidate has the same count and nothing changes. The count is
    the most among candidates that kept their checkpoints (a pruned one's OOF cannot vote)."""
    most = max((len(c.checkpoints) for c in candidates if c.checkpoints_kept), default=0)
    kept = []
    for candidate in candidates:
        if len(candidate.checkpoints) < most:
            skipped[candidate.trial_id] = (
                f"screened on {len(candidate.checkpoints)} fold(s), not promoted to all {most}"
            )
        else:
            kept.append(candidate)
    return kept, skipped


def check_same_split(candidates: list[Candidate]) -> None:
    """All members must share one fold file and labels, or the OOF estimate mixes seen and unseen images."""
    reference = candidates[0]
    for other in candidates[1:]:
        pair = f"trials {reference.trial_id} and {other.trial_id}"
        if len(other.rel_path) != len(reference.rel_path) or not np.array_equal(
            other.rel_path, reference.rel_path
        ):
            differ = sorted(set(other.rel_path.tolist()) ^ set(reference.rel_path.tolist()))
            raise OrchestratorError(
                f"{pair} were trained on different images ({len(differ)} differ, e.g. {differ[:3]}); "
                "ensemble "
                "trials of one data set and fold file only (one search, or move the other trial out)"
            )
        if not np.array_equal(other.fold, reference.fold):
            bad = np.flatnonzero(other.fold != reference.fold)
            example = reference.rel_path[bad[0]]
            raise OrchestratorError(
                f"{pair} use different fold files ({len(bad)} images differ, e.g. {example}: fold "
                f"{reference.fold[bad[0]]} vs {other.fold[bad[0]]}); their out-of-fold predictions cannot be "
                "combined: ensemble trials that share one fold file (same k and folds_seed)"
            )
        if not np.array_equal(other.label, reference.label):
            bad = np.flatnonzero(other.label != reference.label)
            raise OrchestratorError(
                f"{pair} were trained with different labels ({len(bad)} images, e.g. "
                f"{reference.rel_path[bad[0]]}:"
                f" {reference.label[bad[0]]} vs {other.label[bad[0]]}); a different relabel overlay or "
                "age_edges: ensemble trials trained on the same labels only"
            )


def shared_class_names(candidates: list[Candidate]) -> list[str]:
    """The 18 class names every candidate predicts; trials with other age bands have other classes."""
    age_edges = [tuple(c.config.get("age_edges", (30, 60))) for c in candidates]
    if len(set(age_edges)) > 1:
        raise OrchestratorError(
            f"the trials use different age_edges {sorted(set(age_edges))}; their classes differ"
        )
    return class_names(AgeBands(age_edges[0]))


def oof_f1_tta(candidate: Candidate) -> float:
    """A candidate's out-of-fold macro F1 with its TTA, on its out-of-fold rows only (holdout rows, if its
    OOF file lists them, are not out-of-fold): what the planned search ranks trials by."""
    from orchestrator.ensemble.selection import macro_f1
    from trainers.folds import HOLDOUT_FOLD

    rows = candidate.fold != HOLDOUT_FOLD
    return macro_f1(candidate.label[rows], candidate.probs_tta[rows])


def selection_f1(run_dir: Path) -> float | None:
    """What the ensemble ranks a trial by: the macro F1 of its stored OOF probabilities (with its own TTA
    when it finished), or None when it cannot be a candidate."""
    from orchestrator.ensemble.selection import macro_f1

    found = _read_trial(Path(run_dir), {}, with_pruned=True)
    if isinstance(found, str):
        return None
    return macro_f1(found.label, found.probs_tta)
