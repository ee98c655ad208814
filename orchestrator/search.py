"""The search: Ray Tune runs k-fold trials that Optuna (TPE) proposes; ASHA stops the weak ones early.

Everything every trial shares is prepared once, in the driver, before any trial starts: the data is read
and validated, the fold file is written (all trials split the same persons the same way, so their scores
and out-of-fold predictions are comparable), the image cache is built (trials only open it) and the
pretrained weights are resolved per candidate backbone (trials never touch the network). A trial is one
``trainers.fit.fit`` call in its own run folder; it reports mean-over-folds validation macro F1 after every
epoch, so ASHA compares trials at equal epochs. MLflow is written from the driver (see tracking.py).

Layout of ``<storage>/<name>/``: ``space.yaml``, ``folds.csv``, ``optuna.db`` (the Optuna study),
``tune/`` (Ray Tune's experiment, used by ``resume``), ``trials/<trial_id>/`` (fit's run folders),
``leaderboard.csv``, ``summary.json`` and ``plots/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from ray import tune
from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator.errors import OrchestratorError
from orchestrator.space import SearchSpace, load_space
from orchestrator.tracking import TAG, MlflowTrialCallback, SearchTracking, resolve_tracking_uri
from trainers.io import write_csv_atomic, write_text_atomic

METRIC, MODE, TIME_ATTR = "val_f1", "max", "epoch"
STOPPED_EARLY = "stopped_early"  # result key set on the result a scheduler stopped a trial at
EXPERIMENT_DIRNAME = "tune"
RELABEL_COPY = "relabel.csv"  # the label fixes the search was started with
ASHA_STATE = "asha_state.json"  # the scheduler's rungs, so a resumed search keeps judging against them
CHECKPOINT_MARKER = "foldtune_marker.json"
STATE_ORDER = {"completed": 0, "stopped_early": 1, "failed": 2, "unfinished": 3}
TUNE_ENVIRON = {  # set for the driver's Tune loop unless the user set them
    # Tune's newer console output prints a config box, the results path and a TensorBoard hint even at
    # verbose=0; foldtune prints its own trial table, so the quiet legacy reporter is used instead
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_GLOBAL_CHECKPOINT_S": "2",  # experiment snapshot period: what a killed driver can lose at most
    # every report checkpoints (num_to_keep=1 forces a snapshot each time); the marker is tiny, so no warning
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}

logger = logging.getLogger(__name__)


class TrialFailed(RuntimeError):
    """A trial that produced no usable model (its loss diverged); the message says what to change."""


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


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, prepared once by the driver and shipped through Ray's object store."""

    space: SearchSpace
    table: pd.DataFrame
    folds: pd.DataFrame
    cache_dir: str
    trials_dir: str
    weights: dict[str, Any]  # backbone -> trainers.weights.ResolvedWeights
    log_epochs: bool


