"""Inspection output (label issues, attention maps) copied to the search's MLflow parent run as artifacts.

Here, with the rest of MLflow, so the inspect room never imports mlflow. Why the parent run and not a new
one: the findings are about the search's data and models as a whole, and belong beside its trials in the
UI. The parent run is the one the search recorded (``summary.json`` / ``tracking.json``), else found by its
tags; a folder that recorded no store at all is not logged (nothing to attach to), rather than creating a
store in the working folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.tracking.ensemble_run import experiment_name, find_parent_run
from orchestrator.tracking.store import SearchTracking


def log_to_search_run(
    search_dir: Path,
    summary: dict,
    search: str,
    tracking_uri: str | None,
    folder: Path,
    files: Sequence[Path],
    artifact_path: str,
) -> str | None:
    """Log ``files`` (under ``folder``, sub-folders kept) to the search's parent run under
    ``artifact_path``; returns the run id, or None when the search recorded no tracking store."""
    uri = tracking_uri or summary.get("tracking_uri")
    if uri is None and not summary.get("parent_run_id"):
        return None
    tracking = SearchTracking(uri, experiment_name(summary, search))
    run_id = summary.get("parent_run_id") or find_parent_run(tracking, search_dir)
    if not run_id:
        raise OrchestratorError(
            f"no MLflow run of search {search} in {tracking.tracking_uri}; pass the --tracking-uri it used"
        )
    folder = Path(folder)
    for path in files:
        sub = Path(path).parent.relative_to(folder).as_posix()
        target = artifact_path if sub == "." else f"{artifact_path}/{sub}"
        tracking.client.log_artifact(str(run_id), str(path), target)
    return str(run_id)
