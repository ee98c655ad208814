"""Nothing left RUNNING: what a driver closes on every way out, and what a resumed driver settles first.

A search writes two records besides its folder: the Optuna study (``optuna.db``) and the MLflow runs. A
driver that ends without finishing (an exception, Ctrl+C, SIGTERM, which the driver turns into Ctrl+C)
closes both: Optuna trials still RUNNING become FAIL with the user attribute ``interrupted``, child runs
still RUNNING become KILLED (tag ``interrupted``), the parent run KILLED (interrupted) or FAILED (with the
error). A driver killed outright (SIGKILL, a lost machine) closes nothing, so a resumed driver first
settles what it left: on its first step ``SettleLeftovers`` tells Optuna the trials Tune finished but
Optuna never heard of (its write failed: a full disk), marks FAIL the Optuna trials still RUNNING whose Ray
trial is not about to continue, and KILLED their child runs; the trials Ray continues stay
RUNNING until they end (their Optuna trial is re-attached if an interrupted driver had closed it).
"""

from __future__ import annotations

import sys
from pathlib import Path

from ray.tune import Callback

from orchestrator.search.constants import ASHA_STATE, METRIC, TIME_ATTR
from orchestrator.search.optuna_adapter import (
    INTERRUPTED,
    fail_running_trials,
    study_storage,
    tell_ended_trials,
)
from orchestrator.search.stopping import EarlyStops
from orchestrator.tracking.search_log import SearchLog


def interrupted_line(name: str, finished: int, planned: int) -> str:
    """The one line an interrupted search ends with."""
    return f"search '{name}' interrupted: {finished} of {planned} trials finished; continue with --resume"


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl+C or SIGTERM ended the search outside Tune's own graceful stop; the message is the one line."""


def close_after(error: BaseException, log: SearchLog, search_dir: Path, name: str) -> None:
    """Close what the driver opened after it ended on ``error`` (see the module docstring)."""
    fail_running_trials_quietly(search_dir, name)
    log.search_closed(error)


def fail_running_trials_quietly(search_dir: Path, name: str, keep=()) -> list[int]:
    try:
        return fail_running_trials(search_dir, name, keep)
    except Exception as error:  # the study is a record: never hide the error that ended the search
        print(f"warning: Optuna trials left RUNNING in {search_dir / 'optuna.db'}: {error}", file=sys.stderr)
        return []


def finished_trials(search_dir: Path, name: str) -> int:
    """Trials that ended (completed, stopped early, failed) by the study's record; 0 when unreadable."""
    try:
        import optuna

        study = optuna.load_study(study_name=name, storage=study_storage(search_dir))
        ended = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        return sum(1 for t in ended if not t.user_attrs.get(INTERRUPTED))
    except Exception:
        return 0


class SettleLeftovers(Callback):
    """On a driver's first step: Optuna trials and MLflow child runs a killed driver left RUNNING, whose
    Ray trial is not about to continue, are closed (FAIL / KILLED, ``interrupted``). A fresh search has
    none; a resumed one's unfinished trials are PENDING at that point and keep theirs."""

    def __init__(self, search_dir: Path, study_name: str, log: SearchLog):
        self.search_dir = Path(search_dir).absolute()
        self.study_name = study_name
        self.log = log
        self._settled = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_settled": False}  # a restored copy settles again, once

    def __setstate__(self, state: dict) -> None:
        if "log" not in state:  # kept by a search started before records (tracking, parent_run_id)
            state["log"] = SearchLog(state.pop("tracking"), state.pop("parent_run_id"), state["search_dir"])
        self.__dict__.update(state)

    def on_step_begin(self, iteration, trials, **info):
        if self._settled:
            return
        self._settled = True
        self._tell_ended(trials)
        live = {t.trial_id for t in trials if t.status not in ("TERMINATED", "ERROR")}
        failed = fail_running_trials_quietly(self.search_dir, self.study_name, keep=live)
        killed = self.log.runs_closed(keep=live)
        if failed or killed:
            print(
                f"closed what the last driver left running: {len(failed)} Optuna trial(s) marked FAIL, "
                f"{killed} MLflow run(s) KILLED (their trials are not continued)",
                flush=True,
            )

    def on_experiment_end(self, trials, **info):
        """Also at the end (a resumed experiment whose trials had all ended runs no step)."""
        self._tell_ended(trials)

    def _tell_ended(self, trials) -> None:
        """Trials Tune ended whose Optuna record was never written (``tell_ended_trials``), said in a line."""
        early_stops = EarlyStops(self.search_dir / ASHA_STATE)
        ended = {
            t.trial_id: (
                float(t.last_result.get(METRIC, float("nan"))),
                int(t.last_result.get(TIME_ATTR, 0) or 0),
                t.trial_id in early_stops,
            )
            for t in trials
            if t.status == "TERMINATED"
            and t.last_result
            and t.last_result.get("done")  # ended, not stopped by an interruption
            and t.last_result.get(METRIC) is not None
        }
        try:
            told = tell_ended_trials(self.search_dir, self.study_name, ended)
        except Exception as error:  # the study is a record: never stop the search over it
            print(
                f"warning: Optuna trials not told in {self.search_dir / 'optuna.db'}: {error}",
                file=sys.stderr,
            )
            return
        if told:
            print(f"told Optuna {len(told)} trial(s) Tune finished but Optuna never heard of", flush=True)