# --- one trial --------------------------------------------------------------------------------------------


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One trial: fit all k folds in lockstep in ``trials/<trial_id>``, reporting to Tune after each epoch."""
    import torch

    from trainers.fit import fit

    torch.set_num_threads(max(1, int(context.space.cpus_per_trial)))
    # one "Checkpoint successfully created" line per epoch and trial would drown the epoch lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(context.trials_dir) / trial_id
    cfg = context.space.config_for(params)
    log = print if context.log_epochs else None

    finished = _finished_fit(run_dir, cfg.to_dict())
    if finished is not None:  # the fit ended but a killed driver never recorded it: report, don't retrain
        _report(_final_metrics(run_dir, finished, cfg.epochs), run_dir)
        return

    def report_epoch(report) -> None:
        _report({**report.flat(), "epochs_planned": cfg.epochs}, run_dir)

    result = fit(
        cfg,
        context.table,
        context.folds,
        run_dir,
        Path(context.cache_dir),
        resolved_weights=context.weights.get(cfg.backbone),
        callback=report_epoch,
        log=log,
    )
    if result.status == "diverged":
        raise TrialFailed(result.message)


def _report(metrics: dict[str, Any], run_dir: Path) -> None:
    """Report to Tune with a tiny marker checkpoint; the real resume state is fit's ``last.pt``."""
    with tempfile.TemporaryDirectory() as folder:
        marker = {"epoch": int(metrics["epoch"]), "run_dir": str(run_dir)}
        Path(folder, CHECKPOINT_MARKER).write_text(json.dumps(marker))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _finished_fit(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    path = run_dir / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result.get("config") == config and result.get("status") in ("completed", "early_stopped"):
        return result
    return None


def _final_metrics(run_dir: Path, result: dict[str, Any], epochs_planned: int) -> dict[str, Any]:
    """The last epoch's metrics of a finished run, rebuilt from its ``metrics/epochs.csv``."""
    epoch = int(result["epochs_trained"])
    metrics: dict[str, Any] = {}
    history = pd.read_csv(run_dir / "metrics" / "epochs.csv", dtype={"fold": str})
    for row in history[history["epoch"] == epoch].to_dict("records"):
        prefix = "" if row["fold"] == "mean" else f"fold{row['fold']}/"
        metrics.update({f"{prefix}{k}": v for k, v in row.items() if k not in ("epoch", "fold")})
    return {
        **metrics,
        "epoch": epoch,
        "best_f1": result["best_f1"],
        "best_epoch": result["best_epoch"],
        "epochs_planned": epochs_planned,
    }


# --- Optuna that tells the truth about stopped trials -----------------------------------------------------


class PrunedAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, but a trial the scheduler stopped early is told to Optuna as PRUNED.

    Ray reports an ASHA-stopped trial as COMPLETE with its early score, so TPE would treat a truncated run
    as a finished one. Here its last score is recorded as an intermediate value and the trial is PRUNED.
    Each Optuna trial also carries its Ray trial id (user attribute ``ray_trial_id``).
    """

    def suggest(self, trial_id: str):
        params = super().suggest(trial_id)
        if params is not None and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:  # unknown only for trials lost with a killed driver's last snapshot
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials:
            return
        if error or not result or not result.get(STOPPED_EARLY) or trial_id in self._completed_trials:
            super().on_trial_complete(trial_id, result, error)
            return
        import optuna

        ot_trial = self._ot_trials[trial_id]
        value, step = result.get(self.metric), result.get("training_iteration")
        try:
            if isinstance(value, int | float) and math.isfinite(value) and step is not None:
                ot_trial.report(float(value), int(step))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except Exception as exc:  # e.g. already told before a resume; the study keeps its first record
            logger.warning("Optuna: could not mark trial %s pruned: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


def optuna_distributions(space: SearchSpace) -> dict[str, Any]:
    import optuna

    out = {}
    for name, param in space.search.items():
        if param.kind == "choice":
            out[name] = optuna.distributions.CategoricalDistribution(list(param.values))
        elif param.kind == "int":
            out[name] = optuna.distributions.IntDistribution(*param.values)
        else:
            out[name] = optuna.distributions.FloatDistribution(*param.values, log=param.kind == "loguniform")
    return out


def optuna_storage_url(search_dir: Path) -> str:
    return f"sqlite:///{Path(search_dir).absolute() / 'optuna.db'}"


def make_searcher(space: SearchSpace, search_dir: Path) -> ConcurrencyLimiter:
    import optuna

    searcher = PrunedAwareOptunaSearch(
        space=optuna_distributions(space),
        metric=METRIC,
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=space.sampler_seed, n_startup_trials=space.n_startup_trials),
        storage=optuna.storages.RDBStorage(optuna_storage_url(search_dir)),
        study_name=space.name,
        points_to_evaluate=[dict(point) for point in space.points_to_evaluate] or None,
    )
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)


def make_scheduler(space: SearchSpace, state_path: Path | None = None):
    """ASHA on the space's settings; ``state_path`` keeps its rungs across a killed driver (see below)."""
    if space.asha is None:
        return None
    return FinishingASHA(
        state_path=str(state_path) if state_path else None,
        time_attr=TIME_ATTR,
        max_t=space.asha.max_t or space.max_epochs(),
        grace_period=space.asha.grace_period,
        reduction_factor=space.asha.reduction_factor,
        stop_last_trials=False,  # a trial at its last epoch must finish fit (OOF predictions, result.json)
    )


class FinishingASHA(ASHAScheduler):
    """ASHA that never stops a trial at its own last epoch, and whose rungs survive a resume.

    ASHA has a rung at every ``grace_period * reduction_factor**k`` up to ``max_t``, so a trial whose last
    epoch is a rung can be told to STOP there: nothing is saved by it, and the kill would come before fit
    writes its out-of-fold predictions and ``result.json``. Such a trial finishes instead.

    Ray's Tuner.restore rebuilds the scheduler as it was created, with empty rungs, so after a resume the
    first trials would be judged against nobody and run to the end. With ``state_path`` the rungs (each
    trial's score at each milestone) are written after every result and read back once on restore.
    """

    def __init__(self, *args, state_path: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._state_path = state_path
        self._state_loaded = False

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_rungs_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load_rungs_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        self._save_rungs()
        at_last_epoch = result.get(TIME_ATTR, 0) >= result.get("epochs_planned", math.inf)
        if decision == TrialScheduler.STOP and at_last_epoch:
            return TrialScheduler.CONTINUE
        return decision

    def _save_rungs(self) -> None:
        if not self._state_path:
            return
        state = {
            "num_stopped": self._num_stopped,
            "brackets": [
                [{"milestone": m, "recorded": {k: float(v) for k, v in r.items()}} for m, r in bracket._rungs]
                for bracket in self._brackets
            ],
        }
        write_text_atomic(json.dumps(state), Path(self._state_path))

    def _load_rungs_once(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True
        if not self._state_path or not Path(self._state_path).is_file():
            return
        try:
            state = json.loads(Path(self._state_path).read_text())
            saved_brackets = state["brackets"]
        except (OSError, ValueError, KeyError) as error:
            logger.warning("ASHA state %s unreadable (%s); its rungs start empty", self._state_path, error)
            return
        for bracket, saved in zip(self._brackets, saved_brackets, strict=False):
            for (milestone, recorded), rung in zip(bracket._rungs, saved, strict=False):
                if rung.get("milestone") == milestone:  # same schedule: the rung means the same epoch
                    recorded.update(rung.get("recorded", {}))
        self._num_stopped = int(state.get("num_stopped", self._num_stopped))


class EarlyStopMarker(Callback):
    """Marks the result on which the scheduler stopped a trial before its planned last epoch.

    Ray sets ``done`` on a result when the scheduler decides STOP, before callbacks see it; a trial that
    ends by itself never reports ``done``. The mark travels in the trial's last result to the searcher
    (PRUNED), MLflow (KILLED) and the leaderboard (stopped_early).
    """

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done") and result.get(TIME_ATTR, 0) < result.get("epochs_planned", math.inf):
            result[STOPPED_EARLY] = True


class ProgressTable(Callback):
    """A compact live table of trials (state, epoch, mean F1, key parameters), printed when it changes."""

    def __init__(self, params: list[str], interval_s: float = 30.0):
        self.params = params
        self.interval_s = interval_s
        self._shown: dict[str, tuple] = {}
        self._last_print = 0.0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shown": {}, "_last_print": 0.0}

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        state = {t.trial_id: (t.status, t.last_result.get(TIME_ATTR)) for t in trials}
        status_changed = {k: v[0] for k, v in state.items()} != {k: v[0] for k, v in self._shown.items()}
        if status_changed or (state != self._shown and now - self._last_print >= self.interval_s):
            self._shown, self._last_print = state, now
            print(progress_table(trials, self.params), flush=True)


def progress_table(trials, params: list[str]) -> str:
    rows = []
    for t in trials:
        result = t.last_result or {}
        state = t.status.lower()
        if t.status == "TERMINATED":
            state = "stopped" if result.get(STOPPED_EARLY) else "done"
        rows.append(
            {
                "trial": t.trial_id,
                "state": state,
                "epoch": result.get(TIME_ATTR, ""),
                "mean F1": _fmt(result.get(METRIC)),
                "best F1": _fmt(result.get("best_f1")),
                **{p: _fmt(t.config.get(p)) for p in params},
            }
        )
    counts = pd.Series([r["state"] for r in rows]).value_counts().to_dict() if rows else {}
    head = "trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"{head}\n{pd.DataFrame(rows).to_string(index=False)}" if rows else head


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


# --- the driver -------------------------------------------------------------------------------------------


def run_search(
    data_root: str | os.PathLike,
    space_path: str | os.PathLike | None,
    trials: int | None = None,
    name: str | None = None,
    resume: bool = False,
    address: str | None = None,
    storage: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    cpus_per_trial: float | None = None,
    gpus_per_trial: float | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    retry_failed: bool = False,
    relabel: str | os.PathLike | None = None,
) -> SearchSummary:
    """Run (or with ``resume``, continue) a search; see the module docstring for what is written where.

    ``address`` (or ``RAY_ADDRESS``) joins an existing Ray cluster; otherwise a local one is started.
    ``retry_failed`` restarts failed trials from scratch on resume (they stay failed by default).
    ``relabel`` is a label-fix CSV (see trainers.data); a copy is kept in the search folder as
    ``relabel.csv``, used again on resume and logged to MLflow, so every trial sees the same labels.
    """
    storage_dir = Path(storage or "runs").expanduser().absolute()
    space, search_dir, restoring = _settle_space(
        space_path, storage_dir, trials, name, resume, cpus_per_trial, gpus_per_trial
    )
    tracking = _settle_tracking(search_dir, tracking_uri, space.name)
    relabel_copy = _settle_relabel(search_dir, relabel, resume and (search_dir / "space.yaml").exists())
    write_text_atomic(space.to_yaml(), search_dir / "space.yaml")
    experiment_path = search_dir / EXPERIMENT_DIRNAME

    started_ray = _connect_ray(address, progress)
    try:
        space = _fit_resources(space)
        context = _prepare(
            Path(data_root).expanduser().absolute(), space, search_dir, cache_dir, progress, relabel_copy
        )
        parent_run_id = _start_parent(tracking, space, search_dir, Path(data_root).expanduser().absolute())
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, context=context),
            {"cpu": space.cpus_per_trial, "gpu": space.gpus_per_trial},
        )
        saved_environ = {key: os.environ.get(key) for key in TUNE_ENVIRON}
        for key, value in TUNE_ENVIRON.items():
            os.environ.setdefault(key, value)
        try:
            if restoring:
                print(f"resuming search '{space.name}' from {experiment_path}")
                tuner = tune.Tuner.restore(
                    str(experiment_path),
                    trainable=trainable,
                    resume_unfinished=True,
                    resume_errored=False,
                    restart_errored=retry_failed,
                )
            else:
                for stale in ("optuna.db", ASHA_STATE):  # left by an abandoned start
                    (search_dir / stale).unlink(missing_ok=True)
                tuner = tune.Tuner(
                    trainable,
                    tune_config=tune.TuneConfig(
                        search_alg=make_searcher(space, search_dir),
                        scheduler=make_scheduler(space, search_dir / ASHA_STATE),
                        num_samples=space.trials,
                        metric=METRIC,
                        mode=MODE,
                        # One trial process runs many trials: a fresh actor per trial cost ~9 s of
                        # start-up (imports, torch, the context) each; see BENCHMARKS.md, overhead.
                        reuse_actors=True,
                    ),
                    run_config=tune.RunConfig(
                        name=EXPERIMENT_DIRNAME,
                        storage_path=str(search_dir),
                        callbacks=_callbacks(space, search_dir, tracking, parent_run_id, progress),
                        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                        failure_config=tune.FailureConfig(max_failures=space.max_failures, fail_fast=False),
                        verbose=0,
                    ),
                )
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                results = tuner.fit()
        finally:
            for key, value in saved_environ.items():
                if value is None:
                    os.environ.pop(key, None)
        summary = _summarize(results, space, search_dir, tracking, parent_run_id)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if progress:
        print(summary.report())
    return summary


def _settle_space(
    space_path, storage_dir: Path, trials, name, resume, cpus, gpus
) -> tuple[SearchSpace, Path, bool]:
    """The space to run, its folder, and whether Ray's experiment is to be restored."""
    given = None
    if space_path is not None:
        given = load_space(space_path).with_overrides(trials, name, cpus, gpus)
    elif not resume:
        raise OrchestratorError("a new search needs a search space file (see search_spaces/)")
    search_name = name or (given.name if given else None)
    if search_name is None:
        raise OrchestratorError("resume needs the search name (--name) or its space file")
    search_dir = storage_dir / search_name
    saved_path = search_dir / "space.yaml"
    experiment_path = search_dir / EXPERIMENT_DIRNAME
    can_restore = experiment_path.exists() and tune.Tuner.can_restore(str(experiment_path))
    if not resume:
        if can_restore or (search_dir / "summary.json").exists():
            raise OrchestratorError(
                f"search '{search_name}' already exists in {search_dir}: pass --resume to continue it, or "
                "--name NEW_NAME to start another"
            )
        return given, search_dir, False
    if not saved_path.exists():
        if given is None:
            raise OrchestratorError(f"nothing to resume: {saved_path} does not exist")
        print(f"no search '{search_name}' to resume in {search_dir}; starting it")
        return given, search_dir, False
    saved = load_space(saved_path)
    if given is not None:  # resources may differ between machines; what is searched and how may not
        changed = sorted(
            k for k, v in given.to_dict().items() if k != "resources" and saved.to_dict().get(k) != v
        )
        if changed:
            raise OrchestratorError(
                f"search '{search_name}' was started with a different space ({', '.join(changed)} differ "
                f"from {saved_path}); resume it unchanged, or start a new search with --name NEW_NAME"
            )
    if not can_restore:
        print(f"search '{search_name}' stopped before its first trial; starting it again")
    if given is not None:
        saved = saved.with_overrides(cpus_per_trial=given.cpus_per_trial, gpus_per_trial=given.gpus_per_trial)
    return saved, search_dir, can_restore


def _settle_tracking(search_dir: Path, tracking_uri: str | None, experiment_name: str) -> SearchTracking:
    """The search keeps the tracking store it started with (its file says which), so resume stays in it."""
    record = search_dir / "tracking.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if tracking_uri is not None and resolve_tracking_uri(tracking_uri) != saved["tracking_uri"]:
            raise OrchestratorError(
                f"search in {search_dir} is tracked in {saved['tracking_uri']}, "
                f"not {resolve_tracking_uri(tracking_uri)}: resume without another tracking URI"
            )
        return SearchTracking(saved["tracking_uri"], saved["experiment_name"])
    tracking = SearchTracking(tracking_uri, experiment_name)
    search_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        json.dumps({"tracking_uri": tracking.tracking_uri, "experiment_name": experiment_name}, indent=2),
        record,
    )
    return tracking


