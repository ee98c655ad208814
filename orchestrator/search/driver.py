"""The driver: one call that starts (or resumes) a search and returns its summary.

``run_search`` reads as the search's steps: settle which search this is (``settle``), join or start Ray
and fit the trials to it, prepare what every trial shares (``prepare``), open the MLflow parent run,
build Tune's tuner (new, or restored from ``tune/`` on resume), let it run the trials, and summarise
(``summary``). Every way out after the parent run is opened (an exception, Ctrl+C, or SIGTERM, which takes
Ctrl+C's path) closes what the search opened in Optuna and MLflow (``closing``). Everything else the search
does lives in the room named for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune import Callback

from orchestrator.errors import OrchestratorError
from orchestrator.plan import describe_plan
from orchestrator.search.budget import BUDGET_FILE, BudgetStopper, settle_budget
from orchestrator.search.capacity import AUTO, auto_space_file, capacity, cluster_nodes
from orchestrator.search.closing import (
    SearchInterrupted,
    SettleLeftovers,
    close_after,
    fail_running_trials_quietly,
    finished_trials,
    interrupted_line,
)
from orchestrator.search.console import ProgressTable
from orchestrator.search.constants import (
    ASHA_STATE,
    EXPERIMENT_DIRNAME,
    FOLDS_FILE,
    METRIC,
    MODE,
    RELABEL_COPY,
)
from orchestrator.search.disk_full import DiskFull, DiskFullStop, guard_trial, stopped_line
from orchestrator.search.disk_notices import full_disk_path, open_notices, read_notices
from orchestrator.search.final import train_final
from orchestrator.search.gpu_jobs import workers_for
from orchestrator.search.optuna_adapter import make_searcher
from orchestrator.search.prepare import prepare
from orchestrator.search.promote import promote_screened
from orchestrator.search.settle import settle_relabel, settle_space, settle_tracking
from orchestrator.search.stopping import EarlyStops, make_scheduler
from orchestrator.search.summary import SearchSummary, summarize
from orchestrator.search.trial import TrialContext, run_trial
from orchestrator.signals import on_sigterm
from orchestrator.space import SearchSpace
from orchestrator.tracking.provenance import search_inputs
from orchestrator.tracking.search_log import SearchLog, send_outbox
from orchestrator.tracking.search_runs import start_parent_run
from orchestrator.tracking.trials import MlflowTrialCallback
from trainers.config import TrainConfig
from trainers.io import write_text_atomic

TUNE_ENVIRON = {  # set for the driver's Tune loop unless the user set them
    # Tune's newer console output prints a config box, the results path and a TensorBoard hint even at
    # verbose=0; foldtune prints its own trial table, so the quiet legacy reporter is used instead
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_GLOBAL_CHECKPOINT_S": "2",  # experiment snapshot period: what a killed driver can lose at most
    # every report checkpoints (num_to_keep=1 forces a snapshot each time); the marker is tiny, so no warning
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}


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
    folds_file: str | os.PathLike | None = None,
    trial_fn: Callable[[dict[str, Any], TrialContext], None] | None = None,
    hash_images: bool = False,
    holdout: float | str | None = None,
    time_budget_minutes: float | None = None,
) -> SearchSummary:
    """Run (or with ``resume``, continue) a search; see the package docstring for what is written where.

    ``address`` (or ``RAY_ADDRESS``) joins an existing Ray cluster; otherwise a local one is started.
    ``retry_failed`` restarts failed trials from scratch on resume (they stay failed by default).
    ``relabel`` is a label-fix CSV (see trainers.data); a copy is kept in the search folder as
    ``relabel.csv``, used again on resume and logged to MLflow, so every trial sees the same labels.
    ``folds_file`` is a fold file (``foldtune folds``) to split by instead of a new split; it must cover
    exactly the data's images in k folds. It becomes the search's ``folds.csv``, which a resume keeps.
    ``trial_fn`` is what each trial runs instead of ``run_trial``, called the same way, as
    ``trial_fn(params, context)`` in a Ray trial process, reporting with ``ray.tune.report`` (tests use it
    to run the real driver and scheduling with a stand-in trial); a resume must pass the same one.
    ``hash_images`` makes the training data's MLflow digest hash the image bytes, not paths/sizes/mtimes.
    ``holdout`` (a share of persons, overriding the space's) keeps persons out of every fold for the
    ensemble to score the submission on. ``time_budget_minutes`` ends the search there (``budget``): no
    trial starts after it, running ones are cut keeping their best fold models; a resume gets the rest.

    The summary says whether the search finished with a result (``summary.problem()`` is the one line to
    show when not). Ctrl+C or SIGTERM during the trials ends it interrupted (Tune saves the experiment);
    outside Tune's graceful stop (a second one, or before the trials) it raises ``SearchInterrupted``, whose
    message is that line. Either way nothing is left RUNNING in Optuna or MLflow.
    """
    storage_dir = Path(storage or "runs").expanduser().absolute()
    started_ray, chosen, phases = False, None, None
    began = time.monotonic()  # the preparation before the trials is recorded beside the budget (prep_s)
    try:
        if str(space_path) == AUTO:  # the machine decides: Ray first, then the usual checks
            started_ray = _connect_ray(address, progress)
            space_path, why = auto_space_file(sum(node.gpus for node in cluster_nodes()))
            chosen = f"{why}: {space_path.name}"
        space, search_dir, restoring = settle_space(
            space_path, storage_dir, trials, name, resume, cpus_per_trial, gpus_per_trial, holdout
        )
        tracking = settle_tracking(search_dir, tracking_uri, space.name)
        started_before = resume and (search_dir / "space.yaml").exists()
        relabel_copy = settle_relabel(search_dir, relabel, started_before)
        budget = settle_budget(search_dir, space.name, time_budget_minutes, started_before)
        write_text_atomic(space.to_yaml(), search_dir / "space.yaml")
        data_root = Path(data_root).expanduser().absolute()
        started_ray = _connect_ray(address, progress) or started_ray
        with _sigterm_as_interrupt():
            space = _fit_resources(space, progress, chosen)
            context = prepare(
                data_root,
                space,
                search_dir,
                cache_dir,
                progress,
                relabel_copy,
                folds_file=folds_file,
                resuming=started_before,
            )
            tracking.inputs = search_inputs(data_root, context.table["image_path"], search_dir, hash_images)
            _send_what_waits(search_dir, tracking, progress)
            parent_run_id = start_parent_run(
                tracking, space, search_dir, data_root, _parent_artifacts(search_dir)
            )
            log = SearchLog(tracking, parent_run_id, search_dir, space.name)
            # counts the trials, not the preparation; with a plan, the screen's share of what is left
            phases = budget.start(prep_s=time.monotonic() - began, plan=space.plan)
            if budget.total_s is not None and progress:
                print(budget.describe())
            if phases is not None:  # the trials screen on few folds; the final model follows them
                context = dataclasses.replace(context, space=space.screening())
                space = space.screening()
                if progress:
                    print(describe_plan(space.plan, phases, int(space.fixed.get("k", TrainConfig().k))))
            summary = _tune(
                trial_fn or run_trial,
                context,
                space,
                search_dir,
                log,
                restoring,
                retry_failed,
                progress,
                budget,
            )
        if phases is not None and summary.finished:  # not after Ctrl+C: --resume continues the screen
            try:  # with Ray still up: on GPUs the promotions and final models are Ray tasks (gpu_jobs)
                on_promoted, workers = _log_promotion(log), workers_for(space)
                summary.promoted = promote_screened(
                    data_root, space, search_dir, budget, cache_dir, progress, on_promoted, workers
                )
                summary.final = train_final(
                    data_root, space, search_dir, budget, cache_dir, tracking.tracking_uri, progress, workers
                )
            finally:  # billed however it ends (a Ctrl+C in the final model too)
                budget.record()
                log.finish()  # one line for promotion records still waiting for the store, if any
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if progress:
        print(summary.report())
    return summary


def _log_promotion(log: SearchLog):
    """What the driver does with each promotion's record: the trial's MLflow child run gets its k-fold
    figures (a failed or diverged promotion left the screened run as it was: nothing new to log)."""
    from trainers.screened import FINISHED

    def logged(record: dict) -> None:
        if record.get("status") in FINISHED:
            log.record("trial_promoted", trial_id=record["trial_id"], record=record)

    return logged


def _send_what_waits(search_dir: Path, tracking, progress: bool) -> None:
    """MLflow records a previous driver of this search left waiting for the store (``search_log``): sent
    before this driver writes anything, so the store gets them in order."""
    sent, left = send_outbox(search_dir, tracking)
    if sent and progress:
        print(f"sent {sent} MLflow record(s) the last driver left waiting", flush=True)
    if left:  # the store answers but does not take them now: this driver's records queue behind them
        print(
            f"warning: {left} MLflow record(s) of the last driver still wait in {search_dir}: the store "
            f"{tracking.tracking_uri} does not take them now; they are sent in order when it does",
            file=sys.stderr,
            flush=True,
        )


def _tune(
    trial_fn, context, space, search_dir, log, restoring, retry_failed, progress, budget
) -> SearchSummary:
    """Build (or restore) Tune's experiment, run it, summarise it; every way out closes what the search
    opened in Optuna and MLflow (``closing``), and an interruption outside Tune's own graceful stop ends
    as ``SearchInterrupted`` with the one line to show. MLflow records still waiting for the store at the
    end are one line (``SearchLog.finish``)."""
    try:
        return _tune_and_summarize(
            trial_fn, context, space, search_dir, log, restoring, retry_failed, progress, budget
        )
    finally:
        with contextlib.suppress(Exception):  # never hide how the search ended
            log.finish()


def _tune_and_summarize(
    trial_fn, context, space, search_dir, log, restoring, retry_failed, progress, budget
) -> SearchSummary:
    board = open_notices(search_dir)  # where trials say their disk is full (``disk_full``)
    try:
        trainable = _trainable(guard_trial(trial_fn, search_dir), context, space)
        with _tune_environ(), _no_tuner_restore_advice():
            if restoring:
                tuner = _restored_tuner(trainable, search_dir, space, retry_failed)
            else:
                tuner = _new_tuner(trainable, space, search_dir, log, progress)
            with warnings.catch_warnings(), _callers_interrupt_handlers_back():
                warnings.filterwarnings("ignore", category=FutureWarning)
                results = tuner.fit()
        notices = read_notices(board)
        if notices:  # a trial's disk is full: Tune stopped gracefully, the trials continue on --resume
            raise DiskFull(_disk_full_line(space, search_dir, notices[0]["path"]))
        budget.record()
        cut = budget.stopped()
        # Tune returns early when Ctrl+C, SIGTERM or the time budget stopped it: the trials it left stop
        # here too (the budget's stop calls no completion callback: their MLflow runs are closed here)
        fail_running_trials_quietly(search_dir, space.name)
        if cut:
            log.runs_closed()
        return summarize(results, space, search_dir, log, budget_spent=cut)
    except BaseException as error:
        with contextlib.suppress(OSError):  # never hide the error that ended the search
            budget.record()
        full = None if isinstance(error, KeyboardInterrupt) else full_disk_path(error)
        if full is not None:  # the driver's own writes (Tune's snapshot, optuna.db, the search folder)
            error = DiskFull(_disk_full_line(space, search_dir, full))
        close_after(error, log, search_dir, space.name)
        if isinstance(error, DiskFull):
            raise error from None
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, SearchInterrupted):
            finished = finished_trials(search_dir, space.name)
            raise SearchInterrupted(interrupted_line(space.name, finished, space.trials)) from None
        raise
    finally:
        with contextlib.suppress(Exception):
            ray.kill(board)


def _disk_full_line(space: SearchSpace, search_dir: Path, path: str) -> str:
    return stopped_line(space.name, path, search_dir, space.trials, finished_trials(search_dir, space.name))


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes Ctrl+C's path while the driver runs: Tune's graceful stop during ``tuner.fit`` (the
    trials stop, the experiment is saved, the search ends interrupted), KeyboardInterrupt elsewhere. A
    second one, like a second Ctrl+C, stops at once."""

    def as_ctrl_c(signum, frame) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)  # Tune's handler, or Python's (raises KeyboardInterrupt)
        else:  # SIGINT ignored or default: stop the driver anyway
            raise KeyboardInterrupt

    with on_sigterm(as_ctrl_c):
        yield


