"""Recording a written ensemble in MLflow: the "ensemble" run under the search's parent run, then the
model folder as an MLflow model registered under the search's name.

After the submission, never instead of it: MLflow is a record of the result, so a tracking failure here
is a warning and the submission stands.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from orchestrator.ensemble.result import EnsembleResult
from trainers.io import write_text_atomic


def record_in_mlflow(
    result: EnsembleResult,
    report: dict,
    summary: dict,
    search: str,
    search_dir: Path,
    tracking_uri: str | None,
    settings: dict,
    log: Callable[[str], None],
    bundle: Path | None = None,
    data_root: Path | None = None,
    exploratory: bool = False,
) -> None:
    """Log the run (its id goes into the result and ensemble.json), then the model folder as an MLflow model
    registered under the search's name (an ``exploratory`` ensemble, one made with --top 1, --folds or
    --tta to compare, is logged in its run but not registered); a failure of either only warns."""
    try:
        from orchestrator.tracking.ensemble_run import log_ensemble_run

        result.mlflow_run_id = log_ensemble_run(
            result, summary, search, search_dir, tracking_uri, settings, data_root, exploratory
        )
    except Exception as error:  # tracking is a record of the result, not the result: keep the submission
        log(
            f"warning: the submission is written but logging the ensemble to MLflow failed "
            f"({type(error).__name__}: {error}); check the tracking URI / MLFLOW_TRACKING_URI"
        )
        return
    report["mlflow_run_id"] = result.mlflow_run_id
    if bundle is not None:
        try:
            from orchestrator.tracking.ensemble_model import log_ensemble_model

            registered = log_ensemble_model(
                bundle, result.mlflow_run_id, search, tracking_uri, summary, register=not exploratory
            )
        except Exception as error:
            log(
                f"warning: the submission and the MLflow run are written but logging the ensemble as an "
                f"MLflow model failed ({type(error).__name__}: {error})"
            )
        else:
            if exploratory:
                log("MLflow model: logged in its run, not registered (an exploratory ensemble)")
            else:
                report["registered_model"] = registered.model_uri
                log(f"MLflow model: {registered.model_uri} (alias @candidate)")
    write_text_atomic(json.dumps(report, indent=2, default=float), result.report_path)
