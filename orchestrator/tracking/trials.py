"""Every trial of a search as a nested MLflow child run, recorded by a Ray Tune callback in the driver."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Collection
from pathlib import Path

from ray.tune import Callback

from orchestrator.tracking.search_log import SearchLog
from orchestrator.tracking.store import MAX_TAG_CHARS, finite_metrics


class MlflowTrialCallback(Callback):
    """Turns what Tune tells the driver about each trial into records of its child run (``trial_runs``),
    sent through the search's ``SearchLog``: written at once while the store answers, kept on disk and
    sent in order when it answers again (the search never waits for MLflow).

    A trial the scheduler stopped early (``trial_id in early_stops``, the scheduler's own record) ends
    KILLED with ``foldtune.stopped_early=true``; a failed one FAILED with its error as tag and artifact.
    """

    def __init__(self, log: SearchLog, config_for: Callable, early_stops: Collection[str] = ()):
        self.log = log
        self.config_for = config_for  # trial params -> TrainConfig (the search space's config_for)
        self.early_stops = early_stops  # trial ids the scheduler stopped before their last epoch

    def __setstate__(self, state: dict) -> None:
        if (
            "log" not in state
        ):  # kept by a search started before records (tracking, parent_run_id, trials_dir)
            search_dir = Path(state.pop("trials_dir")).parent
            state["log"] = SearchLog(state.pop("tracking"), state.pop("parent_run_id"), search_dir)
        self.__dict__.update({k: v for k, v in state.items() if not k.startswith("_")})

    def _record(self, kind: str, trial, fields: Callable[[], dict]) -> None:
        try:
            self.log.record(kind, trial_id=trial.trial_id, **fields())
        except Exception as error:  # tracking must never end a search that is training fine
            print(
                f"warning: MLflow {kind} record of trial {trial.trial_id} not made: "
                f"{type(error).__name__}: {error}",
                file=sys.stderr,
                flush=True,
            )

    def on_trial_start(self, iteration, trials, trial, **info):
        self._record(
            "trial_started",
            trial,
            lambda: {"params": self.config_for(trial.config).to_dict(), "searched": sorted(trial.config)},
        )

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        self._record("trial_result", trial, lambda: {"epoch": epoch, "metrics": finite_metrics(result)})

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        self._record(
            "trial_completed",
            trial,
            lambda: {
                "stopped": trial.trial_id in self.early_stops,
                "last": {key: _number(last.get(key)) for key in ("best_f1", "best_epoch", "epoch")},
            },
        )

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._record(
            "trial_retried",
            trial,
            lambda: {"failures": trial.run_metadata.num_failures, "error": trial_error(trial)[0]},
        )

    def on_trial_error(self, iteration, trials, trial, **info):
        def fields() -> dict:
            message, text = trial_error(trial)
            return {"message": message, "text": text}

        self._record("trial_failed", trial, fields)


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def trial_error(trial) -> tuple[str, str]:
    """(one-line message, full text) of a trial's last error: what the trial raised, not Ray's wrapper."""
    text = ""
    if trial.error_file and os.path.exists(trial.error_file):
        text = Path(trial.error_file).read_text(errors="replace")
    message = ""
    try:
        error = trial.get_pickled_error()
    except Exception:  # an unpicklable error still has its text file
        error = None
    if error is not None:
        cause = getattr(error, "cause", None) or error
        message = f"{type(cause).__name__}: {cause}"
        if not text:
            text = "".join(traceback.format_exception(cause))
    if not message.strip():
        lines = [line for line in text.splitlines() if line.strip()]
        message = lines[-1] if lines else "the trial failed without an error message"
    return message.strip().splitlines()[0][:MAX_TAG_CHARS], text or message
