"""After the search: one row per trial, the leaderboard and summary files, bounded disk, MLflow results.

Ray's results only say how each trial ended as far as Tune saw it; the trial's run folder says whether fit
finished (``result.json``), so the two are read together into one state per trial: completed,
stopped_early, failed or unfinished (a search interrupted before the trial ended). The leaderboard ranks by
that state, then by best mean F1. A finished search keeps checkpoints only for its ``keep_top`` trials.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from orchestrator.search.closing import interrupted_line
from orchestrator.search.constants import ASHA_STATE, FOLDS_FILE, METRIC, STATE_ORDER, TIME_ATTR
from orchestrator.search.plots import plot_study
from orchestrator.search.stopping import EarlyStops
from orchestrator.space import SearchSpace
from orchestrator.tracking.search_runs import log_parent_results, mark_checkpoints_deleted
from orchestrator.tracking.store import SearchTracking
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

    def problem(self) -> str | None:
        """None when the search finished with a usable trial; else the one line that says why not (the
        search was interrupted, or every trial failed, or none finished)."""
        states = self.leaderboard["state"].tolist() if "state" in self.leaderboard else []
        ended = sum(state != "unfinished" for state in states)
        if not self.finished:
            return interrupted_line(self.name, ended, self.trials_planned or len(states))
        if any(state in ("completed", "stopped_early") for state in states):
            return None
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
        lines = [
            f"search '{self.name}' {'finished' if self.finished else 'INTERRUPTED (continue with --resume)'}:"
            f" {len(self.leaderboard)} trials in {self.search_dir}",
            table,
        ]
        if self.best_trial_id is not None:
            best = self.leaderboard.iloc[0]
            lines.append(f"best trial {self.best_trial_id}: mean val macro F1 {best['best_f1']:.4f}")
        lines.append(f"disk used by the search: {human_bytes(self.disk_bytes)}")
        lines.append(f"MLflow: experiment '{self.experiment_name}' in {self.tracking_uri} (foldtune ui)")
        return "\n".join(lines)


def summarize(
    results, space: SearchSpace, search_dir: Path, tracking: SearchTracking, parent_run_id: str
) -> SearchSummary:
    """Leaderboard, ``summary.json``, plots and the parent run's results, from Tune's results and run dirs."""
    rows = trial_rows(results, space, search_dir, EarlyStops(search_dir / ASHA_STATE))
    finished = all(r["state"] != "unfinished" for r in rows) and len(rows) >= space.trials
    kept = _prune_checkpoints(rows, space.keep_top, tracking, parent_run_id) if finished else None
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
        experiment_name=tracking.experiment_name,
        parent_run_id=parent_run_id,
        leaderboard=leaderboard,
        best_trial_id=best["trial_id"] if best else None,
        best_config=best["config"] if best else None,
        disk_bytes=disk,
        tracking_uri=tracking.tracking_uri,
        finished=finished,
        trials_planned=space.trials,
    )
    write_csv_atomic(leaderboard, search_dir / "leaderboard.csv")
    payload = {
        "name": space.name,
        "search_dir": str(search_dir),
        "experiment_name": tracking.experiment_name,
        "tracking_uri": tracking.tracking_uri,
        "parent_run_id": parent_run_id,
        "finished": finished,
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
    log_parent_results(tracking, parent_run_id, summary, rows, plots, states=STATE_ORDER)
    return summary


def trial_rows(
    results, space: SearchSpace, search_dir: Path, early_stops: Collection[str] = ()
) -> list[dict[str, Any]]:
    """One row per trial, best first; its state from Tune's result (an error), fit's ``result.json`` (it
    finished) and ``early_stops``, the scheduler's record of the trials it stopped early."""
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


def _short_error(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def _prune_checkpoints(
    rows: list[dict], keep_top: int, tracking: SearchTracking, parent_run_id: str
) -> set[str]:
    """Bounded disk: trials outside the best ``keep_top`` lose their checkpoints; none keeps ``last.pt``."""
    from trainers.resume import RESUME_STATE, local_resume_dir  # torch: only once the search is over

    ranked = [r for r in rows if r["state"] in ("completed", "stopped_early") and math.isfinite(r["best_f1"])]
    kept = {r["trial_id"] for r in ranked[:keep_top]}
    deleted = []
    for row in rows:
        run_dir = Path(row["run_dir"])
        if row["state"] != "failed":
            # the resume state of a stopped trial: never resumed now
            resume_dir = local_resume_dir(run_dir)
            (resume_dir / RESUME_STATE).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                resume_dir.rmdir()
        checkpoints = run_dir / "checkpoints"
        if row["trial_id"] in kept or not checkpoints.exists():
            continue
        shutil.rmtree(checkpoints)
        deleted.append(row["trial_id"])
    if deleted:
        mark_checkpoints_deleted(tracking, parent_run_id, deleted)
    return kept


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
