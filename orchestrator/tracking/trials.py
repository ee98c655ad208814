"""Every trial of a search as a nested MLflow child run, logged by a Ray Tune callback in the driver."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from orchestrator.tracking.store import MAX_TAG_CHARS, TAG, SearchTracking, error_line, quiet_store_errors

RUN_FOLDER_ARTIFACTS = ("config.yaml", "folds.csv", "result.json", "metrics/*.csv", "plots/*.png")


class MlflowTrialCallback(Callback):
    """Logs every trial of a search as a nested child run, from the driver.

    Child runs get all hyperparameters, per-epoch mean and per-fold metrics (step = epoch), final metrics,
    the run folder's fold file, metric CSVs and plots, and a status: FINISHED, KILLED when the scheduler
    stopped the trial early (``trial_id in early_stops``, the scheduler's own record; tag
    ``foldtune.stopped_early=true``), FAILED with the error as tag and artifact.

    A tracking problem never stops the search: the first failure is one warning line on stderr, later ones
    are counted, and at the end of the search one line says what was not logged (the search folder keeps
    every result either way).
    """

    def __init__(
        self,
        tracking: SearchTracking,
        parent_run_id: str,
        trials_dir: Path,
        config_for,
        early_stops: Collection[str] = (),
    ):
        self.tracking = tracking
        self.parent_run_id = parent_run_id
        self.trials_dir = Path(trials_dir).absolute()
        self.config_for = config_for  # trial params -> TrainConfig (the search space's config_for)
        self.early_stops = early_stops  # trial ids the scheduler stopped before their last epoch
        self._runs: dict[str, str] = {}
        self._logged_epoch: dict[str, int] = {}
        self._not_logged: dict[str, set[str]] = {}  # what -> trial ids, since the first tracking failure

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}, "_logged_epoch": {}, "_not_logged": {}}

    def run_dir(self, trial_id: str) -> Path:
        return self.trials_dir / trial_id

    def _guard(self, what: str, trial, action) -> None:
        try:
            with quiet_store_errors():
                action()
        except Exception as error:  # tracking must never end a search that is training fine
            not_logged = self.__dict__.setdefault("_not_logged", {})
            if not not_logged:
                print(
                    f"warning: MLflow {what} for trial {trial.trial_id} failed: {type(error).__name__}: "
                    f"{error_line(error)}; the search goes on (the search folder keeps every result)",
                    file=sys.stderr,
                    flush=True,
                )
            not_logged.setdefault(what, set()).add(trial.trial_id)

    def on_experiment_end(self, trials, **info):
        not_logged = getattr(self, "_not_logged", {})
        if not not_logged:
            return
        parts = ", ".join(f"{what} of {len(ids)} trial(s)" for what, ids in not_logged.items())
        print(
            f"warning: MLflow ({self.tracking.tracking_uri}) failed during the search; not logged: {parts}. "
            f"The search folder {self.trials_dir.parent} has all results (leaderboard.csv, summary.json, "
            "trials/)",
            file=sys.stderr,
            flush=True,
        )
        self._not_logged = {}

    def _child(self, trial) -> str:
        run_id = self._runs.get(trial.trial_id)
        if run_id is not None:
            return run_id
        run_dir = self.run_dir(trial.trial_id)
        run_id, created = self.tracking.start_child(
            self.parent_run_id,
            trial.trial_id,
            {
                f"{TAG}run_dir": str(run_dir),
                f"{TAG}checkpoints": str(run_dir / "checkpoints"),
                f"{TAG}searched": json.dumps(sorted(trial.config)),
            },
        )
        if created:
            self.tracking.log_params(run_id, self.config_for(trial.config).to_dict())
            self._logged_epoch[trial.trial_id] = 0
        else:  # resumed: running again, no longer an interrupted run
            self.tracking.reopen(run_id)
            self._logged_epoch[trial.trial_id] = self.tracking.last_step(run_id)
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._guard("start", trial, lambda: self._child(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._guard("metrics", trial, lambda: self._log_result(trial, result))

    def _log_result(self, trial, result: Mapping[str, Any]) -> None:
        run_id = self._child(trial)
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        last = self._logged_epoch.get(trial.trial_id, 0)
        if epoch > last + 1:  # epochs a killed driver never saw: take them from the run folder's CSV
            self._backfill(run_id, trial.trial_id, last, epoch)
        if epoch > last:
            self.tracking.log_metrics(run_id, result, step=epoch)
            self._logged_epoch[trial.trial_id] = epoch

    def _backfill(self, run_id: str, trial_id: str, after: int, before: int) -> None:
        path = self.run_dir(trial_id) / "metrics" / "epochs.csv"
        if not path.exists():
            return
        history = pd.read_csv(path, dtype={"fold": str})
        for epoch in range(after + 1, before):
            rows = history[history["epoch"] == epoch]
            metrics: dict[str, float] = {}
            for row in rows.to_dict("records"):
                prefix = "" if row["fold"] == "mean" else f"fold{row['fold']}/"
                metrics.update({f"{prefix}{k}": v for k, v in row.items() if k not in ("epoch", "fold")})
            if metrics:
                self.tracking.log_metrics(run_id, metrics, step=epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._guard("completion", trial, lambda: self._complete(trial))

    def _complete(self, trial) -> None:
        run_id = self._child(trial)
        last = trial.last_result or {}
        stopped = trial.trial_id in getattr(self, "early_stops", ())
        run_dir = self.run_dir(trial.trial_id)
        final = {
            "best_f1": last.get("best_f1"),
            "best_epoch": last.get("best_epoch"),
            "epochs": last.get("epoch"),
        }
        tags = {
            f"{TAG}stopped_early": str(stopped).lower(),
            f"{TAG}status": "stopped_early" if stopped else "completed",
        }
        result_file = run_dir / "result.json"
        if result_file.exists():
            fit_result = json.loads(result_file.read_text())
            final.update({k: fit_result.get(k) for k in ("best_f1", "best_epoch", "oof_f1", "oof_f1_tta")})
            final["epochs"] = fit_result.get("epochs_trained")
            tags.update(
                {f"{TAG}fit_status": fit_result.get("status"), f"{TAG}fit_message": fit_result.get("message")}
            )
        self.tracking.log_metrics(run_id, {f"final/{k}": v for k, v in final.items() if v is not None})
        self.tracking.set_tags(run_id, tags)
        self.tracking.log_files(run_id, run_dir, RUN_FOLDER_ARTIFACTS, "run")
        self.tracking.finish(run_id, "KILLED" if stopped else "FINISHED")

    def on_trial_recover(self, iteration, trials, trial, **info):
        def tag() -> None:
            run_id = self._child(trial)
            self.tracking.set_tags(
                run_id,
                {f"{TAG}retries": trial.run_metadata.num_failures, f"{TAG}last_error": trial_error(trial)[0]},
            )

        self._guard("retry", trial, tag)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._guard("failure", trial, lambda: self._fail(trial))

    def _fail(self, trial) -> None:
        run_id = self._child(trial)
        message, text = trial_error(trial)
        self.tracking.set_tags(run_id, {f"{TAG}status": "failed", f"{TAG}error": message})
        self.tracking.client.log_text(run_id, text, "error.txt")
        self.tracking.log_files(run_id, self.run_dir(trial.trial_id), RUN_FOLDER_ARTIFACTS, "run")
        self.tracking.finish(run_id, "FAILED")


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
