"""Optuna (TPE) as Tune's searcher, told the truth about trials the scheduler stopped early.

Ray reports an ASHA-stopped trial to its searcher as COMPLETE with the score it had when stopped, so TPE
would learn from a truncated run as if it were a finished one. ``PrunedAwareOptunaSearch`` records such a
trial as PRUNED instead. The study lives in ``<search>/optuna.db`` (``optuna_storage_url``), so the
history survives a killed driver and the plots read it back after the search.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator.search.constants import METRIC, MODE, STOPPED_EARLY
from orchestrator.space import SearchSpace

logger = logging.getLogger(__name__)


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