def _connect_ray(address: str | None, progress: bool) -> bool:
    """Join ``address``/``RAY_ADDRESS`` or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=progress)
    else:
        ray.init(include_dashboard=False, log_to_driver=progress)
    return True


def _fit_resources(space: SearchSpace) -> SearchSpace:
    """Trials must fit the cluster: no GPU means CPU trials; more CPUs than any node has is an error."""
    import ray

    resources = ray.cluster_resources()
    if space.gpus_per_trial > 0 and resources.get("GPU", 0) == 0:
        if space.fixed.get("device") == "cuda":
            raise OrchestratorError(
                f"the space asks for device 'cuda' but the Ray cluster has no GPU ({space.source})"
            )
        print(f"no GPU in the Ray cluster: trials run on CPU (resources.gpu {space.gpus_per_trial} -> 0)")
        space = space.with_overrides(gpus_per_trial=0)
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    if space.cpus_per_trial > largest:
        raise OrchestratorError(
            f"each trial asks for {space.cpus_per_trial} CPUs but the largest Ray node has {largest:g}: "
            "lower resources.cpu or --cpus-per-trial"
        )
    return space


def _settle_relabel(search_dir: Path, relabel, existing: bool) -> Path | None:
    """The search's own copy of the label fixes: made at the start, reused (and enforced) on resume."""
    copy = search_dir / RELABEL_COPY
    given = None
    if relabel is not None:
        source = Path(relabel).expanduser()
        try:
            given = source.read_text()
        except OSError as error:
            raise OrchestratorError(f"--relabel {source}: cannot read it ({error.strerror})") from None
    if existing and copy.exists():
        if given is not None and given != copy.read_text():
            raise OrchestratorError(
                f"--relabel {relabel} differs from the label fixes this search started with ({copy}); resume "
                "without --relabel (the saved fixes are used), or start a new search with --name NEW_NAME"
            )
        return copy
    if existing and given is not None:
        raise OrchestratorError(
            f"this search started without label fixes; resume it without --relabel, or start a new search "
            f"with --relabel {relabel} --name NEW_NAME"
        )
    if given is None:
        copy.unlink(missing_ok=True)  # left by an abandoned start
        return None
    write_text_atomic(given, copy)
    return copy


