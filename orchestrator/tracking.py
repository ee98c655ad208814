"""MLflow tracking of a search, written from the Ray driver only.

Why the driver: trial processes writing one SQLite store at the same time hit "database is locked", and Ray
Tune's own MLflow callback cannot nest trials under a search. A ``ray.tune.Callback`` runs in the driver
and sees every trial event, so a single process writes everything: one experiment per search name, a
parent run per search and a nested child run per trial (the ``mlflow.parentRunId`` tag). Runs are found
again by their tags, so a resumed search reuses its parent run and never duplicates a trial's child run.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pandas as pd
from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

from orchestrator.errors import OrchestratorError

TAG = "foldtune."
PARENT_ROLE, CHILD_ROLE = "search", "trial"
DEFAULT_STORE = Path("mlruns") / "mlflow.db"
# Result keys Ray adds itself or that steer the search; everything else numeric is a trial metric.
NOT_METRICS = (
    frozenset(AUTO_RESULT_KEYS)
    | frozenset(DEBUG_METRICS)
    | {
        "done",
        "epoch",
        "epochs_planned",
        "stopped_early",
        "should_checkpoint",
        "experiment_tag",
        "trial_id",
    }
)
RUN_FOLDER_ARTIFACTS = ("config.yaml", "folds.csv", "result.json", "metrics/*.csv", "plots/*.png")
MAX_TAG_CHARS = 4000


def resolve_tracking_uri(uri: str | os.PathLike | None) -> str:
    """An absolute tracking URI: trials and the UI run in other folders than the one a path was typed in.

    ``None`` means the default store; a bare ``.db`` path or folder becomes a SQLite store; server URIs
    (http, postgresql, ...) pass through unchanged.
    """
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or str(DEFAULT_STORE)
    uri = str(uri)
    if uri.startswith("sqlite:///"):
        path = Path(unquote(uri[len("sqlite:///") :]))
        return f"sqlite:///{path.expanduser().absolute()}"
    if uri.startswith("file:"):
        raise OrchestratorError(
            f"tracking URI {uri}: MLflow 3 refuses local file stores (unless MLFLOW_ALLOW_FILE_STORE=true); "
            "use a SQLite store such as sqlite:///ABSOLUTE/PATH/mlruns/mlflow.db"
        )
    if "://" in uri or uri.startswith("databricks"):
        return uri
    path = Path(uri).expanduser().absolute()
    if path.suffix != ".db":
        path = path / "mlflow.db"
    return f"sqlite:///{path}"


def artifact_root(tracking_uri: str) -> str | None:
    """A SQLite store keeps artifacts beside the database (``<dir>/artifacts``); servers choose their own."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts").as_uri()


def _sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri[len("sqlite:///") :]) if tracking_uri.startswith("sqlite:///") else None


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


