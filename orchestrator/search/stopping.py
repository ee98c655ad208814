"""Early stopping: ASHA judges trials at equal epochs and stops the weak ones, without three of its flaws.

Plain ASHA can stop a trial at its own last epoch, which saves nothing and kills it before fit writes its
out-of-fold predictions; Ray rebuilds the scheduler with empty rungs on resume, so the first trials after
a resume would be judged against nobody; and Ray tells nobody else that a trial was stopped rather than
finished. ``FinishingASHA`` fixes all three: it finishes trials at their last epoch, keeps its rungs in
``asha_state.json``, and records there which trials it stopped early. ``EarlyStops`` reads that record
back for everyone who must tell a stopped trial from a finished one: the searcher (PRUNED), MLflow
(KILLED), the live table and the leaderboard (stopped_early).

Why a record of the scheduler's own decision, and not a mark in the trial's result: the scheduler's
``on_trial_result`` returning STOP is Ray's public contract for "stop this trial", so what it records is
the decision itself, in every Ray version. A mark written into the result dict by a callback only reaches
the searcher and the other callbacks when Ray hands all of them the same dict object, which Ray 2.60 does
but does not promise (other versions hand callbacks a copy).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

from ray.tune import Callback
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from orchestrator.search.constants import TIME_ATTR
from orchestrator.space import SearchSpace
from trainers.io import write_text_atomic

logger = logging.getLogger(__name__)

STOPPED_KEY = "stopped_early"  # the state file's list of trial ids the scheduler stopped early


def make_scheduler(space: SearchSpace, state_path: Path | None = None):
    """ASHA on the space's settings; ``state_path`` keeps its rungs and early stops across a killed driver."""
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
    """ASHA that never stops a trial at its own last epoch, whose rungs survive a resume, and that records
    which trials it stopped early.

    ASHA has a rung at every ``grace_period * reduction_factor**k`` up to ``max_t``, so a trial whose last
    epoch is a rung can be told to STOP there: nothing is saved by it, and the kill would come before fit
    writes its out-of-fold predictions and ``result.json``. Such a trial finishes instead.

    Ray's Tuner.restore rebuilds the scheduler as it was created, with empty rungs, so after a resume the
    first trials would be judged against nobody and run to the end. With ``state_path`` the rungs (each
    trial's score at each milestone) and the early stops are written after every result and read back
    once on restore.

    Every STOP before a trial's planned last epoch adds the trial to ``stopped_early`` (and to the state
    file, where ``EarlyStops`` reads it); a trial that reports again afterwards (a resume continued it)
    leaves the record.
    """

    def __init__(self, *args, state_path: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._state_path = state_path
        self._state_loaded = False
        self._stopped_early: set[str] = set()

    @property
    def stopped_early(self) -> frozenset[str]:
        """The trials this scheduler stopped before their planned last epoch."""
        return frozenset(self._stops())

    def _stops(self) -> set[str]:
        if getattr(self, "_stopped_early", None) is None:  # pickled by a foldtune without the record
            self._stopped_early = set()
        return self._stopped_early

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load_rungs_once()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        self._load_rungs_once()
        decision = super().on_trial_result(tune_controller, trial, result)
        at_last_epoch = result.get(TIME_ATTR, 0) >= result.get("epochs_planned", math.inf)
        if decision == TrialScheduler.STOP and at_last_epoch:
            decision = TrialScheduler.CONTINUE
        if decision == TrialScheduler.STOP:
            self._stops().add(trial.trial_id)
        else:
            self._stops().discard(trial.trial_id)  # running again (e.g. continued by a resume)
        self._save_rungs()
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
            STOPPED_KEY: sorted(self._stops()),
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
        self._stops().update(str(t) for t in state.get(STOPPED_KEY, []))


class EarlyStops:
    """The trials the scheduler stopped early, read from its state file: ``trial_id in stops``.

    Every reader asks the file the scheduler writes after each decision, so the searcher, the MLflow
    callback, the live table and the summary agree with the scheduler in this driver and in a resumed one.
    Without a file (no ASHA, or no trial judged yet) no trial was stopped early.
    """

    def __init__(self, state_path: str | Path | None) -> None:
        self.state_path = Path(state_path) if state_path else None

    def ids(self) -> frozenset[str]:
        if self.state_path is None:
            return frozenset()
        try:
            state = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return frozenset()
        except (OSError, ValueError) as error:
            logger.warning("ASHA state %s unreadable (%s); no early stops known", self.state_path, error)
            return frozenset()
        if not isinstance(state, dict):
            return frozenset()
        return frozenset(str(t) for t in state.get(STOPPED_KEY, []))

    def __contains__(self, trial_id: object) -> bool:
        return trial_id in self.ids()

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __repr__(self) -> str:
        return f"EarlyStops({str(self.state_path)!r})"


class EarlyStopMarker(Callback):
    """Does nothing; kept so experiments saved by an older foldtune (which listed it) still unpickle.

    It used to write a mark into the result a trial was stopped at, which reached the other callbacks only
    when Ray handed them the same dict; ``FinishingASHA`` records the scheduler's decision instead.
    """
