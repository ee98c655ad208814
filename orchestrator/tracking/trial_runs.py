"""Each trial of a search as a nested MLflow child run, written from plain records of what the trial did.

Why plain records and not Ray's trial objects: a record can wait on disk while the tracking store is down
(``search_log``) and be written later, by the same driver or by ``foldtune sync-mlflow``, with the same
result. So every write here is safe to repeat: a child run is found again by its trial id, an epoch
already in the store is not logged twice, artifacts and tags are overwritten with the same content.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from orchestrator.tracking.store import TAG, SearchTracking
from trainers.config import folds_trained_of

RUN_FOLDER_ARTIFACTS = ("config.yaml", "folds.csv", "result.json", "metrics/*.csv", "plots/*.png")


class TrialRuns:
    """The child runs of one search's trials: created on a trial's first record, then updated.

    Child runs get all hyperparameters, per-epoch mean and per-fold metrics (step = epoch), final metrics,
    the run folder's fold file, metric CSVs and plots, and a status: FINISHED, KILLED when the scheduler
    stopped the trial early (tag ``foldtune.stopped_early=true``), FAILED with the error as tag and
    artifact. Knows which run belongs to which trial and which epoch each has logged, once it asked.
    """

    def __init__(self, tracking: SearchTracking, trials_dir: Path):
        self.tracking = tracking
        self.trials_dir = Path(trials_dir).absolute()
        self._runs: dict[tuple[str, str], str] = {}  # (parent run, trial id) -> child run
        self._logged_epoch: dict[str, int] = {}  # child run -> last epoch in the store

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}, "_logged_epoch": {}}

    def run_dir(self, trial_id: str) -> Path:
        return self.trials_dir / trial_id

    def child(self, parent_run_id: str, trial_id: str) -> str:
        """The trial's child run, found or (with the run folder's ``config.yaml`` as params) created."""
        return self._child(parent_run_id, trial_id)[0]

    def _child(
        self, parent_run_id: str, trial_id: str, params: Mapping[str, Any] | None = None, searched=()
    ) -> tuple[str, str]:
        """(run id, how it was had): "known" (asked before), "found" (a resumed trial's, or one a record
        wrote before), or "created" with the trial's parameters (``params``, else ``config.yaml``)."""
        run_id = self._runs.get((parent_run_id, trial_id))
        if run_id is not None:
            return run_id, "known"
        run_dir = self.run_dir(trial_id)
        run_id, created = self.tracking.start_child(
            parent_run_id,
            trial_id,
            {
                f"{TAG}run_dir": str(run_dir),
                f"{TAG}checkpoints": str(run_dir / "checkpoints"),
                f"{TAG}searched": json.dumps(sorted(searched)),
            },
        )
        if created:
            if params is None and (run_dir / "config.yaml").is_file():
                params = yaml.safe_load((run_dir / "config.yaml").read_text())
            if params:
                self.tracking.log_params(run_id, params)
            self._logged_epoch[run_id] = 0
        else:
            self._logged_epoch[run_id] = self.tracking.last_step(run_id)
        self._runs[(parent_run_id, trial_id)] = run_id
        return run_id, "created" if created else "found"

    def started(self, parent_run_id: str, trial_id: str, params: Mapping[str, Any], searched) -> None:
        """A trial started: its run is created, or (a resumed trial) RUNNING again and no longer tagged
        interrupted."""
        run_id, how = self._child(parent_run_id, trial_id, params, searched)
        if how == "found":
            self.tracking.reopen(run_id)

    def result(self, parent_run_id: str, trial_id: str, epoch: int, metrics: Mapping[str, float], time_ms):
        """One epoch's metrics (step = epoch); epochs a killed driver never saw come from the run folder."""
        run_id = self.child(parent_run_id, trial_id)
        last = self._logged_epoch.get(run_id, 0)
        if epoch > last + 1:
            self._backfill(run_id, trial_id, last, epoch, time_ms)
        if epoch > last:
            self.tracking.log_metrics(run_id, metrics, step=epoch, time_ms=time_ms)
            self._logged_epoch[run_id] = epoch

    def _backfill(self, run_id: str, trial_id: str, after: int, before: int, time_ms) -> None:
        """Log epochs ``after`` < e < ``before`` from ``epochs.csv``, stamped just before the epoch that
        reports them (``time_ms``), so a history ordered by time stays ordered by epoch."""
        from trainers.run_outputs import epoch_metrics  # (trainers.run_outputs brings torch: only here)

        stamp = int(time.time() * 1000) if time_ms is None else int(time_ms)
        path = self.run_dir(trial_id) / "metrics" / "epochs.csv"
        if not path.exists():
            return
        history = pd.read_csv(path, dtype={"fold": str})
        for epoch in range(after + 1, before):
            metrics = epoch_metrics(history, epoch)
            if metrics:
                self.tracking.log_metrics(run_id, metrics, step=epoch, time_ms=stamp - (before - epoch))

    def completed(self, parent_run_id: str, trial_id: str, stopped: bool, last: Mapping[str, Any]) -> None:
        """The trial ended: final metrics (fit's ``result.json`` when it wrote one), files, status."""
        run_id = self.child(parent_run_id, trial_id)
        run_dir = self.run_dir(trial_id)
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
            final.update(_fit_figures(fit_result))
            tags.update(
                {f"{TAG}fit_status": fit_result.get("status"), f"{TAG}fit_message": fit_result.get("message")}
            )
        self.tracking.log_metrics(run_id, {f"final/{k}": v for k, v in final.items() if v is not None})
        self.tracking.set_tags(run_id, tags)
        self.tracking.log_files(run_id, run_dir, RUN_FOLDER_ARTIFACTS, "run")
        self.tracking.finish(run_id, "KILLED" if stopped else "FINISHED")

    def promoted(self, parent_run_id: str, trial_id: str, record: Mapping[str, Any]) -> None:
        """A planned search's screen, promoted to all its folds after it ended (``search.promote``):
        its run gets the k-fold figures (``final/`` metrics of the promoted ``result.json``), the screen's
        ones as ``screen/``, tags saying so, and the run folder's files again (every fold's metrics)."""
        run_id = self.child(parent_run_id, trial_id)
        result = json.loads((self.run_dir(trial_id) / "result.json").read_text())
        metrics = {f"final/{k}": v for k, v in _fit_figures(result).items() if v is not None}
        if record.get("screened_oof_f1_tta") is not None:
            metrics["screen/oof_f1_tta"] = record["screened_oof_f1_tta"]
        if record.get("seconds") is not None:
            metrics["promotion/seconds"] = record["seconds"]
        self.tracking.log_metrics(run_id, metrics)
        self._promoted_epochs(run_id, trial_id)
        folds = folds_trained_of(result.get("config") or {})
        status = result.get("status")
        tags = {f"{TAG}promoted": "true", f"{TAG}folds_trained": folds, f"{TAG}fit_status": status}
        self.tracking.set_tags(run_id, tags)
        self.tracking.log_files(run_id, self.run_dir(trial_id), RUN_FOLDER_ARTIFACTS, "run")

    def _promoted_epochs(self, run_id: str, trial_id: str) -> None:
        """A promotion's per-epoch series (step = epoch), from its ``metrics/epochs.csv``: each new fold's
        metrics as ``fold{i}/...`` beside the screened fold's, and the mean over all k folds as ``kfold/...``
        (``val_f1`` and the other unprefixed series stay the screen's, so no step has two values)."""
        path = self.run_dir(trial_id) / "metrics" / "epochs.csv"
        if not path.is_file():
            return
        history = pd.read_csv(path, dtype={"fold": str})
        if "timed_from" not in history.columns:
            return
        from trainers.run_outputs import epoch_metrics  # (trainers.run_outputs brings torch: only here)

        reused = int(history["timed_from"].dropna().max())  # the screened folds, logged by the screen
        fold = history["fold"]
        promoted = history[(fold == "mean") | (pd.to_numeric(fold, errors="coerce") >= reused)]
        promoted = promoted.drop(columns="timed_from")
        for epoch in sorted(promoted["epoch"].unique()):
            metrics = {  # the mean row's unprefixed names are the screen's: the k-fold mean as kfold/
                (name if "/" in name else f"kfold/{name}"): value
                for name, value in epoch_metrics(promoted, epoch).items()
            }
            if metrics:
                self.tracking.log_metrics(run_id, metrics, step=int(epoch))

    def retried(self, parent_run_id: str, trial_id: str, failures: int, error: str) -> None:
        run_id = self.child(parent_run_id, trial_id)
        self.tracking.set_tags(run_id, {f"{TAG}retries": failures, f"{TAG}last_error": error})

    def failed(self, parent_run_id: str, trial_id: str, message: str, text: str) -> None:
        run_id = self.child(parent_run_id, trial_id)
        self.tracking.set_tags(run_id, {f"{TAG}status": "failed", f"{TAG}error": message})
        self.tracking.client.log_text(run_id, text, "error.txt")
        self.tracking.log_files(run_id, self.run_dir(trial_id), RUN_FOLDER_ARTIFACTS, "run")
        self.tracking.finish(run_id, "FAILED")


def _fit_figures(result: Mapping[str, Any]) -> dict[str, Any]:
    """A run's final figures from fit's ``result.json`` (logged as ``final/<name>``)."""
    figures = {k: result.get(k) for k in ("best_f1", "best_epoch", "oof_f1", "oof_f1_tta")}
    figures["epochs"] = result.get("epochs_trained")
    return figures