def _prepare(
    data_root: Path,
    space: SearchSpace,
    search_dir: Path,
    cache_dir,
    progress: bool,
    relabel: Path | None = None,
) -> TrialContext:
    """Once per search, before any trial: data, fold file, image cache, pretrained weights."""
    from trainers.cache import prepare_cache
    from trainers.data import read_train
    from trainers.folds import make_folds, read_folds, write_folds
    from trainers.labels import AgeBands
    from trainers.weights import resolve_pretrained

    base = space.config_for({name: param.values[0] for name, param in space.search.items()})
    say = print if progress else (lambda message: None)
    data = read_train(data_root, AgeBands(tuple(base.age_edges)), relabel=relabel)
    for problem in data.problems:
        say(f"warning: {problem}")
    fixed = {field: count for field, count in data.fixes.items() if count}
    if fixed:
        say("label fixes applied (" + RELABEL_COPY + "): " + ", ".join(f"{n} {f}" for f, n in fixed.items()))
    folds_path = search_dir / "folds.csv"
    if folds_path.exists():
        folds = read_folds(folds_path)
        if set(folds["rel_path"]) != set(data.table["rel_path"]) or folds["fold"].nunique() != base.k:
            raise OrchestratorError(
                f"{folds_path} does not match the data in {data_root} (or k={base.k}): the search was "
                "started on other data; use that data root or start a new search with --name NEW_NAME"
            )
    else:
        folds = make_folds(data.table, k=base.k, seed=base.folds_seed)
        write_folds(folds, folds_path)
    if cache_dir is None:
        from trainers.cache import default_cache_dir

        cache_dir = default_cache_dir()
    cache_dir = Path(cache_dir).expanduser().absolute()
    prepare_cache(base, data.table, cache_dir, log=say)
    weights = {
        backbone: resolve_pretrained(backbone, space.pretrained_spec(backbone))
        for backbone in space.backbones()
    }
    for backbone, resolved in weights.items():
        say(f"{backbone}: weights from {resolved.source}")
    (search_dir / "trials").mkdir(parents=True, exist_ok=True)
    return TrialContext(
        space=space,
        table=data.table,
        folds=folds,
        cache_dir=str(cache_dir),
        trials_dir=str(search_dir / "trials"),
        weights=weights,
        log_epochs=progress,
    )


