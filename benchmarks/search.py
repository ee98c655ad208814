"""Sections ``overhead`` and ``asha``: real searches through ``orchestrator.search.run_search``.

``overhead``: a search of N trials (Ray Tune + Optuna + MLflow, one trial at a time) against the same
trials' ``trainers.fit.fit`` run bare in one process. ``asha``: the same space and seed with and without
ASHA: epochs trained and best mean CV macro F1. The no-ASHA search serves both.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks.data import read_table
from benchmarks.settings import BenchError, BenchSettings, available_cpus, ratio, summarize_runs
from trainers import cache as image_cache
from trainers.config import TrainConfig
from trainers.fit import fit
from trainers.io import write_text_atomic


@dataclass
class SearchRun:
    """One benchmark search: its wall time and, per trial, the config, epochs, best F1 and fit time."""

    name: str
    asha: bool
    wall_seconds: float
    trials: list[dict[str, Any]]  # in the order they ran
    search_dir: Path
    started_at: float = 0.0  # wall clock (time.time) around the run_search call
    ended_at: float = 0.0
    finished: bool = True  # False: the search was interrupted (Ray Tune catches Ctrl-C and returns)

    def timeline(self) -> dict[str, Any]:
        """Where the search's time went outside the trials' fits (run folder file times)."""
        starts = [t["fit_started"] for t in self.trials]
        ends = [t["fit_ended"] for t in self.trials]
        return {
            "before_first_trial": starts[0] - self.started_at,
            "between_trials": [start - end for start, end in zip(starts[1:], ends[:-1], strict=True)],
            "after_last_trial": self.ended_at - ends[-1],
        }

    @property
    def epochs(self) -> int:
        return sum(int(t["epochs"]) for t in self.trials)

    @property
    def best_f1(self) -> float:
        scores = [t["best_f1"] for t in self.trials if t["best_f1"] is not None]
        return max(scores) if scores else float("nan")


def bench_space(settings: BenchSettings, name: str, seed: int, asha: bool) -> dict[str, Any]:
    """A small search space: one backbone, searched lr / focal gamma / weight decay; trials one at a time.

    The lr range is wide on purpose: some trials are plainly worse early on, as in a real search.
    """
    return {
        "name": name,
        "description": "foldtune bench search",
        "trials": settings.search_trials,
        "fixed": {
            "backbone": settings.search_backbone,
            "pretrained": "auto" if settings.search_weights == "auto" else False,
            "freeze_depth": settings.search_freeze,
            "epochs": settings.search_epochs,
            "k": settings.search_k,
            "image_size": list(settings.search_size),
            "batch_size": settings.search_batch_size,
            "warmup_epochs": 0.5,
            "patience": 0,
            "augment": dict(settings.augment),
            "tta": ["hflip"],
            "num_workers": 0,
            "device": "cpu",
            "seed": seed,
        },
        "search": {
            "lr": {"loguniform": [3.0e-4, 3.0e-2]},
            "focal_gamma": {"uniform": [0.0, 3.0]},
            "weight_decay": {"loguniform": [1.0e-3, 1.0e-1]},
        },
        "resources": {"cpu": settings.threads or available_cpus(), "gpu": 0},
        "max_concurrent": 1,
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}} if asha else "none",
        "sampler": {"seed": seed, "n_startup_trials": max(1, settings.search_trials // 2)},
        "keep_top": 1,
        "max_failures": 0,
    }


def _fit_times(run_dir: Path) -> tuple[float, float]:
    """When a run folder's fit started and ended: fit writes config.yaml first and result.json last.

    A trial the scheduler stopped never writes result.json; its last epoch's metrics file ends it.
    """
    started = (run_dir / "config.yaml").stat().st_mtime
    for last in ("result.json", "metrics/epochs.csv"):
        if (run_dir / last).exists():
            return started, (run_dir / last).stat().st_mtime
    raise BenchError(f"{run_dir} holds no result.json or metrics/epochs.csv: the trial never trained")


def run_bench_search(
    data_root: Path,
    settings: BenchSettings,
    work_dir: Path,
    cache_dir: Path,
    seed: int,
    asha: bool,
    log=print,
) -> SearchRun:
    """One search through ``orchestrator.search.run_search``, timed from the call to its return."""
    from orchestrator.search import run_search

    name = f"bench-{'asha' if asha else 'noasha'}-seed{seed}"
    space_path = work_dir / "spaces" / f"{name}.yaml"
    space_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(yaml.safe_dump(bench_space(settings, name, seed, asha), sort_keys=False), space_path)
    storage = work_dir / "searches"
    shutil.rmtree(storage / name, ignore_errors=True)
    log(
        f"search {name}: {settings.search_trials} trials x {settings.search_epochs} epochs x "
        f"{settings.search_k} folds"
    )
    started, started_at = time.perf_counter(), time.time()
    summary = run_search(
        data_root=data_root,
        space_path=space_path,
        storage=storage,
        tracking_uri=str(work_dir / "mlruns" / "mlflow.db"),
        cache_dir=cache_dir,
        progress=False,
    )
    wall, ended_at = time.perf_counter() - started, time.time()
    payload = json.loads((summary.search_dir / "summary.json").read_text())
    failed = [t for t in payload["trials"] if t["status"] == "failed"]
    if failed:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in failed)
        raise BenchError(f"search {name}: {len(failed)} trial(s) failed ({errors})")
    trials = []
    for t in payload["trials"]:
        fit_started, fit_ended = _fit_times(Path(t["run_dir"]))
        trials.append(
            {
                "trial_id": t["trial_id"],
                "status": t["status"],
                "epochs": int(t["epochs"]),
                "best_f1": t["best_f1"],
                "params": t["params"],
                "config": t["config"],
                "fit_started": fit_started,
                "fit_ended": fit_ended,
                "fit_seconds": fit_ended - fit_started,
            }
        )
    trials.sort(key=lambda t: t["fit_started"])
    return SearchRun(name, asha, wall, trials, summary.search_dir, started_at, ended_at, payload["finished"])


def run_bare(
    trials: Sequence[dict[str, Any]],
    data_root: Path,
    folds_path: Path,
    cache_dir: Path,
    work_dir: Path,
    threads: int,
) -> list[dict[str, float]]:
    """The same trial configs through ``trainers.fit.fit`` here, one after another.

    Each trial gives the seconds of the whole ``fit`` call and, measured as in the search, its run folder's
    fit time (config.yaml to result.json).
    """
    from trainers.data import read_train
    from trainers.folds import read_folds
    from trainers.weights import resolve_pretrained

    table = read_train(data_root).table
    folds = read_folds(folds_path)
    weights = {}  # resolved once per backbone, as the search's driver does, so fit only loads them
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # what run_trial gives a trial of resources.cpu = threads
    timings = []
    try:
        for trial in trials:
            cfg = TrainConfig.from_dict(trial["config"])
            if cfg.backbone not in weights:
                weights[cfg.backbone] = resolve_pretrained(cfg.backbone, cfg.pretrained)
            run_dir = work_dir / "bare" / trial["trial_id"]
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.perf_counter()
            result = fit(
                cfg, table, folds, run_dir, cache_dir, resolved_weights=weights[cfg.backbone], log=None
            )
            fit_started, fit_ended = _fit_times(run_dir)
            timings.append({"seconds": time.perf_counter() - started, "fit_seconds": fit_ended - fit_started})
            if result.status == "diverged":
                raise BenchError(f"bare fit of trial {trial['trial_id']} diverged: {result.message}")
    finally:
        torch.set_num_threads(previous_threads)
    return timings


class SearchBench:
    """Runs (and remembers) the searches sections 2 and 3 share: the no-ASHA search serves both."""

    def __init__(self, data_root: Path, settings: BenchSettings, work_dir: Path, log):
        self.data_root, self.settings, self.work_dir, self.log = data_root, settings, work_dir, log
        self.cache_dir = work_dir / "search-cache"
        # the cache the searches' driver would build (same paths, size, no crop), built before any timing so
        # neither the searches nor the bare runs pay for decoding
        paths = sorted(read_table(data_root)["image_path"])
        image_cache.build_cache(paths, settings.search_size, self.cache_dir)
        self._runs: dict[tuple[bool, int], SearchRun] = {}
        self.cpus_per_trial = settings.threads or available_cpus()

    def search(self, seed: int, asha: bool) -> SearchRun:
        key = (asha, seed)
        if key not in self._runs:
            self._runs[key] = run_bench_search(
                self.data_root, self.settings, self.work_dir, self.cache_dir, seed, asha, self.log
            )
        return self._runs[key]

    def seeds(self) -> list[int]:
        return [self.settings.seed + repeat for repeat in range(self.settings.search_repeats)]


def bench_overhead(searches: SearchBench) -> dict[str, Any]:
    """Search wall time vs the sum of the same trials' bare ``fit`` times; split into fixed and per trial."""
    repeats = []
    for seed in searches.seeds():
        run = searches.search(seed, asha=False)
        unfinished = [f"{t['trial_id']} ({t['status']})" for t in run.trials if t["status"] != "completed"]
        if unfinished or len(run.trials) < searches.settings.search_trials:
            listed = ", ".join(unfinished) or "too few trials"
            raise BenchError(
                f"search {run.name} did not complete every trial ({listed}): no overhead to compare "
                "(was it interrupted?)"
            )
        searches.log(f"overhead: bare fit of the {len(run.trials)} trials of {run.name}")
        bare = run_bare(
            run.trials,
            searches.data_root,
            run.search_dir / "folds.csv",
            searches.cache_dir,
            searches.work_dir,
            searches.cpus_per_trial,
        )
        trials = len(run.trials)
        bare_total = sum(t["seconds"] for t in bare)
        # the same clock in both places: a run folder's config.yaml -> result.json
        in_search = [t["fit_seconds"] for t in run.trials]
        in_bare = [t["fit_seconds"] for t in bare]
        timeline = run.timeline()
        # Ray start-up and shutdown, data, folds, weights, Optuna study, MLflow parent run, summary, plots
        fixed = timeline["before_first_trial"] + timeline["after_last_trial"]
        # a trial's process start, imports and context between one fit's end and the next one's start
        trial_start = statistics.fmean(timeline["between_trials"]) if trials > 1 else 0.0
        # inside a fit: Tune reports and checkpoints each epoch, and the driver's work competing for the CPU
        inside = (sum(in_search) - sum(in_bare)) / trials
        repeats.append(
            {
                "seed": seed,
                "search_wall_seconds": run.wall_seconds,
                "bare_fit_seconds": bare_total,
                "overhead": ratio(run.wall_seconds, bare_total) - 1,
                "fixed_seconds": fixed,
                "before_first_trial_seconds": timeline["before_first_trial"],
                "after_last_trial_seconds": timeline["after_last_trial"],
                "trial_start_seconds": trial_start,
                "inside_trial_seconds": inside,
                "per_epoch_seconds": inside * trials / max(1, run.epochs),
                # how long each trial must take for the whole search to stay within 5% overhead
                "trial_seconds_for_5_percent": max(
                    0.0, (fixed + trials * (trial_start + inside)) / (0.05 * trials)
                ),
                "epochs": run.epochs,
                "trial_fit_seconds_in_search": in_search,
                "trial_fit_seconds_bare": in_bare,
                "between_trials_seconds": timeline["between_trials"],
                "bare_call_seconds": [t["seconds"] for t in bare],
            }
        )
    return {
        "trials": searches.settings.search_trials,
        "epochs_per_trial": searches.settings.search_epochs,
        "k": searches.settings.search_k,
        "backbone": searches.settings.search_backbone,
        "image_size": list(searches.settings.search_size),
        "max_concurrent": 1,
        "cpus_per_trial": searches.cpus_per_trial,
        "search_wall_seconds": summarize_runs([r["search_wall_seconds"] for r in repeats]),
        "bare_fit_seconds": summarize_runs([r["bare_fit_seconds"] for r in repeats]),
        "overhead": summarize_runs([r["overhead"] for r in repeats]),
        "fixed_seconds": summarize_runs([r["fixed_seconds"] for r in repeats]),
        "trial_start_seconds": summarize_runs([r["trial_start_seconds"] for r in repeats]),
        "inside_trial_seconds": summarize_runs([r["inside_trial_seconds"] for r in repeats]),
        "per_epoch_seconds": summarize_runs([r["per_epoch_seconds"] for r in repeats]),
        "trial_seconds_for_5_percent": summarize_runs([r["trial_seconds_for_5_percent"] for r in repeats]),
        "repeats": repeats,
    }


