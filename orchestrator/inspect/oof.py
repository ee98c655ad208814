"""Which out-of-fold (OOF) probabilities the label check and the attention maps judge, and the training
table they belong to.

A search already holds the best evidence about its own labels: every training image's probabilities from
the fold model that never saw it (``trials/<id>/oof.npz``). The ensemble's members, weighted as the
ensemble weighs them, are the least noisy judge; without an ensemble, the best trial by OOF macro F1; with
``--trial``, that one. Finding and checking the trials is the ensemble room's job (``candidates``,
``selection``): reused here, never repeated.

The OOF rows are then matched, by ``rel_path``, to the training table read from ``--data`` with the label
fixes the search itself was started with, so "given" means what the models were trained on.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.ensemble.candidates import (
    Candidate,
    check_same_split,
    discover,
    left_out_by_search,
    read_search_summary,
)
from orchestrator.ensemble.selection import macro_f1, rank, soft_vote
from orchestrator.errors import OrchestratorError
from trainers.folds import HOLDOUT_FOLD
from trainers.labels import AgeBands


@dataclass
class SearchOOF:
    """The OOF probabilities to judge, in the candidates' shared image order (sorted by ``rel_path``)."""

    search: str
    search_dir: Path
    summary: dict  # what the search recorded about itself (tracking URI, parent run id)
    members: list[Candidate]  # the trials voting, first = the ensemble's first member or the chosen trial
    weights: np.ndarray  # one per member, summing to 1
    rel_path: np.ndarray
    label: np.ndarray  # the labels the trials trained on
    fold: np.ndarray  # the fold each image was held out of
    probs: np.ndarray  # (N, 18) float64, rows sum to 1
    source: str  # what the probabilities are, for the printed summary

    @property
    def config(self) -> dict:
        return self.members[0].config

    @property
    def age_bands(self) -> AgeBands:
        return AgeBands(tuple(self.config.get("age_edges") or (30, 60)))

    @property
    def relabel(self) -> Path | None:
        """The label fixes the search was started with (its own copy), if any."""
        from orchestrator.search.constants import RELABEL_COPY  # here: the search package loads Ray

        path = self.search_dir / RELABEL_COPY
        return path if path.is_file() else None


def search_folder(search: str, storage: Path | None) -> Path:
    """``<storage>/<search>``, which must exist (the ensemble's check, one message for both)."""
    from orchestrator.ensemble.arguments import check_search_dir

    return check_search_dir(search, storage)


def _candidates(search: str, search_dir: Path, summary: dict) -> tuple[list[Candidate], dict[str, str]]:
    """The search's usable trials; none is one line saying what to do (discover's list is for ensembles)."""
    try:
        return discover(search_dir, *left_out_by_search(summary))
    except OrchestratorError as error:
        lines = str(error).splitlines()
        example = f" (e.g. {lines[1].strip()})" if len(lines) > 2 else ""
        raise OrchestratorError(
            f"search {search} has no trial with out-of-fold predictions in {search_dir / 'trials'}{example}; "
            "run `foldtune search` (or --resume it) and let at least one trial train every fold for an epoch"
        ) from None


def _ensemble_members(search_dir: Path) -> list[tuple[str, float]] | None:
    """(trial id, weight) of the ensemble's members from ``ensemble.json``, or None without one."""
    path = search_dir / "ensemble.json"
    if not path.is_file():
        return None
    try:
        members = json.loads(path.read_text())["members"]
        found = [(str(m["trial_id"]), float(m["weight"])) for m in members]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OrchestratorError(
            f"{path} is unreadable ({type(error).__name__}: {error}); re-run `foldtune ensemble`, delete it, "
            "or pick one trial with --trial"
        ) from None
    if not found or any(not w > 0 for _, w in found):
        raise OrchestratorError(
            f"{path}: members must be a non-empty list with positive weights; re-run `foldtune ensemble`"
        )
    return found


def load_search_oof(search: str, storage: Path | None = None, trial: str | None = None) -> SearchOOF:
    """The OOF probabilities of ``--trial``, else the ensemble's members weighted, else the best trial."""
    search_dir = search_folder(search, storage)
    summary = read_search_summary(search_dir)
    candidates, skipped = _candidates(search, search_dir, summary)
    by_id = {c.trial_id: c for c in candidates}
    members = _ensemble_members(search_dir) if trial is None else None
    if trial is not None:
        if trial not in by_id:
            why = skipped.get(trial, "no such trial folder")
            raise OrchestratorError(
                f"--trial {trial}: not usable ({why}); use one of {', '.join(sorted(by_id))}"
            )
        chosen, weights = [by_id[trial]], np.ones(1)
        source = f"trial {trial} alone"
    elif members is not None:
        missing = [t for t, _ in members if t not in by_id]
        if missing:
            why = skipped.get(missing[0], "its folder is gone")
            raise OrchestratorError(
                f"{search_dir / 'ensemble.json'} names trial {missing[0]}, which is not usable now ({why}); "
                "re-run `foldtune ensemble`, or pick one trial with --trial"
            )
        chosen = [by_id[t] for t, _ in members]
        weights = np.array([w for _, w in members], dtype=np.float64)
        source = f"the ensemble's {len(chosen)} member(s) weighted as in ensemble.json"
    else:
        scores = [macro_f1(c.label, c.probs_tta) for c in candidates]
        best = rank(scores, [c.trial_id for c in candidates])[0]
        chosen, weights = [candidates[best]], np.ones(1)
        source = (
            f"the best trial, {candidates[best].trial_id} (OOF macro F1 {scores[best]:.4f}; no ensemble.json)"
        )
    check_same_split(chosen)
    weights = weights / weights.sum()
    probs = _rows_sum_to_one(soft_vote(weights, [c.probs_tta for c in chosen]))
    first = chosen[0]
    return SearchOOF(
        search, search_dir, summary, chosen, weights, first.rel_path, first.label, first.fold, probs, source
    )


