"""A search's parent MLflow run: opened with the search's settings, closed with its results.

The search rooms decide what happened; this module writes it to MLflow (trial child runs are
``trial_runs``). Every write after the parent run is opened goes through ``search_log`` as a record that
can wait on disk while the store is down, so the writers here take plain values and write nothing twice
when sent again. Opening the parent run is direct: a search that cannot be tracked at all should not
start.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import yaml

from orchestrator.space import SearchSpace
from orchestrator.tracking.store import NOTE_TAG, TAG, SearchTracking
from orchestrator.tracking.ui_view import write_search_view


class SearchSummary(Protocol):
    """What the parent run records of a search's outcome (``search.summary.SearchSummary`` is one):
    tracking sits below the search rooms and never imports them."""

    search_dir: Path
    leaderboard: pd.DataFrame
    disk_bytes: int
    finished: bool
    best_trial_id: str | None
    best_config: dict[str, Any] | None


def start_parent_run(
    tracking: SearchTracking, space: SearchSpace, search_dir: Path, data_root: Path, artifacts: Sequence[Path]
) -> str:
    """The search's parent run (reused on resume), with the search's settings as params and its files."""
    parent_run_id = tracking.start_parent(
        search_dir, tags={f"{TAG}search": space.name, f"{TAG}data_root": str(data_root)}
    )
    params = {
        "trials": space.trials,
        "max_concurrent": space.max_concurrent,
        "cpus_per_trial": space.cpus_per_trial,
        "gpus_per_trial": space.gpus_per_trial,
        "scheduler": "none" if space.asha is None else f"asha{tuple(vars(space.asha).values())}",
        "sampler": f"tpe(seed={space.sampler_seed}, n_startup_trials={space.n_startup_trials})",
        "keep_top": space.keep_top,
        "max_failures": space.max_failures,
        **{f"search.{p.name}": p.describe() for p in space.search.values()},
        **{f"fixed.{k}": v for k, v in space.to_dict()["fixed"].items()},
    }
    try:
        tracking.log_params(parent_run_id, params)
    except Exception as error:  # params cannot change; a resumed search with equal params logs nothing new
        print(f"warning: MLflow parent params not logged: {error}", file=sys.stderr)
    plan = plan_line(params)
    tracking.set_tags(parent_run_id, {PLAN_TAG: plan})
    running = f"**foldtune search** `{space.name}`: running.\n\n{plan}"
    tracking.client.set_tag(parent_run_id, NOTE_TAG, running)
    tracking.client.set_experiment_tag(tracking.experiment_id, NOTE_TAG, running)
    for path in artifacts:
        tracking.client.log_artifact(parent_run_id, str(path))
    try:
        write_search_view(tracking, list(space.search))
    except Exception as error:  # a convenience for the UI; never a reason to stop a search
        print(f"warning: the search's MLflow UI view was not written: {error}", file=sys.stderr)
    return parent_run_id


def close_runs(
    tracking: SearchTracking,
    parent_run_id: str,
    keep: Collection[str] = (),
    known: Collection[str] | None = None,
) -> int:
    """Child runs still RUNNING, except those of trials in ``keep``, become KILLED (``interrupted``, or
    ``orphaned`` when ``known`` is given and their trial is not in it); returns how many."""
    return tracking.close_children(parent_run_id, keep=set(keep), known=None if known is None else set(known))


def mark_checkpoints_deleted(tracking: SearchTracking, parent_run_id: str, trial_ids: Iterable[str]) -> None:
    """Tag the child runs of trials whose checkpoints were deleted to bound the search's disk."""
    for trial_id in trial_ids:
        run_id = tracking.find_child(parent_run_id, trial_id)
        if run_id is not None:
            tracking.set_tags(run_id, {f"{TAG}checkpoints_deleted": "true"})


def results_record(
    summary: SearchSummary, rows: list[dict], plots: list[Path], states: Iterable[str]
) -> dict:
    """What the parent run gets when a search's driver ends with a summary, as plain values (a record may
    wait on disk for the store, ``search_log``). ``states`` are the trial states counted as
    ``trials_<state>`` metrics (zero when no trial has one)."""
    counts = pd.Series([r["state"] for r in rows], dtype=object).value_counts().to_dict()
    metrics = {f"trials_{state}": int(counts.get(state, 0)) for state in states}
    metrics["disk_bytes"] = summary.disk_bytes
    tags = {f"{TAG}finished": str(summary.finished).lower()}
    if summary.best_trial_id is not None:
        metrics["best_val_f1"] = rows[0]["best_f1"]
        tags[f"{TAG}best_trial"] = summary.best_trial_id
    search_dir = Path(summary.search_dir)
    return {
        "files": [str(search_dir / name) for name in ("leaderboard.csv", "summary.json")],
        "leaderboard": summary.leaderboard.drop(columns=["run_dir"], errors="ignore").to_dict("records"),
        "plots": [str(plot) for plot in plots],
        "metrics": metrics,
        "tags": tags,
        "best_config": summary.best_config,
        "note": search_note(summary, rows),
        "known": sorted(r["trial_id"] for r in rows),
        "finished": bool(summary.finished),
    }


