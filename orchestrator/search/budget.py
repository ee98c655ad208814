"""The search's time budget (``--time-budget MINUTES``): no trial starts after it, running ones stop at it.

The budget is the search's, not one driver's: ``budget.json`` in the search folder keeps the total and the
seconds already used, so a ``--resume`` of a spent budget is refused, and one with a new (larger)
``--time-budget`` total runs for what is left. The deadline is enforced by ``BudgetStopper``, a Tune stopper
every search carries (with no deadline when there is no budget), so a search started without a budget can be
given one on resume: its restored stopper reads the deadline from ``budget.json`` again.

At the deadline the stopper ends the experiment the way Ctrl+C does (Tune's graceful interrupt, SIGUSR1,
which Tune handles like SIGINT): the running trials stop and stay *unfinished* in Tune's saved state, so a
``--resume`` with a larger budget continues them from their resume state. (Ending it with ``stop_all``
instead would mark them finished and Tune would never restart them; that is only the fallback when Tune
could not install its handler, i.e. a driver outside the main thread.) Either way Tune calls no completion
callback for them: the driver settles them itself (``summary``): each keeps the best fold models and
out-of-fold predictions it had reached, is marked ``cut``, and is a candidate for the ensemble once every
fold has had an epoch.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Stopper

from orchestrator.errors import OrchestratorError
from orchestrator.plan import Phases, Plan, split_budget
from trainers.io import write_text_atomic

BUDGET_FILE = "budget.json"
INTERRUPT_GRACE_S = 30.0  # Tune ends within a step of being interrupted; after this, stop the trials
# past a planned screen's end a running trial may finish its epoch for this share of the final's time
SCREEN_GRACE = 0.25
BILL_EVERY_S = 30.0  # how often the stopper writes the seconds used (a killed driver's are billed on resume)


@dataclass
class TimeBudget:
    """One driver's share of the search's budget; ``total_s`` None means no budget."""

    path: Path
    total_s: float | None
    used_before_s: float
    started: float  # time.time() when this driver's trials began
    prep_s: float | None = None  # this driver's preparation before its trials (recorded, not billed)
    screen_until: float | None = None  # a planned search's screen ends here (time.time()), before the final

    @property
    def left_s(self) -> float:
        """Seconds of the budget left now (inf without one)."""
        return self.deadline - time.time()

    @property
    def deadline(self) -> float:
        if self.total_s is None:
            return math.inf
        return self.started + self.total_s - self.used_before_s

    def start(self, prep_s: float | None = None, plan: Plan | None = None) -> Phases | None:
        """The trials begin now: the deadline counts from here. The preparation before them (data checks,
        the decoded-image cache, folds, weights: ``prep_s``) is not billed but recorded beside the budget.
        With a ``plan`` (and a budget) this driver's time left is split into the screen and the final model;
        the phases are returned and the screen's end recorded for the stopper."""
        self.started = time.time()
        self.prep_s = prep_s
        phases = None
        if plan is not None and self.total_s is not None:
            phases = split_budget(plan, self.left_s)
            self.screen_until = self.started + phases.screen_s
        self.record()
        return phases

    def stopped(self) -> bool:
        """Whether the stopper ended the search at the deadline (it says so in the budget file), or a
        planned search's searcher closed its screen (``close_screen``)."""
        record = _read(self.path)
        return bool(record.get("stopped") or record.get("screen_closed"))

    def describe(self) -> str:
        left = (self.total_s - self.used_before_s) / 60
        prep = f"; the preparation took {self.prep_s:.0f} s (not counted)" if self.prep_s is not None else ""
        return f"time budget: {self.total_s / 60:g} min ({left:.1f} min left); no trial starts after it{prep}"

    def record(self) -> None:
        """Write the budget and the seconds used so far (with a deadline the stopper reads)."""
        used = self.used_before_s + max(0.0, time.time() - self.started)
        payload = {"total_s": self.total_s, "used_s": round(used, 1), "deadline": self.deadline}
        if self.total_s is None or not math.isfinite(self.deadline):
            payload["deadline"] = None
        saved = _read(self.path)
        payload["stopped"] = bool(saved.get("stopped")) and self.total_s is not None
        if self.screen_until is not None:
            payload["screen_until"] = self.screen_until  # the stopper ends the trials there
            payload["screen_closed"] = bool(saved.get("screen_closed"))
        if self.prep_s is not None:
            payload["prep_s"] = round(self.prep_s, 1)  # this driver's data preparation, not billed
        write_text_atomic(json.dumps(payload, indent=2), self.path)


def settle_budget(search_dir: Path, name: str, minutes: float | None, resuming: bool) -> TimeBudget:
    """The budget this driver runs under: ``minutes`` (a new total), else the saved one on resume."""
    path = Path(search_dir) / BUDGET_FILE
    saved = {}
    if resuming and minutes is not None and (Path(search_dir) / "tune").exists() and not path.is_file():
        raise OrchestratorError(
            f"search '{name}' was started by a foldtune without time budgets (no {path.name}); resume it "
            "without --time-budget"
        )
    if resuming and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise OrchestratorError(
                f"{path} is unreadable ({error}); delete it to resume without a budget"
            ) from None
    if minutes is not None and not minutes > 0:
        raise OrchestratorError(f"--time-budget must be a number of minutes above 0, got {minutes:g}")
    total = minutes * 60 if minutes is not None else saved.get("total_s")
    used = float(saved.get("used_s") or 0.0) if resuming else 0.0
    if total is not None and used >= total:
        raise OrchestratorError(
            f"search '{name}' has used its whole {total / 60:g}-minute time budget; resume with a larger "
            f"--time-budget (the total, e.g. {2 * total / 60:g}) to continue it"
        )
    if path.is_file():  # a new driver: the previous one's "stopped" mark is history
        fresh = {**_read(path), "stopped": False, "screen_closed": False}
        write_text_atomic(json.dumps(fresh, indent=2), path)
    budget = TimeBudget(path, total, used, time.time())
    budget.record()
    return budget