@contextlib.contextmanager
def _callers_interrupt_handlers_back() -> Iterator[None]:
    """Tune installs its own SIGINT and SIGUSR1 handlers for ``tuner.fit`` and leaves them installed after
    it returns (Ray 2.60): put the caller's back, so that after the search Ctrl+C is the caller's again
    (not a flag nobody reads) and the time budget's stopper finds no Tune to ask outside a fit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for number, handler in saved.items():
            if handler is not None:  # None: set outside Python, cannot be restored from here
                signal.signal(number, handler)


# --- Ray ---------------------------------------------------------------------------------------------------


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


def _fit_resources(space: SearchSpace, progress: bool = True, chosen: str | None = None) -> SearchSpace:
    """Trials must fit the cluster: no GPU means CPU trials; more CPUs than any node has is an error; a
    device that contradicts the GPU share is an error; ``max_concurrent: auto`` becomes what the cluster
    holds (``capacity``). ``chosen`` says which space ``--space auto`` took and why; the first line printed
    says that and how many trials run at once ("8 GPUs: default.yaml, 16 trials at once at 0.5 GPU ...")."""
    nodes = cluster_nodes()
    device = space.fixed.get("device", "auto")
    if space.gpus_per_trial > 0 and sum(node.gpus for node in nodes) == 0:
        if device == "cuda":
            raise OrchestratorError(
                f"the space asks for device 'cuda' but the Ray cluster has no GPU ({space.source})"
            )
        print(f"no GPU in the Ray cluster: trials run on CPU (resources.gpu {space.gpus_per_trial} -> 0)")
        space = space.with_overrides(gpus_per_trial=0)
    if device == "cpu" and space.gpus_per_trial > 0:
        raise OrchestratorError(
            f"the space trains on device 'cpu' but reserves {space.gpus_per_trial:g} GPU per trial, which "
            f"would idle ({space.source}): set resources.gpu: 0, or device: auto to train on the GPUs"
        )
    if device == "cuda" and space.gpus_per_trial == 0:
        raise OrchestratorError(
            f"the space asks for device 'cuda' but gives trials no GPU (resources.gpu 0, {space.source}): "
            "set resources.gpu (e.g. 0.5), or --gpus-per-trial"
        )
    largest = max((node.cpus for node in nodes), default=0)
    if space.cpus_per_trial > largest:
        raise OrchestratorError(
            f"each trial asks for {space.cpus_per_trial} CPUs but the largest Ray node has {largest:g}: "
            "lower resources.cpu or --cpus-per-trial"
        )
    held = capacity(nodes, space.cpus_per_trial, space.gpus_per_trial)
    if space.max_concurrent == AUTO:
        space = dataclasses.replace(space, max_concurrent=max(1, held.trials))
        running = held.describe(space.cpus_per_trial, space.gpus_per_trial) + " (max_concurrent auto)"
    else:
        running = f"{min(space.max_concurrent, max(1, held.trials))} trials at once (max_concurrent "
        running += f"{space.max_concurrent}; the cluster holds {held.trials})"
    if progress:
        print(f"{chosen or f'space {space.name}'}: {running}")
    return space


# --- Tune --------------------------------------------------------------------------------------------------


def _parent_artifacts(search_dir: Path) -> list[Path]:
    """The files the parent run keeps from the start: the space, the fold file, the label fixes if any."""
    artifacts = [search_dir / "space.yaml", search_dir / FOLDS_FILE]
    if (search_dir / RELABEL_COPY).exists():
        artifacts.append(search_dir / RELABEL_COPY)
    return artifacts


def _trainable(trial_fn, context: TrialContext, space: SearchSpace):
    """``trial_fn`` (``run_trial`` unless a caller gives another) with the shared context and each trial's
    resources."""
    return tune.with_resources(
        tune.with_parameters(trial_fn, context=context),
        {"cpu": space.cpus_per_trial, "gpu": space.gpus_per_trial},
    )


@contextlib.contextmanager
def _tune_environ() -> Iterator[None]:
    """``TUNE_ENVIRON`` for the Tune loop, where the user has not set them; removed again afterwards."""
    saved_environ = {key: os.environ.get(key) for key in TUNE_ENVIRON}
    for key, value in TUNE_ENVIRON.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved_environ.items():
            if value is None:
                os.environ.pop(key, None)


class _TunerRestoreAdvice(logging.Filter):
    """Drops Tune's "interrupted ... Resume experiment with: Tuner.restore(...)": foldtune's own line says
    how to continue (``--resume``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(line in message for line in self.LINES)

    LINES = (
        "has been interrupted, but the most recent state was saved",
        "Stop signal received",  # also the time budget's stop, which the summary reports itself
        "Trials did not complete",
    )


@contextlib.contextmanager
def _no_tuner_restore_advice() -> Iterator[None]:
    logger, advice = logging.getLogger("ray.tune.tune"), _TunerRestoreAdvice()
    logger.addFilter(advice)
    try:
        yield
    finally:
        logger.removeFilter(advice)


def _restored_tuner(trainable, search_dir: Path, space: SearchSpace, retry_failed: bool) -> tune.Tuner:
    """Tune's experiment in ``tune/``, with its searcher, scheduler and callbacks as they were saved."""
    experiment_path = search_dir / EXPERIMENT_DIRNAME
    print(f"resuming search '{space.name}' from {experiment_path}")
    return tune.Tuner.restore(
        str(experiment_path),
        trainable=trainable,
        resume_unfinished=True,
        resume_errored=False,
        restart_errored=retry_failed,
    )


def _new_tuner(
    trainable,
    space: SearchSpace,
    search_dir: Path,
    log: SearchLog,
    progress: bool,
) -> tune.Tuner:
    """A fresh experiment: Optuna proposes, ASHA stops, results go to ``tune/``, MLflow and the console."""
    for stale in ("optuna.db", ASHA_STATE):  # left by an abandoned start
        (search_dir / stale).unlink(missing_ok=True)
    return tune.Tuner(
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
            callbacks=_callbacks(space, search_dir, log, progress),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            stop=BudgetStopper(search_dir / BUDGET_FILE),  # no deadline unless a budget is set
            failure_config=tune.FailureConfig(max_failures=space.max_failures, fail_fast=False),
            verbose=0,
        ),
    )


def _callbacks(space, search_dir, log: SearchLog, progress) -> list[Callback]:
    early_stops = EarlyStops(search_dir / ASHA_STATE)  # the scheduler's record of the trials it stopped
    callbacks: list[Callback] = [
        SettleLeftovers(search_dir, space.name, log),
        MlflowTrialCallback(log, space.config_for, early_stops),
        DiskFullStop(search_dir),
    ]
    if progress:
        callbacks.append(ProgressTable(list(space.search), early_stops=early_stops))
    return callbacks
