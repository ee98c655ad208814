"""The MLflow store of a search: where it is (one absolute URI), its experiment, and run bookkeeping.

Why written from the driver only: trial processes writing one SQLite store at the same time hit "database
is locked", and Ray Tune's own MLflow callback cannot nest trials under a search. So a single process
writes everything: one experiment per search name, a parent run per search and a nested child run per
trial (the ``mlflow.parentRunId`` tag). Runs are found again by their tags, so a resumed search reuses its
parent run and never duplicates a trial's child run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

from orchestrator.errors import OrchestratorError
from orchestrator.tracking.provenance import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    DatasetRecord,
    code_version_tags,
    log_datasets,
)

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
MAX_TAG_CHARS = 4000
NOTE_TAG = "mlflow.note.content"  # a run's (or experiment's) description in the UI, Markdown


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


def sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri[len("sqlite:///") :]) if tracking_uri.startswith("sqlite:///") else None


def error_line(error: BaseException) -> str:
    """One telling line of an error's message: the last line of a traceback it carries (Tune's errors),
    else its first line that is not SQLAlchemy's note on autoflush."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if lines and lines[0].startswith("Traceback"):
        return lines[-1][:500]
    lines = [line for line in lines if not line.startswith("(raised as a result of")]
    return lines[0][:500] if lines else type(error).__name__


@contextlib.contextmanager
def quiet_store_errors() -> Iterator[None]:
    """Around tracking calls whose failure foldtune reports itself (one warning line): MLflow's own log of
    each failed database call (an ERROR with a full traceback, every time) stays silent."""
    logger = logging.getLogger("mlflow.store.db.utils")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was_disabled


@contextlib.contextmanager
def fail_fast_http(timeout_s: int = 20) -> Iterator[None]:
    """A tracking server that does not answer fails the calls made inside in seconds, not after MLflow's
    minutes of retries with backoff (7 by default, each up to 120 s). For the check at start and for every
    write of a search, which queues what fails (``search_log``); settings the user made are kept."""
    limits = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)}
    added = [key for key in limits if key not in os.environ]
    for key in added:
        os.environ[key] = limits[key]
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def probe_store(tracking_uri: str | os.PathLike | None) -> tuple[str, str | None]:
    """The resolved store URI, and why it cannot be used (None when it can), without creating or changing
    anything (``foldtune doctor``): a SQLite store is an existing database or a folder where one can be
    made; a server answers ``/health`` within a few seconds."""
    import sqlite3
    import urllib.request

    try:
        uri = resolve_tracking_uri(tracking_uri)
    except OrchestratorError as error:
        return str(tracking_uri), str(error)
    path = sqlite_path(uri)
    if path is not None:
        if path.exists():
            try:
                with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                    db.execute("select count(*) from sqlite_master").fetchone()
            except sqlite3.Error as error:
                return uri, f"MLflow store {uri} cannot be read ({error})"
            return uri, None
        folder = path.parent
        while not folder.exists():
            folder = folder.parent
        if not os.access(folder, os.W_OK):
            return uri, f"MLflow store {uri} cannot be created: {folder} is not writable"
        return uri, None
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as answer:
                answer.read(64)
        except OSError as error:
            return uri, f"MLflow tracking server {uri} does not answer ({error})"
    return uri, None


def store_answers(tracking_uri: str, timeout_s: int = 5) -> bool:
    """Whether the store answers now, by a read that creates nothing: a SQLite store's database file is
    there and readable (a lost mount is not answered by a new empty store), a server's ``/health`` answers
    within ``timeout_s``, any other store answers a one-experiment search."""
    import sqlite3
    import urllib.request

    path = sqlite_path(tracking_uri)
    if path is not None:
        if not path.is_file():
            return False
        try:
            with contextlib.closing(
                sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s)
            ) as db:
                db.execute("select count(*) from sqlite_master").fetchone()
        except sqlite3.Error:
            return False
        return True
    if tracking_uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as answer:
                answer.read(64)
        except OSError:
            return False
        return True
    try:
        from mlflow import MlflowClient

        with fail_fast_http(timeout_s), quiet_store_errors():
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except Exception:
        return False
    return True


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in values.items():
        if key in NOT_METRICS or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


