"""The search: Ray Tune runs k-fold trials that Optuna (TPE) proposes; ASHA stops the weak ones early.

Everything every trial shares is prepared once, in the driver, before any trial starts (``prepare``). A
trial is one ``trainers.fit.fit`` call in its own run folder (``trial``); it reports mean-over-folds
validation macro F1 after every epoch, so ASHA compares trials at equal epochs (``stopping``) and Optuna
learns which settings work (``optuna_adapter``). MLflow is written from the driver only
(``orchestrator.tracking``). The rooms, in the order a search meets them: ``settle`` (which search, its
folder and stores), ``prepare``, ``trial``, ``optuna_adapter``, ``stopping``, ``console`` (the live
table), ``closing`` (nothing left RUNNING on any way out), ``disk_notices`` and ``disk_full`` (a full disk
stops the search cleanly), ``summary`` and ``plots``; ``driver`` runs them in turn.

Layout of ``<storage>/<name>/``: ``space.yaml``, ``tracking.json``, ``folds.csv``, ``relabel.csv`` (when
label fixes were given), ``optuna.db`` (the Optuna study), ``asha_state.json`` (ASHA's rungs and the
trials it stopped early), ``tune/`` (Ray Tune's experiment, used by ``resume``), ``trials/<trial_id>/``
(fit's run folders), ``leaderboard.csv``, ``summary.json`` and ``plots/``; ``mlflow_outbox.jsonl`` while
MLflow records wait for a tracking store that did not answer (``orchestrator.tracking.search_log``).
"""

from orchestrator.search.closing import SearchInterrupted, SettleLeftovers
from orchestrator.search.console import ProgressTable
from orchestrator.search.driver import run_search
from orchestrator.search.optuna_adapter import PrunedAwareOptunaSearch
from orchestrator.search.stopping import EarlyStopMarker, EarlyStops, FinishingASHA
from orchestrator.search.summary import SearchSummary
from orchestrator.search.trial import TrialContext, TrialFailed, run_trial

# run_search, SearchSummary and SearchInterrupted are the package's API. The other names are re-exported
# because searches started while the search was one module (orchestrator/search.py) pickled them under
# that name in Tune's experiment (tuner.pkl, the searcher's state, trial error files): resuming such a
# search unpickles them as ``orchestrator.search.<name>``.
__all__ = [
    "EarlyStopMarker",
    "EarlyStops",
    "FinishingASHA",
    "ProgressTable",
    "PrunedAwareOptunaSearch",
    "SearchInterrupted",
    "SearchSummary",
    "SettleLeftovers",
    "TrialContext",
    "TrialFailed",
    "run_search",
    "run_trial",
]