def with_holdout(oof: SearchOOF) -> tuple[SearchOOF, int]:
    """``oof`` plus the holdout persons' images, judged by the ensemble's vote on them
    (``holdout_probs.npz``, written by ``foldtune ensemble`` beside ``ensemble.json``), and how many
    holdout persons stay unjudged (no ensemble of these members predicted them yet).

    Holdout persons (``holdout:`` in the space) are in no fold, so they have no OOF probabilities; but no
    model trained on them either, so the ensemble's vote on them is just as honest a judge. Only the vote
    of the very members being used is taken, so the two kinds of rows come from one set of models.
    """
    from orchestrator.ensemble.estimates import HOLDOUT_PROBS, holdout_of

    # from the first member that has its folds.csv (the ensemble's own rule), said when none has
    holdout = holdout_of(oof.search_dir, oof.members, lambda line: print(line, file=sys.stderr))
    if not len(holdout):
        return oof, 0
    path = oof.search_dir / HOLDOUT_PROBS
    try:
        with np.load(path) as saved:
            members = saved["members"].astype(str).tolist()
            rel_path, label = saved["rel_path"].astype(str), saved["label"].astype(np.int64)
            probs = saved["probs"].astype(np.float64)
            like_oof = bool(saved["own_tta"]) and bool(saved["all_folds"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none yet, or unreadable
        return oof, holdout.persons
    if members != [m.trial_id for m in oof.members] or not np.array_equal(rel_path, holdout.rel_path):
        return oof, holdout.persons  # another ensemble's vote, or another holdout
    if not like_oof:  # --tta or --folds: other models than the OOF rows' judges
        return oof, holdout.persons
    joined = dataclasses.replace(
        oof,
        rel_path=np.concatenate([oof.rel_path, rel_path]),
        label=np.concatenate([oof.label, label]),
        fold=np.concatenate([oof.fold, np.full(len(rel_path), HOLDOUT_FOLD, dtype=oof.fold.dtype)]),
        probs=np.concatenate([oof.probs, _rows_sum_to_one(probs)]),
        source=f"{oof.source}, and for the {holdout.persons} holdout persons their vote on them "
        f"({HOLDOUT_PROBS})",
    )
    return joined, 0


def _rows_sum_to_one(probs: np.ndarray) -> np.ndarray:
    """Stored as float32, a vote's rows sum to 1 only roughly; cleanlab wants them exact."""
    return probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-12, None)


def check_data_root(data_root: Path) -> Path:
    """A data root with a training set; an eval-only one (or a typo) is one line saying what to pass."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise OrchestratorError(
            f"--data {data_root} is not a folder; pass the data root the search was trained on"
        )
    if not (data_root / "train").is_dir():
        raise OrchestratorError(
            f"--data {data_root} has no train/ folder (an eval-only data root?); pass the data root the "
            "search was trained on, with train/train.csv and train/images"
        )
    return data_root


def matching_table(table: pd.DataFrame, oof: SearchOOF, data_root: Path) -> pd.DataFrame:
    """The training table's rows in OOF order; refuses OOF images this data root does not have and labels
    that differ from those the trials trained on (another relabel overlay, train.csv edited since)."""
    indexed = table.set_index("rel_path", drop=False)
    missing = [rel for rel in oof.rel_path.tolist() if rel not in indexed.index]
    if missing:
        raise OrchestratorError(
            f"{len(missing)} of the search's {len(oof.rel_path)} training images are not in --data "
            f"{data_root} (e.g. {missing[0]}): the search was run on another data root; pass that one"
        )
    matched = indexed.loc[oof.rel_path.tolist()].reset_index(drop=True)
    differ = np.flatnonzero(matched["label"].to_numpy() != oof.label)
    if len(differ):
        example = oof.rel_path[differ[0]]
        raise OrchestratorError(
            f"{len(differ)} images of --data {data_root} have other labels than the search trained on (e.g. "
            f"{example}: {matched['label'].iloc[differ[0]]} vs {oof.label[differ[0]]}); train.csv changed "
            "since the search: judge a search trained on this train.csv"
        )
    return matched


def read_matching_train(data_root: Path, oof: SearchOOF) -> pd.DataFrame:
    """``read_train`` with the search's age edges and label fixes, matched row for row to the OOF."""
    from trainers.data import read_train

    data_root = check_data_root(data_root)
    data = read_train(data_root, oof.age_bands, relabel=oof.relabel)
    return matching_table(data.table, oof, data_root)