@contextlib.contextmanager
def first_open_lock(store: Path | None) -> Iterator[None]:
    """Held while a search opens a SQLite store: two searches started at once on a new store would both
    create its tables, and the second would fail ("table runs already exists"). With the lock (an
    advisory ``flock`` on ``<store>.lock`` beside it) the second waits and opens the created store."""
    if store is None:
        yield
        return
    import fcntl

    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_name(store.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class SearchTracking:
    """The MLflow side of one search: its experiment, parent run and child runs (found by trial id).

    Picklable (Ray stores callbacks with the experiment): the client is created lazily in each process.
    """

    def __init__(self, tracking_uri: str | None, experiment_name: str):
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name = experiment_name
        self._client = None
        self._experiment_id: str | None = None
        # the search's inputs (training table, fold file, label fixes), recorded on every run it opens
        self.inputs: list[DatasetRecord] = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            store = sqlite_path(self.tracking_uri)
            if store is not None:
                store.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def open(self) -> None:
        """Open the store once (creating a new SQLite store), so a store that cannot be reached fails the
        search before anything starts, with one message naming it."""
        try:
            with fail_fast_http(), first_open_lock(sqlite_path(self.tracking_uri)):
                self.client.search_experiments(max_results=1)
        except Exception as error:
            self._client = None
            reason = f"{type(error).__name__}: {error_line(error)}"
            raise OrchestratorError(
                f"MLflow tracking store {self.tracking_uri} cannot be opened ({reason}); pass a reachable "
                "--tracking-uri (or MLFLOW_TRACKING_URI), e.g. sqlite:///ABSOLUTE/PATH/mlruns/mlflow.db"
            ) from None

    @property
    def experiment_id(self) -> str:
        """The search's experiment, created (or restored from the trash) on first use."""
        if self._experiment_id is None:
            experiment = self.client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                root = artifact_root(self.tracking_uri)
                location = f"{root}/{self.experiment_name}" if root else None
                self._experiment_id = self.client.create_experiment(
                    self.experiment_name, location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
                )
            else:
                if experiment.lifecycle_stage == "deleted":
                    self.client.restore_experiment(experiment.experiment_id)
                self._experiment_id = experiment.experiment_id
                if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # model training, not GenAI
                    self.client.set_experiment_tag(self._experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
            if f"{TAG}error" in found[0].data.tags:  # the error that ended the last driver is history
                self.client.delete_tag(run_id, f"{TAG}error")
            self.client.set_tag(run_id, f"{TAG}resumed", "true")
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.experiment_name,
            tags={
                f"{TAG}role": PARENT_ROLE,
                f"{TAG}search_dir": search_dir,
                **code_version_tags(source="foldtune search"),
                **(tags or {}),
            },
        )
        log_datasets(self.client, run.info.run_id, self.inputs)
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
                **code_version_tags(source="foldtune search (trial)"),
                **tags,
            },
        )
        log_datasets(self.client, run.info.run_id, self.inputs)
        return run.info.run_id, True

    def last_step(self, run_id: str, key: str = "val_f1") -> int:
        """The last step logged for ``key`` (0 when none), so a resumed trial does not log an epoch twice."""
        return max((m.step for m in self.client.get_metric_history(run_id, key)), default=0)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, Any], step: int = 0, time_ms: int | None = None
    ) -> None:
        """Finite numeric ``metrics`` at ``step``, stamped ``time_ms`` (when they were measured; now when
        not given: a record sent late keeps its own time)."""
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000) if time_ms is None else int(time_ms)
        items = [Metric(k, v, stamp, step) for k, v in finite_metrics(metrics).items()]
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

    def reopen(self, run_id: str) -> None:
        """A resumed trial's child run: RUNNING again, no longer tagged interrupted."""
        run = self.client.get_run(run_id)
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        if f"{TAG}interrupted" in run.data.tags:
            self.client.delete_tag(run_id, f"{TAG}interrupted")

    def close_children(
        self, parent_run_id: str, keep: Collection[str] = (), known: Collection[str] | None = None
    ) -> int:
        """Child runs still RUNNING, except those of trials in ``keep`` (about to continue), become KILLED,
        tagged ``interrupted`` (``orphaned`` when ``known`` is given and their trial is not in it: a trial
        a killed driver's last snapshot lost). Returns how many were closed."""
        closed = 0
        for child in self.child_runs(parent_run_id):
            trial_id = child.data.tags.get(f"{TAG}trial_id")
            if child.info.status != "RUNNING" or trial_id in keep:
                continue
            orphan = known is not None and trial_id not in known
            self.set_tags(child.info.run_id, {f"{TAG}{'orphaned' if orphan else 'interrupted'}": "true"})
            self.finish(child.info.run_id, "KILLED")
            closed += 1
        return closed