def close_screen(budget_path: Path) -> None:
    """The searcher started no more configurations: the screen is over once the running ones end (the
    driver then treats the search as ended by its plan, not interrupted)."""
    record = _read(budget_path)
    if record and not record.get("screen_closed"):
        with contextlib.suppress(OSError):
            write_text_atomic(json.dumps({**record, "screen_closed": True}, indent=2), budget_path)


def screen_until(budget_path: Path) -> float | None:
    """When a planned search's screen ends (``time.time()``), or None: no plan, no budget."""
    value = _read(budget_path).get("screen_until")
    return None if value is None else float(value)


def _read(path: Path) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


class BudgetStopper(Stopper):
    """Stops the whole experiment once the deadline in ``budget.json`` has passed (never when none).

    In a planned search (``orchestrator.plan``) the screen ends at ``screen_until`` more gently: each trial
    stops at the end of the epoch it is in (``__call__``; the epoch is kept: the final model may continue
    that very model), and the experiment is stopped outright only ``SCREEN_GRACE`` of the final phase's
    time later, for an epoch that would eat too much of it.

    The deadline is read on the first check after a start or a restore (a resumed driver writes a new one
    first), so Tune's pickled copy of the stopper always follows the current driver's budget.
    """

    def __init__(self, budget_path: Path):
        self.budget_path = str(budget_path)
        self._deadline: float | None = None
        self._trials_end: float | None = None
        self._screen_until: float | None = None
        self._interrupted: float | None = None  # when Tune was asked to stop (asked once)
        self._next_bill = 0.0  # monotonic time of the next write of the seconds used

    def __getstate__(self) -> dict:
        return {
            **self.__dict__,
            "_deadline": None,
            "_trials_end": None,
            "_screen_until": None,
            "_interrupted": None,
            "_next_bill": 0.0,
        }

    def __call__(self, trial_id: str, result: dict) -> bool:
        """A trial reporting an epoch after the screen's end stops there (its epoch is kept)."""
        self._load()
        until = getattr(self, "_screen_until", None)
        if until is None or time.time() < until:
            return False
        close_screen(Path(self.budget_path))  # the driver reads it: ended by the plan, not interrupted
        return True

    def _load(self) -> None:
        if self._deadline is not None:
            return
        record = _read(Path(self.budget_path))
        deadline, screen_until = record.get("deadline"), record.get("screen_until")
        self._deadline = math.inf if deadline is None else float(deadline)
        self._screen_until = None if screen_until is None else float(screen_until)
        self._trials_end = self._deadline
        if self._screen_until is not None and math.isfinite(self._deadline):
            # past the screen's end, trials stop at their epoch's end; a long epoch is cut here
            grace = SCREEN_GRACE * max(0.0, self._deadline - self._screen_until)
            self._trials_end = min(self._deadline, self._screen_until + grace)

    def stop_all(self) -> bool:
        self._load()
        if time.time() < (getattr(self, "_trials_end", None) or self._deadline):
            self._bill()
            return False
        asked = getattr(self, "_interrupted", None)  # (absent from stoppers pickled by older versions)
        if asked:  # Tune ends after this step; if it still runs, the handler was not Tune's: stop it here
            return time.time() - asked > INTERRUPT_GRACE_S
        record = _read(Path(self.budget_path))
        if not record.get("stopped"):  # the driver reads this to tell a budget's end from Ctrl+C
            write_text_atomic(json.dumps({**record, "stopped": True}, indent=2), Path(self.budget_path))
        self._interrupted = time.time() if interrupt_tune() else None
        return self._interrupted is None

    def _bill(self) -> None:
        """Every ``BILL_EVERY_S``, write the seconds used so far (the total less what is left before the
        deadline), so that a driver killed outright (SIGKILL, a reboot) has its time billed on resume
        instead of the whole budget being given again."""
        if not math.isfinite(self._deadline) or time.monotonic() < getattr(self, "_next_bill", 0.0):
            return
        self._next_bill = time.monotonic() + BILL_EVERY_S
        record = _read(Path(self.budget_path))
        total = record.get("total_s")
        if total is None:
            return
        used = max(float(record.get("used_s") or 0.0), float(total) - (self._deadline - time.time()))
        with contextlib.suppress(OSError):  # a full disk stops the search elsewhere; never here
            write_text_atomic(
                json.dumps({**record, "used_s": round(used, 1)}, indent=2), Path(self.budget_path)
            )


def interrupt_tune() -> bool:
    """Ask Tune for its graceful stop (as Ctrl+C does) by raising the SIGUSR1 it handles; False when Tune
    has no handler for it here (a driver outside the main thread), so the caller stops the trials instead.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    handler = signal.getsignal(signal.SIGUSR1)
    if not callable(handler):  # the default action would kill the driver
        return False
    signal.raise_signal(signal.SIGUSR1)
    return True
