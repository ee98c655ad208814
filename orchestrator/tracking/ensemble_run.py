"""The ensemble's MLflow record: one run named "ensemble", nested under the search's parent run.

Here, next to the search's own tracking, so that MLflow stays in one package: the ensemble stage hands
over its result and never imports mlflow itself. The record is a copy of what is on disk (the submission,
ensemble.json, the confusion plot, the probabilities), with the weights and OOF scores as params and
metrics, so ensembles of one search can be compared in the MLflow UI beside its trials.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.tracking.provenance import code_version_tags, file_dataset, log_datasets
from orchestrator.tracking.search_log import send_outbox
from orchestrator.tracking.store import NOTE_TAG, PARENT_ROLE, TAG, SearchTracking

if TYPE_CHECKING:
    from orchestrator.ensemble.result import EnsembleResult

SEARCH_PARENT_TAG = "foldtune.search_parent_run_id"


def metric_name(text: str) -> str:
    """MLflow metric/param names allow letters, digits, _ - . / and spaces."""
    text = text.replace(">=", "ge").replace("<", "lt")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def experiment_name(summary: dict, search: str) -> str:
    """The search's MLflow experiment: as recorded in its summary, else the search name."""
    return str(summary.get("experiment_name") or search)


def find_parent_run(tracking: SearchTracking, search_dir: Path) -> str | None:
    """The search's parent run by its tags, for a search that stopped before writing summary.json."""
    folder = str(search_dir.absolute())
    if "'" in folder:
        return None
    query = f"tags.`{TAG}role` = '{PARENT_ROLE}' and tags.`{TAG}search_dir` = '{folder}'"
    found = tracking.client.search_runs([tracking.experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else None


ENSEMBLE_SECTION = "\n\n---\n**Ensemble**"


def ensemble_note(result: EnsembleResult) -> str:
    """The ensemble in Markdown for the UI's description: members and weights, the F1 estimates (the
    trusted one marked), the submission."""
    lines = [
        f"{ENSEMBLE_SECTION.strip()} ({result.method}, {len(result.members)} member(s)): "
        f"`{result.submission}`",
        "",
        "| member | weight | OOF F1 |",
        "|---|---:|---:|",
        *(f"| `{m.trial_id}` | {m.weight:.3f} | {m.oof_f1:.4f} |" for m in result.members),
    ]
    if result.estimates is not None:
        lines += ["", "Estimates:", ""]
        lines += [f"- {line.strip()}" for line in result.estimates.lines()]
    return "\n".join(lines)


def _add_to_search_note(tracking: SearchTracking, parent_run_id: str, note: str) -> None:
    """The search's description (parent run and experiment) with this ensemble's section, replacing an
    earlier ensemble's."""
    current = tracking.client.get_run(parent_run_id).data.tags.get(NOTE_TAG, "")
    search_part = current.split(ENSEMBLE_SECTION)[0]
    combined = f"{search_part}{ENSEMBLE_SECTION}{note[len(ENSEMBLE_SECTION.strip()) :]}"
    tracking.client.set_tag(parent_run_id, NOTE_TAG, combined)
    tracking.client.set_experiment_tag(tracking.experiment_id, NOTE_TAG, combined)


def log_ensemble_run(
    result: EnsembleResult,
    summary: dict,
    search: str,
    search_dir: Path,
    tracking_uri: str | None,
    selection: dict,
    data_root: Path | None = None,
    exploratory: bool = False,
) -> str:
    """One run named "ensemble" in the search's experiment, nested under the search's parent run.

    Tracking URI: the argument, else the search's own, else MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db.
    ``selection`` holds the selection's parameters (None values are not logged). Returns the run id. An
    ``exploratory`` ensemble (made to compare) does not become the search's description.
    """
    tracking = SearchTracking(tracking_uri or summary.get("tracking_uri"), experiment_name(summary, search))
    send_outbox(search_dir, tracking)  # what the search left waiting goes first: its description is older
    parent_run_id = summary.get("parent_run_id") or find_parent_run(tracking, search_dir)
    tags = {
        f"{TAG}role": "ensemble",
        f"{TAG}search": search,
        f"{TAG}submission": str(result.submission.absolute()),
        **code_version_tags(source="foldtune ensemble"),
    }
    if parent_run_id:
        tags[SEARCH_PARENT_TAG] = str(parent_run_id)
        tags["mlflow.parentRunId"] = str(parent_run_id)
    run_id = tracking.client.create_run(tracking.experiment_id, run_name="ensemble", tags=tags).info.run_id
    try:
        params = {
            "selection": result.method,
            "members": json.dumps({m.trial_id: round(m.weight, 6) for m in result.members}),
            "n_members": len(result.members),
            "tta": ",".join(result.tta) if result.tta is not None else "own",
            "member_tta": json.dumps({m.trial_id: list(m.tta) for m in result.members}),
            "trusted_estimate": result.estimates.trusted if result.estimates else None,
            **{key: value for key, value in selection.items() if value is not None},
        }
        params = {key: value for key, value in params.items() if value is not None}
        metrics = {
            "oof_f1": result.oof_f1,
            "oof_f1_no_tta": result.oof_f1_no_tta,
            "best_single_oof_f1": result.best_single_f1,
            **{f"oof_{key}": value for key, value in result.metrics["scalars"].items() if key != "f1"},
            **{
                f"oof_class_f1/{i:02d}_{metric_name(name)}": value
                for i, (name, value) in enumerate(result.metrics["per_class_f1"].items())
            },
            **{f"member/{metric_name(m.trial_id)}/oof_f1": m.oof_f1 for m in result.members},
            **{f"member/{metric_name(m.trial_id)}/weight": m.weight for m in result.members},
            **(result.estimates.metrics() if result.estimates else {}),
        }
        tracking.log_params(run_id, params)
        tracking.log_metrics(run_id, metrics)
        inputs = []
        if (search_dir / "folds.csv").is_file():
            inputs.append(file_dataset("folds", search_dir / "folds.csv", "folds"))
        if data_root is not None and (Path(data_root) / "eval" / "info.csv").is_file():
            inputs.append(file_dataset("eval", Path(data_root) / "eval" / "info.csv", "evaluation"))
        log_datasets(tracking.client, run_id, inputs)
        for path in (result.submission, result.report_path, result.plot_path, result.probs_path):
            tracking.client.log_artifact(run_id, str(path))
        note = ensemble_note(result)
        tracking.client.set_tag(run_id, NOTE_TAG, note)
        if parent_run_id and not exploratory:  # the search's description shows its submission's ensemble
            _add_to_search_note(tracking, str(parent_run_id), note)
        tracking.finish(run_id, "FINISHED")
    except BaseException:
        tracking.finish(run_id, "FAILED")
        raise
    return run_id
