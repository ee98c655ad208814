"""Optuna (TPE) as Tune's searcher, told the truth about trials the scheduler stopped early.

Ray reports an ASHA-stopped trial to its searcher as COMPLETE with the score it had when stopped, so TPE
would learn from a truncated run as if it were a finished one. ``PrunedAwareOptunaSearch`` records such a
trial as PRUNED instead; which trials were stopped it asks the scheduler's own record (``EarlyStops``).
The study lives in ``<search>/optuna.db`` (``optuna_storage_url``), so the history survives a killed
driver and the plots read it back after the search.

No trial stays RUNNING in the study after a driver ends: ``fail_running_trials`` marks the trials of an
interrupted search FAIL with the user attribute ``interrupted`` (Optuna's own convention for trials whose
process died: TPE ignores them). A trial Ray resumes later is re-attached: its outcome is told to a copy
of the interrupted trial (same parameters, its intermediate values, user attribute ``resumed_from``).

In a planned search (``orchestrator.plan``) the searcher also closes the screen: it proposes no
configuration once the cheapest screen measured so far would not finish before the screen's end
(``screen_until`` in ``budget.json``), so no trial is started only to be cut with nothing to show.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from orchestrator.search.budget import BUDGET_FILE, close_screen, screen_until
from orchestrator.search.constants import ASHA_STATE, METRIC, MODE
from orchestrator.search.disk_notices import full_disk_path, post_notice
from orchestrator.search.stopping import EarlyStops
from orchestrator.space import SearchSpace

logger = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attribute of a trial closed (FAIL) because its search was interrupted
RAY_TRIAL_ID = "ray_trial_id"


class PrunedAwareOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch, but a trial the scheduler stopped early is told to Optuna as PRUNED.

    Ray reports an ASHA-stopped trial as COMPLETE with its early score, so TPE would treat a truncated run
    as a finished one. Here its last score is recorded as an intermediate value and the trial is PRUNED.
    ``early_stops`` says which trials the scheduler stopped (``trial_id in early_stops``). Each Optuna
    trial also carries its Ray trial id (user attribute ``ray_trial_id``). A trial whose Optuna record was
    closed by an interrupted driver and that Ray now resumes is re-attached (see the module docstring).
    """

    def __init__(
        self, *args, early_stops: Collection[str] = (), search_dir: str | None = None, **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self._early_stops = early_stops
        self._search_dir = search_dir  # whose driver hears of a full disk (``disk_notices``)

    @property
    def _reported(self) -> dict[str, set[int]]:
        """Steps each live trial has in the study, as last read (saved with the searcher, harmlessly)."""
        if "_reported_steps" not in self.__dict__:  # a searcher saved by an older foldtune
            self._reported_steps: dict[str, set[int]] = {}
        return self._reported_steps

    def suggest(self, trial_id: str):
        if self._screen_closed():
            close_screen(Path(self._search_dir) / BUDGET_FILE)
            return Searcher.FINISHED
        params = super().suggest(trial_id)
        if params is not None and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ID, trial_id)
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # unknown only for trials lost with a killed driver's last snapshot; not live when already told
        if trial_id in self._completed_trials or self._live_trial(trial_id) is None:
            return
        if result.get("training_iteration") in self._reported.get(trial_id, ()):
            return  # an epoch repeated by a trial resumed from an earlier checkpoint: Optuna keeps the first
        super().on_trial_result(trial_id, result)

    @property
    def _screen_costs(self) -> list[float]:
        """Seconds each screened configuration took (or would have, had ASHA not stopped it)."""
        if "_screen_seconds" not in self.__dict__:  # a searcher saved by an older foldtune
            self._screen_seconds: list[float] = []
        return self._screen_seconds

    def _screen_closed(self) -> bool:
        """Whether not even the cheapest screen measured so far fits before the screen's end."""
        search_dir = getattr(self, "_search_dir", None)
        until = screen_until(Path(search_dir) / BUDGET_FILE) if search_dir else None
        if until is None:
            return False
        return time.time() + min(self._screen_costs, default=0.0) >= until

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Told to Optuna; when ``optuna.db``'s disk is full, the driver is told instead (it stops the
        search) and the trial stays as Tune finished it: the resumed driver tells Optuna
        (``tell_ended_trials``). Raising here would make Tune fail a trial that trained fine."""
        cost = full_trial_seconds(result)
        if cost is not None:
            self._screen_costs.append(cost)
        try:
            self._tell_complete(trial_id, result, error)
        except Exception as exc:
            path = full_disk_path(exc)
            search_dir = getattr(self, "_search_dir", None)
            if path is None or search_dir is None:
                raise
            notice = {"trial_id": trial_id, "path": path or str(search_dir), "error": f"optuna.db: {exc}"}
            if not post_notice(search_dir, notice):
                raise
            logger.warning("Optuna: trial %s not recorded, the disk is full: %s", trial_id, exc)

    def _tell_complete(self, trial_id: str, result: dict | None, error: bool) -> None:
        if trial_id in self._completed_trials:
            return
        if self._live_trial(trial_id) is None:
            if trial_id in self._ot_trials:  # told before a killed driver's last snapshot
                self._completed_trials.add(trial_id)
            return
        import optuna

        ot_trial = self._ot_trials[trial_id]
        value = (result or {}).get(self.metric)
        if error or not result or trial_id not in getattr(self, "_early_stops", ()):
            # Ray's own outcome (COMPLETE with the score; FAIL after an error, PRUNED with no score), but
            # a full disk is not swallowed into a warning as Ray's OptunaSearch does
            state = optuna.trial.TrialState.COMPLETE
            if value is None:
                state = optuna.trial.TrialState.FAIL if error else optuna.trial.TrialState.PRUNED
            self._tell_or_warn(trial_id, lambda: self._ot_study.tell(ot_trial, value, state=state))
            return
        step = result.get("training_iteration")

        def prune() -> None:
            if isinstance(value, int | float) and math.isfinite(value) and step is not None:
                ot_trial.report(float(value), int(step))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)

        self._tell_or_warn(trial_id, prune)

    def _tell_or_warn(self, trial_id: str, tell) -> None:
        """``tell()``; a failure other than a full disk is a warning (e.g. NaN reported, or already told
        before a resume: the study keeps its first record)."""
        try:
            tell()
        except Exception as exc:
            if full_disk_path(exc) is not None:
                raise
            logger.warning("Optuna: could not record trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def _live_trial(self, trial_id: str):
        """The Optuna trial to tell about ``trial_id``: its own while RUNNING, a re-attached copy when an
        interrupted driver closed it, None when unknown or already told (a killed driver told Optuna but
        not its own snapshot, so Ray repeats the trial's last result)."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            return None
        try:
            frozen = self._ot_study._storage.get_trial(ot_trial._trial_id)
        except Exception as exc:
            logger.warning("Optuna: trial %s unreadable: %s", trial_id, exc)
            return None
        if not frozen.state.is_finished():
            self._reported[trial_id] = set(frozen.intermediate_values)
            return ot_trial
        if not frozen.user_attrs.get(INTERRUPTED):
            return None
        import optuna

        attrs = {k: v for k, v in frozen.user_attrs.items() if k != INTERRUPTED}
        copy = optuna.trial.create_trial(
            state=optuna.trial.TrialState.RUNNING,
            params=frozen.params,
            distributions=frozen.distributions,
            intermediate_values=frozen.intermediate_values,
            user_attrs={**attrs, "resumed_from": frozen.number},
        )
        new_id = self._ot_study._storage.create_new_trial(self._ot_study._study_id, template_trial=copy)
        self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, new_id)
        self._reported[trial_id] = set(frozen.intermediate_values)
        logger.info("Optuna: trial %s resumed as trial %s", frozen.number, self._ot_trials[trial_id].number)
        return self._ot_trials[trial_id]


