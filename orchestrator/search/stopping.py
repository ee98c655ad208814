"""Early stopping: ASHA judges trials at equal epochs and stops the weak ones, without two of its flaws.

Plain ASHA can stop a trial at its own last epoch, which saves nothing and kills it before fit writes its
out-of-fold predictions; and Ray rebuilds the scheduler with empty rungs on resume, so the first trials
after a resume would be judged against nobody. ``FinishingASHA`` fixes both. ``EarlyStopMarker`` marks
the result a trial was stopped at, so the searcher, MLflow and the leaderboard can tell a stopped trial
from a finished one.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator.search.constants import STOPPED_EARLY, TIME_ATTR
from orchestrator.space import SearchSpace
from trainers.io import write_text_atomic

logger = logging.getLogger(__name__)


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
