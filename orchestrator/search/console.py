"""What the user watches while a search runs: a compact table of trials, printed when it changes.

Tune's own reporter prints far more than foldtune's users need (config boxes, paths, hints); this table
shows each trial's state, epoch, mean F1 and the searched parameters, and is printed on every change of
state, or at most every ``interval_s`` seconds while trials only advance.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from typing import Any

import pandas as pd
from ray.tune import Callback

from orchestrator.search.constants import METRIC, TIME_ATTR


class ProgressTable(Callback):
    """A compact live table of trials (state, epoch, mean F1, key parameters), printed when it changes."""

    def __init__(self, params: list[str], interval_s: float = 30.0, early_stops: Collection[str] = ()):
        self.params = params
        self.early_stops = early_stops  # the scheduler's record of the trials it stopped early
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
            stopped = frozenset(getattr(self, "early_stops", ()))
            print(progress_table(trials, self.params, stopped), flush=True)


def progress_table(trials, params: list[str], stopped: Collection[str] = ()) -> str:
    """The table; a TERMINATED trial is ``stopped`` when its id is in ``stopped`` (early stops), else done."""
    rows = []
    for t in trials:
        result = t.last_result or {}
        state = t.status.lower()
        if t.status == "TERMINATED":
            state = "stopped" if t.trial_id in stopped else "done"
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
