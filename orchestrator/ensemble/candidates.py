"""Finding the trials an ensemble can be made of: what the search recorded, what is on disk, what agrees.

A search folder holds one folder per trial under ``trials/``, in every state a search can leave it: finished,
failed, diverged, pruned (its checkpoints deleted), stopped early by ASHA, or still running. Only a finished
trial with its out-of-fold (OOF) probabilities and all k fold checkpoints can be a member, and every other
one is named with the reason it is left out, so a surprising selection can be explained.

Candidates are then checked to agree on the images, folds, labels and classes they were trained on: their
OOF probabilities are added row by row, which is only meaningful when row i is the same image, held out of
the same fold, with the same label, in every trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.errors import OrchestratorError
from trainers.labels import AgeBands, class_names

FAILED_STATUSES = frozenset({"diverged", "failed", "error", "errored"})
OOF_ARRAYS = ("rel_path", "label", "fold", "probs", "probs_tta")


@dataclass
class Candidate:
    """A finished trial whose OOF probabilities and fold checkpoints are all there."""

    trial_id: str
    run_dir: Path
    config: dict
    status: str
    checkpoints: list[Path]
    rel_path: np.ndarray
    label: np.ndarray
    fold: np.ndarray
    probs: np.ndarray  # OOF, no TTA (float32)
    probs_tta: np.ndarray  # OOF with the trial's own ``tta`` (float32)

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
    search_dir: Path, failed: dict[str, str], stopped: dict[str, str] | None = None
) -> tuple[list[Candidate], dict[str, str]]:
    """Every usable trial under ``trials/`` and, for the others, why they are left out."""
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
        found = _read_trial(run_dir, stopped or {})
        if isinstance(found, str):
            skipped[trial_id] = found
        else:
            candidates.append(found)
    if not candidates:
        why = "\n".join(f"  {trial}: {reason}" for trial, reason in list(skipped.items())[:50]) or "  (none)"
        raise OrchestratorError(
            f"no finished trial with out-of-fold predictions and all fold checkpoints in {trials_dir}:\n"
            f"{why}\n"
            "let the search finish (`foldtune search --resume`) or re-run it"
        )
    return candidates, skipped


def _read_trial(run_dir: Path, stopped: dict[str, str]) -> Candidate | str:
    """One trial folder as a candidate, or the reason it cannot be one."""
    trial_id = run_dir.name
    result_path = run_dir / "result.json"
    if not result_path.is_file():
        return stopped.get(trial_id, "no result.json (still running, or stopped before it finished)")
    try:
        result = json.loads(result_path.read_text())
        config = dict(result["config"])
        status = str(result.get("status", ""))
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{result_path} is unreadable ({error})"
    if status in FAILED_STATUSES:
        return f"status {status}"
    k = int(config.get("k", 0))
    checkpoints = [run_dir / "checkpoints" / f"fold{i}.pt" for i in range(k)]
    missing = [p.name for p in checkpoints if not p.is_file()]
    if len(missing) == k:
        return "no checkpoints (pruned: outside the search's top K)"
    if missing:
        return f"checkpoints {', '.join(missing)} missing in {run_dir / 'checkpoints'}"
    if not (run_dir / "oof.npz").is_file():
        return "no oof.npz (stopped before its out-of-fold predictions were written)"
    try:
        with np.load(run_dir / "oof.npz", allow_pickle=False) as oof:
            arrays = {key: oof[key] for key in OOF_ARRAYS}
    except (OSError, ValueError, KeyError) as error:
        return f"{run_dir / 'oof.npz'} is unreadable ({error})"
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
    )


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