def _start_parent(tracking: SearchTracking, space: SearchSpace, search_dir: Path, data_root: Path) -> str:
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
    tracking.client.log_artifact(parent_run_id, str(search_dir / "space.yaml"))
    tracking.client.log_artifact(parent_run_id, str(search_dir / "folds.csv"))
    if (search_dir / RELABEL_COPY).exists():
        tracking.client.log_artifact(parent_run_id, str(search_dir / RELABEL_COPY))
    return parent_run_id


def _callbacks(space, search_dir, tracking, parent_run_id, progress) -> list[Callback]:
    callbacks: list[Callback] = [
        EarlyStopMarker(),
        MlflowTrialCallback(tracking, parent_run_id, search_dir / "trials", space.config_for),
    ]
    if progress:
        callbacks.append(ProgressTable(list(space.search)))
    return callbacks


# --- after the search -------------------------------------------------------------------------------------


def _trial_rows(results, space: SearchSpace, search_dir: Path) -> list[dict[str, Any]]:
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
        elif metrics.get(STOPPED_EARLY):
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


def _summarize(
    results, space: SearchSpace, search_dir: Path, tracking: SearchTracking, parent_run_id: str
) -> SearchSummary:
    rows = _trial_rows(results, space, search_dir)
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
        "folds": str(search_dir / "folds.csv"),
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
    _log_parent(tracking, parent_run_id, summary, rows, plots)
    return summary