def fail_running_trials(search_dir: Path, study_name: str, keep: Collection[str] = ()) -> list[int]:
    """Mark FAIL (user attribute ``interrupted``) every trial still RUNNING in the search's study whose Ray
    trial is not in ``keep`` (the trials Ray is about to continue); returns their numbers.

    Called when a driver ends without finishing (its trials stop with it) and when a resumed driver starts
    (trials a killed driver left RUNNING that Ray will not continue, e.g. lost with its last snapshot).
    """
    import optuna

    path = Path(search_dir) / "optuna.db"
    if not path.exists():
        return []
    storage = study_storage(search_dir)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no study yet: the driver stopped before the first trial
        return []
    closed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if trial.user_attrs.get(RAY_TRIAL_ID) in keep:
            continue
        storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
        storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        closed.append(trial.number)
    storage.remove_session()
    return closed


def tell_ended_trials(
    search_dir: Path, study_name: str, ended: dict[str, tuple[float, int, bool]]
) -> list[int]:
    """Tell Optuna the outcome of trials Tune ended but Optuna never heard of (its write failed, e.g. a full
    disk, or the driver died between the two): ``ended`` maps a Ray trial id to (its last score, its epoch,
    whether the scheduler stopped it early). Only trials still RUNNING, or closed FAIL ``interrupted``, are
    told; returns their numbers."""
    import optuna

    if not ended or not (Path(search_dir) / "optuna.db").exists():
        return []
    storage = study_storage(search_dir)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return []
    trials = study.get_trials(deepcopy=False)
    done = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    recorded = {t.user_attrs.get(RAY_TRIAL_ID) for t in trials if t.state in done}
    told = []
    for trial in trials:
        ray_id = trial.user_attrs.get(RAY_TRIAL_ID)
        outcome = ended.get(ray_id)
        if outcome is None or ray_id in recorded or not math.isfinite(outcome[0]):
            continue
        value, step, stopped_early = outcome
        state = optuna.trial.TrialState.PRUNED if stopped_early else optuna.trial.TrialState.COMPLETE
        if trial.state == optuna.trial.TrialState.RUNNING:
            if stopped_early:
                storage.set_trial_intermediate_value(trial._trial_id, int(step), float(value))
            storage.set_trial_state_values(trial._trial_id, state, None if stopped_early else [float(value)])
        elif trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get(INTERRUPTED):
            # a finished Optuna trial cannot change: its outcome goes to a copy, as a resumed trial's does
            attrs = {k: v for k, v in trial.user_attrs.items() if k != INTERRUPTED}
            study.add_trial(
                optuna.trial.create_trial(
                    state=state,
                    value=None if stopped_early else float(value),
                    params=trial.params,
                    distributions=trial.distributions,
                    intermediate_values={
                        **trial.intermediate_values,
                        **({int(step): float(value)} if stopped_early else {}),
                    },
                    user_attrs={**attrs, "resumed_from": trial.number},
                )
            )
        else:
            continue
        recorded.add(ray_id)
        told.append(trial.number)
    storage.remove_session()
    return told


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


