"""After the search: one row per trial, the leaderboard and summary files, bounded disk, MLflow results.

Ray's results only say how each trial ended as far as Tune saw it; the trial's run folder says whether fit
finished (``result.json``), so the two are read together into one state per trial: completed,
stopped_early, failed or unfinished (a search interrupted before the trial ended). The leaderboard ranks by
that state, then by best mean F1. A trial the time budget stopped is ``cut``: it keeps the best fold models
and OOF predictions it reached. A finished search keeps checkpoints only for its ``keep_top`` trials,
ranked by the figure the ensemble selects on (each trial's OOF macro F1, with its TTA when it finished).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from orchestrator.search.closing import interrupted_line
from orchestrator.search.constants import (
    ASHA_STATE,
    CANDIDATE_STATES,
    FOLDS_FILE,
    METRIC,
    STATE_ORDER,
    TIME_ATTR,
)
from orchestrator.search.plots import plot_study
from orchestrator.search.stopping import EarlyStops
from orchestrator.space import SearchSpace
from orchestrator.tracking.search_log import SearchLog
from trainers.io import write_csv_atomic, write_text_atomic


@dataclass
class SearchSummary:
    """What a search produced; also written as ``leaderboard.csv`` and ``summary.json`` in ``search_dir``."""

    name: str
    search_dir: Path
    experiment_name: str
    parent_run_id: str | None
    leaderboard: pd.DataFrame
    best_trial_id: str | None
    best_config: dict[str, Any] | None
    disk_bytes: int
    tracking_uri: str
    finished: bool = True  # False when the search was interrupted and can be resumed
    trials_planned: int = 0  # the space's number of trials (0: as many as the leaderboard has)
    budget_spent: bool = False  # the time budget ended the search
    cut_candidates: tuple[str, ...] = ()  # cut trials whose best fold models were kept (ensemble candidates)
    cut_pruned: tuple[str, ...] = ()  # cut trials outside keep_top (their OOF kept as a record only)
    final: dict[str, Any] | None = None  # a planned search's final model (``search.final``'s record)
    promoted: list[dict[str, Any]] | None = None  # the screens confirmed on all k folds (``search.promote``)

    def problem(self) -> str | None:
        """None when the search finished with a usable trial; else the one line that says why not (the
        search was interrupted, or every trial failed, or none finished)."""
        states = self.leaderboard["state"].tolist() if "state" in self.leaderboard else []
        ended = sum(state != "unfinished" for state in states)
        if not self.finished:
            return interrupted_line(self.name, ended, self.trials_planned or len(states))
        usable = self.leaderboard[self.leaderboard["state"].isin(CANDIDATE_STATES)] if states else []
        if len(usable) and (usable["best_f1"] > float("-inf")).any():
            return None
        if self.budget_spent:
            return (
                f"search '{self.name}': no trial finished an epoch within the time budget; raise "
                "--time-budget, or lower epochs, image_size or k in the space"
            )
        failed = self.leaderboard[self.leaderboard["state"] == "failed"] if states else self.leaderboard
        if len(failed):
            first = failed.sort_values("trial_id").iloc[0]
            return (
                f"search '{self.name}': every trial failed: first error ({first['trial_id']}) "
                f"{first['error'] or 'unknown'}; see {self.search_dir / 'leaderboard.csv'}"
            )
        return f"search '{self.name}': no trial finished; see {self.search_dir}"

    def report(self, rows: int = 10) -> str:
        columns = [c for c in self.leaderboard.columns if c not in ("run_dir", "error", "best_epoch")]
        table = self.leaderboard[columns].head(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}")
        how = "finished" if self.finished else "INTERRUPTED (continue with --resume)"
        if self.budget_spent:
            how = "ended by its time budget"
        if self.final is not None:
            how = "screened its configurations and trained the best one to the end of its budget"
        lines = [f"search '{self.name}' {how}: {len(self.leaderboard)} trials in {self.search_dir}", table]
        states = self.leaderboard.get("state")
        if states is not None and (states == "cut").any():
            cut = self.leaderboard.loc[states == "cut", "trial_id"].astype(str).tolist()
            lines.append(cut_line(cut, self.cut_candidates, self.cut_pruned))
        if self.best_trial_id is not None:
            best = self.leaderboard.iloc[0]
            lines.append(f"best trial {self.best_trial_id}: mean val macro F1 {best['best_f1']:.4f}")
        for p in self.promoted or ():
            lines.append(_promotion_line(p))
        if self.final is not None:
            for f in self.final.get("models") or [self.final]:  # a final.json before "models": one
                holdout = _figure(f.get("holdout_f1_tta"))
                seeds = f" x{f['seeds']} seeds" if f.get("seeds", 1) > 1 else ""
                lines.append(
                    f"final model: trial {f['trial_id']}{seeds} refit on {f['train_images']} images for "
                    f"{f['epochs']} epoch(s) in {f['seconds'] / 60:.1f} min (holdout macro F1 {holdout})"
                )
            lines.append(
                "`foldtune ensemble` votes the final model(s) with the screened fold models where the "
                "holdout says it helps"
            )
        lines.append(f"disk used by the search: {human_bytes(self.disk_bytes)}")
        lines.append(f"MLflow: experiment '{self.experiment_name}' in {self.tracking_uri} (foldtune ui)")
        return "\n".join(lines)


def _figure(value) -> str:
    return "n/a" if value is None else f"{float(value):.4f}"


def summarize(
    results,
    space: SearchSpace,
    search_dir: Path,
    log: SearchLog,
    budget_spent: bool = False,
) -> SearchSummary:
    """Leaderboard, ``summary.json``, plots and the parent run's results, from Tune's results and run dirs.

    ``budget_spent``: the time budget ended the search; its unfinished trials are ``cut`` and it is over.
    """
    rows = trial_rows(results, space, search_dir, EarlyStops(search_dir / ASHA_STATE), budget_spent)
    finished = budget_spent or (all(r["state"] != "unfinished" for r in rows) and len(rows) >= space.trials)
    kept = _prune_checkpoints(rows, space.keep_top, log) if finished else None
    cut = [r for r in rows if r["state"] == "cut"]
    cut_candidates = tuple(r["trial_id"] for r in cut if r["trial_id"] in (kept or ()))
    cut_pruned = tuple(  # a pruned trial's OOF is saved to oof.npz before its checkpoints go
        r["trial_id"]
        for r in cut
        if r["trial_id"] not in cut_candidates and (Path(r["run_dir"]) / "oof.npz").is_file()
    )
    leaderboard = pd.DataFrame([{k: v for k, v in r.items() if k != "config"} for r in rows])
    if leaderboard.empty:
        leaderboard = pd.DataFrame(
            columns=["trial_id", "state", "epochs", "best_f1", "best_epoch", "run_dir", "error"]
        )
    leaderboard.insert(0, "rank", range(1, len(leaderboard) + 1))
    best = rows[0] if rows and rows[0]["state"] == "completed" else None
    disk = folder_bytes(search_dir)
    summary = SearchSummary(
        name=space.name,
        search_dir=search_dir,
        experiment_name=log.tracking.experiment_name,
        parent_run_id=log.parent_run_id,
        leaderboard=leaderboard,
        best_trial_id=best["trial_id"] if best else None,
        best_config=best["config"] if best else None,
        disk_bytes=disk,
        tracking_uri=log.tracking.tracking_uri,
        finished=finished,
        trials_planned=space.trials,
        budget_spent=budget_spent,
        cut_candidates=cut_candidates,
        cut_pruned=cut_pruned,
    )
    write_csv_atomic(leaderboard, search_dir / "leaderboard.csv")
    payload = {
        "name": space.name,
        "search_dir": str(search_dir),
        "experiment_name": log.tracking.experiment_name,
        "tracking_uri": log.tracking.tracking_uri,
        "parent_run_id": log.parent_run_id,
        "finished": finished,
        "budget_spent": budget_spent,
        "best_trial_id": summary.best_trial_id,
        "best_config": summary.best_config,
        "disk_bytes": disk,
        "folds": str(search_dir / FOLDS_FILE),
        "trials": [
            {
                "trial_id": r["trial_id"],
                "run_dir": r["run_dir"],
                "status": r["state"],
                "best_f1": r["best_f1"] if math.isfinite(r["best_f1"]) else None,
                "best_epoch": r["best_epoch"],
                "epochs": r["epochs"],
                "checkpoints_kept": bool(kept is None or r["trial_id"] in kept),
                "params": {name: r[name] for name in space.search},
                "config": r["config"],
                "error": r["error"],
            }
            for r in rows
        ],
    }
    write_text_atomic(json.dumps(payload, indent=2, default=str), search_dir / "summary.json")
    plots = plot_study(search_dir, space.name)
    log.search_results(summary, rows, plots, states=STATE_ORDER)
    return summary


def trial_rows(
    results,
    space: SearchSpace,
    search_dir: Path,
    early_stops: Collection[str] = (),
    budget_spent: bool = False,
) -> list[dict[str, Any]]:
    """One row per trial, best first; its state from Tune's result (an error), fit's ``result.json`` (it
    finished), ``early_stops``, the scheduler's record of the trials it stopped early, and whether the
    time budget ended the search (its unfinished trials are then ``cut``)."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics["trial_id"]
        run_dir = search_dir / "trials" / trial_id
        fit_result = (
            json.loads((run_dir / "result.json").read_text()) if (run_dir / "result.json").exists() else {}
        )
        if result.error is not None:
            state = "failed"
        elif fit_result.get("status") in ("completed", "early_stopped"):  # fit wrote its results
            state = "completed"
        elif trial_id in early_stops:
            state = "stopped_early"
        elif budget_spent and (run_dir.exists() or metrics.get(TIME_ATTR)):  # it ran, then the budget
            # stopped it (a trial that never started stays unfinished)
            state = "cut"
        else:  # Ray's "done" flag is not kept in its snapshots, so a restored search cannot use it
            state = "unfinished"
        best_f1 = fit_result.get("best_f1", metrics.get("best_f1"))
        rows.append(
            {
                "trial_id": trial_id,
                "state": state,
                "epochs": int(metrics.get(TIME_ATTR, 0) or 0),
                "best_f1": float(best_f1) if best_f1 is not None else math.nan,
                "best_epoch": int(metrics.get("best_epoch", 0) or 0),
                "last_f1": float(metrics.get(METRIC, math.nan)),  # what Optuna and ASHA saw last
                **{name: (result.config or {}).get(name) for name in space.search},
                "run_dir": str(run_dir),
                "error": _short_error(result.error) if result.error is not None else "",
                "config": space.config_for(result.config).to_dict() if result.config else None,
            }
        )
    rows.sort(
        key=lambda r: (STATE_ORDER[r["state"]], -r["best_f1"] if math.isfinite(r["best_f1"]) else math.inf)
    )
    return rows


