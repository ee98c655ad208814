"""A refit's MLflow record: one run per refit, nested under the search's parent run.

Here, with the rest of MLflow, so ``orchestrator.refit`` hands over what it wrote (``refit.json``'s record)
and never imports mlflow. The run sits in the search's experiment beside its trials and ensembles, so a
refit can be compared with the trial it refits: the trial's config as params (epochs as refit), the train
loss per epoch (step = epoch; the seed models' mean and each model's), and the holdout macro F1 when the
search keeps holdout persons. The record is a copy of the refit folder's small files; the models stay in
the search folder.

Tags: ``foldtune.kind=refit`` (and ``foldtune.role=refit``, as the ensemble's run has its role) and
``foldtune.refit_trial``. Deliberately not ``foldtune.trial_id``: the search finds a trial's own child run
by that tag under the same parent, and must never find a refit run instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.tracking.ensemble_run import SEARCH_PARENT_TAG, experiment_name, find_parent_run
from orchestrator.tracking.provenance import code_version_tags, file_dataset, log_datasets
from orchestrator.tracking.store import TAG, SearchTracking, quiet_store_errors

KIND = "refit"


def log_refit_run(
    record: dict[str, Any],
    config: dict[str, Any],
    summary: dict,
    search: str,
    search_dir: Path,
    refit_dir: Path,
    tracking_uri: str | None = None,
) -> str:
    """Log one refit (``record`` as in ``refit.json``; ``config`` the refit's TrainConfig as a dict) and
    return its run id. Tracking URI: the argument, else the search's own, else MLFLOW_TRACKING_URI, else
    ./mlruns/mlflow.db. The caller decides what a failure means (the refit only warns)."""
    search_dir, refit_dir = Path(search_dir), Path(refit_dir)
    tracking = SearchTracking(tracking_uri or summary.get("tracking_uri"), experiment_name(summary, search))
    with quiet_store_errors():
        parent_run_id = summary.get("parent_run_id") or find_parent_run(tracking, search_dir)
        trial_id = str(record["trial_id"])
        tags = {
            f"{TAG}kind": KIND,
            f"{TAG}role": KIND,
            f"{TAG}search": search,
            f"{TAG}refit_trial": trial_id,
            f"{TAG}refit_dir": str(refit_dir.absolute()),
            **code_version_tags(source="foldtune refit"),
        }
        if parent_run_id:
            tags[SEARCH_PARENT_TAG] = str(parent_run_id)
            tags["mlflow.parentRunId"] = str(parent_run_id)
        run = tracking.client.create_run(tracking.experiment_id, run_name=f"refit {trial_id}", tags=tags)
        run_id = run.info.run_id
        try:
            _log_contents(tracking, run_id, record, config, search_dir, refit_dir)
            tracking.finish(run_id, "FINISHED")
        except BaseException:
            tracking.finish(run_id, "FAILED")
            raise
    return run_id


def _log_contents(
    tracking: SearchTracking,
    run_id: str,
    record: dict[str, Any],
    config: dict[str, Any],
    search_dir: Path,
    refit_dir: Path,
) -> None:
    """Params, per-epoch losses, final metrics, inputs and the refit folder's small files."""
    models = record.get("models") or []
    tracking.log_params(
        run_id,
        {
            **config,
            "refit_trial_id": record["trial_id"],
            "refit_epochs": record["epochs"],
            "refit_epochs_from": record.get("epochs_from", ""),
            "refit_fold_epochs": ",".join(map(str, record.get("fold_epochs") or [])),
            "refit_seeds": record["seeds"],
            "refit_seed_values": [m["seed"] for m in models],
        },
    )
    for epoch in range(1, int(record["epochs"]) + 1):
        losses = {f"seed{m['index']}/train_loss": m["train_loss"][epoch - 1] for m in models}
        if losses:
            losses["train_loss"] = sum(losses.values()) / len(losses)
        tracking.log_metrics(run_id, losses, step=epoch)
    finals = {
        "rows_trained": record.get("rows_trained"),
        "holdout_rows": record.get("holdout_rows"),
        "seconds": record.get("seconds"),
    }
    if record.get("holdout_rows"):
        finals.update(holdout_f1=record.get("holdout_f1"), holdout_f1_tta=record.get("holdout_f1_tta"))
        finals.update({f"seed{m['index']}/holdout_f1": m.get("holdout_f1") for m in models})
    tracking.log_metrics(
        run_id, {k: v for k, v in finals.items() if v is not None}, step=int(record["epochs"])
    )
    trial_folds = search_dir / "trials" / str(record["trial_id"]) / "folds.csv"
    if trial_folds.is_file():
        log_datasets(tracking.client, run_id, [file_dataset("folds", trial_folds, "folds")])
    for name in ("refit.json", "holdout.npz"):
        if (refit_dir / name).is_file():
            tracking.client.log_artifact(run_id, str(refit_dir / name))