def study_storage(search_dir: Path, attempts: int = 3):
    """The search's Optuna storage, safe to open while another process creates ``optuna.db``.

    Opening a new SQLite study creates its tables and stamps the schema version; two processes doing that
    at once (the driver starting while a script, a notebook or a test reads the study) both find no
    version and both insert one, and the loser dies on ``UNIQUE constraint failed: alembic_version``. The
    winner has by then written a complete schema, so opening again simply finds it.
    """
    import optuna
    import sqlalchemy.exc

    url = optuna_storage_url(search_dir)
    for attempt in range(attempts - 1):
        try:
            return optuna.storages.RDBStorage(url)
        except (
            sqlalchemy.exc.IntegrityError,
            sqlalchemy.exc.OperationalError,
            optuna.exceptions.StorageInternalError,  # Optuna's wrapping of the same, e.g. a locked file
        ):
            time.sleep(0.2 * (attempt + 1))  # the other creator commits within milliseconds
    return optuna.storages.RDBStorage(url)  # the last attempt: its error is the one to see


def full_trial_seconds(result: dict | None) -> float | None:
    """A trial's seconds for all its planned epochs: its measured time per epoch (Tune's ``time_total_s``
    over its epochs) times ``epochs_planned``; None when the result does not say."""
    if not result:
        return None
    seconds, epochs, planned = (
        result.get(k) for k in ("time_total_s", "training_iteration", "epochs_planned")
    )
    if not seconds or not epochs or not planned:
        return None
    return float(seconds) / float(epochs) * float(planned)


def make_searcher(space: SearchSpace, search_dir: Path) -> ConcurrencyLimiter:
    import optuna

    searcher = PrunedAwareOptunaSearch(
        space=optuna_distributions(space),
        metric=METRIC,
        mode=MODE,
        sampler=optuna.samplers.TPESampler(seed=space.sampler_seed, n_startup_trials=space.n_startup_trials),
        storage=study_storage(search_dir),
        study_name=space.name,
        points_to_evaluate=[dict(point) for point in space.points_to_evaluate] or None,
        early_stops=EarlyStops(Path(search_dir).absolute() / ASHA_STATE),
        search_dir=str(Path(search_dir).absolute()),
    )
    return ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)