def cut_line(cut: list[str], candidates: Collection[str], pruned: Collection[str]) -> str:
    """Which trials the time budget cut, and which of them the ensemble can use: those whose best fold
    models were kept (every fold had an epoch, and the trial is within ``keep_top``); a pruned one keeps
    only its OOF record; one cut before every fold had an epoch has nothing to vote with."""
    groups = (
        ([t for t in cut if t in candidates], "best fold models and OOF kept: ensemble candidates"),
        ([t for t in cut if t in pruned], "outside keep_top: checkpoints deleted, OOF kept as a record"),
        (
            [t for t in cut if t not in candidates and t not in pruned],
            "cut before every fold had an epoch: not candidates",
        ),
    )
    return "cut by the time budget: " + "; ".join(f"{', '.join(ids)} ({why})" for ids, why in groups if ids)


def _short_error(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def _promotion_line(record: dict) -> str:
    """The report's line for one promotion (``promoted.json``'s record)."""
    from trainers.screened import FINISHED

    if record.get("status") not in FINISHED:
        why = f" ({record['error']})" if record.get("error") else ""
        return f"promotion of trial {record['trial_id']} {record.get('status')}{why}: its screen stays"
    took = f" in {record['seconds'] / 60:.1f} min" if record.get("seconds") is not None else ""
    return (
        f"promoted: trial {record['trial_id']} confirmed on all folds{took} (screened OOF macro F1 "
        f"{_figure(record.get('screened_oof_f1_tta'))}, on all folds {_figure(record.get('oof_f1_tta'))})"
    )


def _prune_checkpoints(rows: list[dict], keep_top: int, log: SearchLog) -> set[str]:
    """Bounded disk: trials outside the best ``keep_top`` lose their checkpoints; none keeps ``last.pt``.

    Ranked as the ensemble ranks its candidates (``selection_f1``), so pruning never deletes what the
    ensemble would have taken first. A pruned trial keeps its OOF predictions (an unfinished one's are
    written to ``oof.npz`` first), so the ensemble can say when it would have picked one.
    """
    from orchestrator.ensemble.candidates import selection_f1
    from trainers.resume import RESUME_STATE, local_resume_dir  # torch: only once the search is over
    from trainers.screened import promotion_under_way, was_promoted

    scored = {  # a trial pruned by an earlier summary (on a resume) has no checkpoints left to keep
        r["trial_id"]: selection_f1(Path(r["run_dir"]))
        for r in rows
        if r["state"] in CANDIDATE_STATES and (Path(r["run_dir"]) / "checkpoints").is_dir()
    }
    run_dirs = {r["trial_id"]: Path(r["run_dir"]) for r in rows}
    # promoted trials first, as the ensemble takes them (``candidates.most_folds``): on a resumed planned
    # search a screen's one-fold F1 never outranks a trial confirmed on all k folds
    promoted = {t for t in scored if was_promoted(run_dirs[t])}
    ranked = sorted(
        (t for t, f1 in scored.items() if f1 is not None), key=lambda t: (t not in promoted, -scored[t], t)
    )
    kept = set(ranked[:keep_top])
    deleted = []
    for row in rows:
        run_dir = Path(row["run_dir"])
        if promotion_under_way(run_dir):  # a cut promotion: --resume continues it from its resume state
            continue
        if row["state"] != "failed" and not (row["state"] == "cut" and row["trial_id"] in kept):
            # the resume state of a stopped trial: never resumed now (a kept cut one continues on a
            # --resume with a larger --time-budget; a pruned one would lack its best checkpoints)
            resume_dir = local_resume_dir(run_dir)
            (resume_dir / RESUME_STATE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                resume_dir.rmdir()
        checkpoints = run_dir / "checkpoints"
        if row["trial_id"] in kept or not checkpoints.exists():
            continue
        if scored.get(row["trial_id"]) is not None and not _final_oof(run_dir / "oof.npz"):
            _keep_partial_oof(run_dir, row)  # (a partial one from an earlier cut is older than these)
        shutil.rmtree(checkpoints)
        deleted.append(row["trial_id"])
    if deleted:
        log.checkpoints_deleted(deleted)
    return kept


def _final_oof(path: Path) -> bool:
    """Whether ``oof.npz`` is a finished run's (not a partial one saved when an earlier driver pruned or cut
    the trial: a trial restarted since has newer checkpoints, whose OOF must replace it)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as oof:
            return "partial" not in oof.files or not bool(oof["partial"])
    except (OSError, ValueError):
        return False


def _keep_partial_oof(run_dir: Path, row: dict) -> None:
    from trainers.config import folds_trained_of
    from trainers.run_outputs import save_partial_out_of_fold

    try:  # a record for the ensemble's note only; never block the pruning, but say when it is missing
        config = row.get("config") or yaml.safe_load((run_dir / "config.yaml").read_text())
        save_partial_out_of_fold(run_dir, int(config["k"]), folds_trained_of(config))
    except Exception as error:
        print(
            f"warning: trial {row.get('trial_id')}: its partial out-of-fold predictions were not kept before "
            f"its checkpoints were pruned ({type(error).__name__}: {error}); the ensemble's note cannot "
            "name it",
            file=sys.stderr,
        )


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while counting
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