def _prune_checkpoints(
    rows: list[dict], keep_top: int, tracking: SearchTracking, parent_run_id: str
) -> set[str]:
    """Bounded disk: trials outside the best ``keep_top`` lose their checkpoints; none keeps ``last.pt``."""
    ranked = [r for r in rows if r["state"] in ("completed", "stopped_early") and math.isfinite(r["best_f1"])]
    kept = {r["trial_id"] for r in ranked[:keep_top]}
    for row in rows:
        run_dir = Path(row["run_dir"])
        if row["state"] != "failed":
            (run_dir / "last.pt").unlink(
                missing_ok=True
            )  # resume state of a stopped trial: never resumed now
        checkpoints = run_dir / "checkpoints"
        if row["trial_id"] in kept or not checkpoints.exists():
            continue
        shutil.rmtree(checkpoints)
        try:
            run_id = tracking.find_child(parent_run_id, row["trial_id"])
            if run_id is not None:
                tracking.set_tags(run_id, {f"{TAG}checkpoints_deleted": "true"})
        except Exception as error:
            print(
                f"warning: MLflow tag for deleted checkpoints of {row['trial_id']} failed: {error}",
                file=sys.stderr,
            )
    return kept


def _log_parent(
    tracking: SearchTracking, parent_run_id: str, summary: SearchSummary, rows: list[dict], plots: list[Path]
) -> None:
    """The parent run's results; children left RUNNING by an interrupted or killed driver are closed."""
    try:
        client = tracking.client
        search_dir = summary.search_dir
        for name in ("leaderboard.csv", "summary.json"):
            client.log_artifact(parent_run_id, str(search_dir / name))
        client.log_table(
            parent_run_id, summary.leaderboard.drop(columns=["run_dir"]), "leaderboard_table.json"
        )
        for plot in plots:
            client.log_artifact(parent_run_id, str(plot), "plots")
        counts = pd.Series([r["state"] for r in rows]).value_counts().to_dict()
        metrics = {f"trials_{state}": counts.get(state, 0) for state in STATE_ORDER}
        metrics["disk_bytes"] = summary.disk_bytes
        tags = {f"{TAG}finished": str(summary.finished).lower()}
        if summary.best_trial_id is not None:
            metrics["best_val_f1"] = rows[0]["best_f1"]
            tags[f"{TAG}best_trial"] = summary.best_trial_id
            client.log_text(
                parent_run_id, yaml.safe_dump(summary.best_config, sort_keys=False), "best_config.yaml"
            )
        tracking.log_metrics(parent_run_id, metrics)
        tracking.set_tags(parent_run_id, tags)
        known = {r["trial_id"] for r in rows}
        for child in tracking.child_runs(parent_run_id):
            if child.info.status == "RUNNING":
                orphan = child.data.tags.get(f"{TAG}trial_id") not in known
                tracking.set_tags(
                    child.info.run_id, {f"{TAG}{'orphaned' if orphan else 'interrupted'}": "true"}
                )
                tracking.finish(child.info.run_id, "KILLED")
        tracking.finish(parent_run_id, "FINISHED" if summary.finished else "KILLED")
    except Exception as error:
        print(f"warning: MLflow results of the search not fully logged: {error}", file=sys.stderr)