def bench_asha(searches: SearchBench) -> dict[str, Any]:
    """The same space and seed with and without ASHA: total epochs trained and best mean CV macro F1."""
    repeats = []
    for seed in searches.seeds():
        without = searches.search(seed, asha=False)
        with_asha = searches.search(seed, asha=True)
        repeats.append(
            {
                "seed": seed,
                # False when a search was interrupted: its epochs and best F1 cover only what it ran
                "finished": without.finished and with_asha.finished,
                "epochs_without": without.epochs,
                "epochs_with": with_asha.epochs,
                "epoch_share": ratio(with_asha.epochs, without.epochs),
                "best_f1_without": without.best_f1,
                "best_f1_with": with_asha.best_f1,
                "best_f1_gap": without.best_f1 - with_asha.best_f1,
                "wall_seconds_without": without.wall_seconds,
                "wall_seconds_with": with_asha.wall_seconds,
                "trials_without": [_trial_brief(t) for t in without.trials],
                "trials_with": [_trial_brief(t) for t in with_asha.trials],
            }
        )
    return {
        "trials": searches.settings.search_trials,
        "epochs_per_trial": searches.settings.search_epochs,
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "epochs_without": summarize_runs([r["epochs_without"] for r in repeats]),
        "epochs_with": summarize_runs([r["epochs_with"] for r in repeats]),
        "epoch_share": summarize_runs([r["epoch_share"] for r in repeats]),
        "best_f1_without": summarize_runs([r["best_f1_without"] for r in repeats]),
        "best_f1_with": summarize_runs([r["best_f1_with"] for r in repeats]),
        "best_f1_gap": summarize_runs([r["best_f1_gap"] for r in repeats]),
        "repeats": repeats,
    }


def _trial_brief(trial: dict[str, Any]) -> dict[str, Any]:
    return {k: trial[k] for k in ("trial_id", "status", "epochs", "best_f1", "params")}
