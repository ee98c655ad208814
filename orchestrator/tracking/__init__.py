"""MLflow, in one room: the store and its runs (``store``), a search's records and the outbox they wait
in while the store is down (``search_log``, ``outbox``), trial child runs (``trial_runs``, recorded by the
Tune callback in ``trials``), the parent run (``search_runs``), the UI (``ui``).

Search and ensemble call this package; nothing else in foldtune imports mlflow.
"""

from orchestrator.lazy import lazy_exports

# Exported names, imported when first used (PEP 562): importing one room of this package, e.g. for a
# served model, must not import all the others and what they import.
_EXPORTS = {
    "CHILD_ROLE": "orchestrator.tracking.store",
    "DEFAULT_STORE": "orchestrator.tracking.store",
    "MlflowTrialCallback": "orchestrator.tracking.trials",
    "PARENT_ROLE": "orchestrator.tracking.store",
    "RUN_FOLDER_ARTIFACTS": "orchestrator.tracking.trial_runs",
    "SearchLog": "orchestrator.tracking.search_log",
    "SearchTracking": "orchestrator.tracking.store",
    "TAG": "orchestrator.tracking.store",
    "artifact_root": "orchestrator.tracking.store",
    "launch_ui": "orchestrator.tracking.ui",
    "resolve_tracking_uri": "orchestrator.tracking.store",
    "send_outbox": "orchestrator.tracking.search_log",
    "start_ui": "orchestrator.tracking.ui",
    "trial_error": "orchestrator.tracking.trials",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS, globals())