def plot_study(search_dir: Path, study_name: str) -> list[Path]:
    """Optimisation history and parameter importances of the Optuna study, as PNGs in ``plots/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna

    out = Path(search_dir) / "plots"
    out.mkdir(exist_ok=True)
    try:
        study = optuna.load_study(study_name=study_name, storage=optuna_storage_url(search_dir))
    except Exception as error:
        print(f"warning: no Optuna study to plot: {error}", file=sys.stderr)
        return []
    written = []
    drawers = {
        "optimization_history.png": optuna.visualization.matplotlib.plot_optimization_history,
        "param_importances.png": optuna.visualization.matplotlib.plot_param_importances,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for filename, draw in drawers.items():
            try:
                axes = draw(study)
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            except Exception as error:  # e.g. importances need two completed trials
                if filename != "optimization_history.png":
                    print(f"note: {filename} not drawn: {error}")
                    continue
                figure = _plain_history(study, plt)
            written.append(_save_figure(figure, out / filename))
            plt.close(figure)
    return written


def _plain_history(study, plt):
    """Optimisation history drawn with plain matplotlib (when Optuna's own plot is unavailable)."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    figure, axes = plt.subplots(figsize=(6, 4))
    numbers = [t.number for t in done]
    values = [t.value for t in done]
    axes.scatter(numbers, values, label="trial")
    axes.plot(numbers, pd.Series(values, dtype=float).cummax(), color="C1", label="best so far")
    axes.set(xlabel="trial", ylabel="mean val macro F1", title="optimisation history")
    axes.legend()
    return figure


def _save_figure(figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
    return path


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
