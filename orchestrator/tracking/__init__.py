"""MLflow, in one room: the store and its runs (``store``), trial child runs (``trials``), the UI (``ui``).

Search and ensemble call this package; nothing else in foldtune imports mlflow.
"""

from orchestrator.tracking.store import (
    CHILD_ROLE,
    DEFAULT_STORE,
    PARENT_ROLE,
    TAG,
    SearchTracking,
    artifact_root,
    resolve_tracking_uri,
)
from orchestrator.tracking.trials import RUN_FOLDER_ARTIFACTS, MlflowTrialCallback, trial_error
from orchestrator.tracking.ui import launch_ui, start_ui

__all__ = [
    "CHILD_ROLE",
    "DEFAULT_STORE",
    "PARENT_ROLE",
    "RUN_FOLDER_ARTIFACTS",
    "TAG",
    "MlflowTrialCallback",
    "SearchTracking",
    "artifact_root",
    "launch_ui",
    "resolve_tracking_uri",
    "start_ui",
    "trial_error",
]