def write_results(
    tracking: SearchTracking,
    parent_run_id: str,
    files: list[str],
    leaderboard: list[dict],
    plots: list[str],
    metrics: dict,
    tags: dict,
    best_config: dict | None,
    note: str,
    known: list[str],
    finished: bool,
) -> None:
    """The parent run's results (``results_record``); children left RUNNING by an interrupted or killed
    driver are closed, and the parent FINISHED (KILLED when the search did not finish)."""
    client = tracking.client
    for path in files:
        if Path(path).is_file():
            client.log_artifact(parent_run_id, path)
    client.log_table(parent_run_id, pd.DataFrame.from_records(leaderboard), "leaderboard_table.json")
    for plot in plots:
        if Path(plot).is_file():
            client.log_artifact(parent_run_id, plot, "plots")
    if best_config is not None:
        client.log_text(parent_run_id, yaml.safe_dump(best_config, sort_keys=False), "best_config.yaml")
    tracking.log_metrics(parent_run_id, metrics)
    tracking.set_tags(parent_run_id, tags)
    plan = client.get_run(parent_run_id).data.tags.get(PLAN_TAG)
    note = note.replace("\n\n", f"\n\n{plan}\n\n", 1) if plan else note
    client.set_tag(parent_run_id, NOTE_TAG, note)
    client.set_experiment_tag(tracking.experiment_id, NOTE_TAG, note)
    tracking.close_children(parent_run_id, known=set(known))
    tracking.finish(parent_run_id, "FINISHED" if finished else "KILLED")


NOTE_ROWS = 10
PLAN_TAG = f"{TAG}plan"


def plan_line(params: dict) -> str:
    """What the search set out to do, from its parent run's params: trials, how many at once with what
    resources, the scheduler and the sampler."""
    gpus = float(params.get("gpus_per_trial") or 0)
    each = f"{params.get('cpus_per_trial')} CPU" + (f" + {gpus:g} GPU" if gpus else "") + " each"
    return (
        f"Plan: {params.get('trials')} trials, {params.get('max_concurrent')} at a time ({each}); "
        f"scheduler {params.get('scheduler')}; sampler {params.get('sampler')}; "
        f"searched: {', '.join(k.removeprefix('search.') for k in params if k.startswith('search.'))}."
    )


_NOT_PARAMS = frozenset(
    ("trial_id", "state", "epochs", "best_f1", "best_epoch", "last_f1", "run_dir", "error", "config")
)


def search_note(summary: SearchSummary, rows: list[dict]) -> str:
    """The search in a few lines of Markdown for the UI's description: its state, the best trial and the
    leaderboard's top rows (the rest is in leaderboard.csv and the child runs)."""
    params = [key for key in (rows[0] if rows else {}) if key not in _NOT_PARAMS]  # the searched ones
    lines = [
        f"**foldtune search** `{summary.search_dir.name}`: "
        + ("finished" if summary.finished else "not finished")
        + f", {len(rows)} trial(s); best trial `{summary.best_trial_id}`."
        if summary.best_trial_id
        else f"**foldtune search** `{summary.search_dir.name}`: no trial with a result yet.",
        "",
        "| rank | trial | state | epochs | best val F1 | " + " | ".join(params) + " |",
        "|---:|---|---|---:|---:|" + "---|" * len(params),
    ]
    for rank, row in enumerate(rows[:NOTE_ROWS], start=1):
        values = [_cell(row.get(column)) for column in params]
        lines.append(
            f"| {rank} | `{row['trial_id']}` | {row['state']} | {_cell(row.get('epochs'))} | "
            f"{_cell(row.get('best_f1'))} | " + " | ".join(values) + " |"
        )
    if len(rows) > NOTE_ROWS:
        lines.append(f"\n{len(rows) - NOTE_ROWS} more in `leaderboard.csv`.")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_closed(tracking: SearchTracking, parent_run_id: str, interrupted: bool, error: str | None) -> None:
    """A driver that ended without a summary: child runs still RUNNING become KILLED (``interrupted``), the
    parent KILLED for an interruption, FAILED with ``error`` (tag ``foldtune.error``) for anything else."""
    tracking.close_children(parent_run_id)
    tags = {f"{TAG}finished": "false"}
    if error is not None:
        tags[f"{TAG}error"] = error
    tracking.set_tags(parent_run_id, tags)
    tracking.finish(parent_run_id, "KILLED" if interrupted else "FAILED")