class SearchTracking:
    """The MLflow side of one search: its experiment, parent run and child runs (found by trial id).

    Picklable (Ray stores callbacks with the experiment): the client is created lazily in each process.
    """

    def __init__(self, tracking_uri: str | None, experiment_name: str):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment_name
        self._client = None
        self._experiment_id: str | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            store = _sqlite_path(self.tracking_uri)
            if store is not None:
                store.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    @property
    def experiment_id(self) -> str:
        """The search's experiment, created (or restored from the trash) on first use."""
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                root = artifact_root(self.tracking_uri)
                location = f"{root}/{self.experiment_name}" if root else None
                self._experiment_id = self.client.create_experiment(self.experiment_name, location)
            else:
                if experiment.lifecycle_stage == "deleted":
                    self.client.restore_experiment(experiment.experiment_id)
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def _find_runs(self, tags: Mapping[str, str]) -> list:
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        return self.client.search_runs([self.experiment_id], filter_string=query, max_results=10)

    def start_parent(self, search_dir: Path, tags: Mapping[str, str] | None = None) -> str:
        """The search's parent run: the existing one for this search folder (resume), else a new one."""
        search_dir = str(Path(search_dir).absolute())
        found = self._find_runs({f"{TAG}role": PARENT_ROLE, f"{TAG}search_dir": search_dir})
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, f"{TAG}resumed", "true")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.experiment_name,
            tags={f"{TAG}role": PARENT_ROLE, f"{TAG}search_dir": search_dir, **(tags or {})},
        )
        return run.info.run_id

    def find_child(self, parent_run_id: str, trial_id: str) -> str | None:
        found = self._find_runs({"mlflow.parentRunId": parent_run_id, f"{TAG}trial_id": trial_id})
        return found[0].info.run_id if found else None

    def child_runs(self, parent_run_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
            max_results=5000,
        )

    def start_child(self, parent_run_id: str, trial_id: str, tags: Mapping[str, str]) -> tuple[str, bool]:
        """(run id, created) for a trial: its existing child run when resumed, else a new nested one."""
        run_id = self.find_child(parent_run_id, trial_id)
        if run_id is not None:
            return run_id, False
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial_id,
            tags={
                "mlflow.parentRunId": parent_run_id,
                f"{TAG}role": CHILD_ROLE,
                f"{TAG}trial_id": trial_id,
                **tags,
            },
        )
        return run.info.run_id, True

    def last_step(self, run_id: str, key: str = "val_f1") -> int:
        """The last step logged for ``key`` (0 when none), so a resumed trial does not log an epoch twice."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in _finite_metrics(metrics).items()]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start : start + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)[:MAX_TAG_CHARS]) for k, v in tags.items()]
        self.client.log_batch(run_id, tags=items)

    def log_files(self, run_id: str, folder: Path, patterns: Iterable[str], artifact_path: str) -> list[str]:
        """Log the files of ``folder`` matching ``patterns``, keeping sub-folders; returns what was logged."""
        logged = []
        for pattern in patterns:
            for path in sorted(Path(folder).glob(pattern)):
                if path.is_file():
                    sub = path.parent.relative_to(folder).as_posix()
                    target = artifact_path if sub == "." else f"{artifact_path}/{sub}"
                    self.client.log_artifact(run_id, str(path), target)
                    logged.append(path.relative_to(folder).as_posix())
        return logged

    def finish(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)


class MlflowTrialCallback(Callback):
    """Logs every trial of a search as a nested child run, from the driver.

    Child runs get all hyperparameters, per-epoch mean and per-fold metrics (step = epoch), final metrics,
    the run folder's fold file, metric CSVs and plots, and a status: FINISHED, KILLED when the scheduler
    stopped the trial early (tag ``foldtune.stopped_early=true``), FAILED with the error as tag and artifact.
    A tracking problem is reported on stderr and never stops the search.
    """

    def __init__(self, tracking: SearchTracking, parent_run_id: str, trials_dir: Path, config_for):
        self.tracking = tracking
        self.parent_run_id = parent_run_id
        self.trials_dir = Path(trials_dir).absolute()
        self.config_for = config_for  # trial params -> TrainConfig (the search space's config_for)
        self._runs: dict[str, str] = {}
        self._logged_epoch: dict[str, int] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_runs": {}, "_logged_epoch": {}}

    def run_dir(self, trial_id: str) -> Path:
        return self.trials_dir / trial_id

    def _guard(self, what: str, trial, action) -> None:
        try:
            action()
        except Exception as error:  # tracking must never end a search that is training fine
            print(
                f"warning: MLflow {what} for trial {trial.trial_id} failed: {type(error).__name__}: {error}",
                file=sys.stderr,
            )

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
        else:
            self.tracking.client.update_run(run_id, status="RUNNING")
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
        stopped = bool(last.get("stopped_early"))
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


def start_ui(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1") -> subprocess.Popen:
    """Start ``mlflow ui`` over the tracking store (with its artifact root) and return the process."""
    uri = resolve_tracking_uri(tracking_uri)
    store = _sqlite_path(uri)
    if store is not None and not store.exists():
        raise OrchestratorError(
            f"no MLflow store at {store}: run a search first, or point MLFLOW_TRACKING_URI at your store"
        )
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    # one worker: a personal UI starts in seconds instead of importing MLflow in four processes
    command += ["--host", host, "--port", str(port), "--workers", "1"]
    root = artifact_root(uri)
    if root:
        command += ["--default-artifact-root", root]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: the MLflow UI has no login; anyone who can reach {host}:{port} can read and edit runs",
            file=sys.stderr,
        )
    return subprocess.Popen(command)


def launch_ui(tracking_uri: str | None = None, port: int = 5000, host: str = "127.0.0.1") -> int:
    """Run the MLflow UI until Ctrl-C; returns its exit code (0 after Ctrl-C)."""
    process = start_ui(tracking_uri, port=port, host=host)
    print(f"MLflow UI on http://{host}:{port} over {resolve_tracking_uri(tracking_uri)} (Ctrl-C stops it)")
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait(timeout=30)
        return 0
