"""What an ensemble run produced, and the two ways it is told: the printed summary and ``ensemble.json``.

Kept apart from the stage so that the CLI, the demo and the MLflow record all read one description of a
result, and so that the report's fields (whose order is the file's order) are set in one place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from orchestrator.ensemble.estimates import Estimates

_LISTED = 10  # trials named in one line


@dataclass
class EnsembleMember:
    """One selected trial: all its k fold models, with its share of the vote."""

    trial_id: str
    run_dir: Path
    backbone: str
    count: int  # times picked by greedy selection (1 for top-N)
    weight: float  # count / total picks
    tta: tuple[str, ...]  # views used for this member's OOF and submission probabilities
    oof_f1: float  # macro F1 of the member's OOF probabilities with ``tta``
    oof_f1_no_tta: float
    recomputed: bool  # True when the OOF probabilities were predicted again for the requested TTA


@dataclass
class EnsembleResult:
    """What ``run_ensemble`` wrote and measured."""

    submission: Path
    probs_path: Path
    report_path: Path
    plot_path: Path
    method: str  # "greedy" or "top"
    tta: tuple[str, ...] | None  # requested views; None = each trial's own
    members: list[EnsembleMember]
    oof_f1: float  # ensemble OOF macro F1 with the submission's TTA
    oof_f1_no_tta: float
    best_single_trial: str
    best_single_f1: float  # best member-candidate OOF F1 with the same TTA
    metrics: dict  # ensemble OOF metrics (scalars, per_class_f1)
    eval_probs: np.ndarray  # (N eval images, 18) ensemble probabilities, info.csv order
    image_ids: list[str]
    oof_rel_path: np.ndarray  # training images (sorted rel_path) the OOF arrays below refer to
    oof_labels: np.ndarray
    oof_probs: np.ndarray  # (N train images, 18) ensemble OOF probabilities with the submission's TTA
    member_oof_probs: dict[str, np.ndarray]  # trial id -> its OOF probabilities with its TTA
    mlflow_run_id: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # trial id -> why it is not a candidate
    folds: tuple[int, ...] | None = None  # fold models used; None = all (OOF figures cover these folds only)
    estimates: Estimates | None = None  # what each F1 figure estimates, and which to trust


def describe_tta(views: Sequence[str]) -> str:
    return ",".join(views) if views else "none"


def format_report(result: EnsembleResult) -> str:
    """The short printed summary: members, their OOF F1, the ensemble's, the best single trial's."""
    tta = "each trial's own TTA" if result.tta is None else f"TTA {describe_tta(result.tta)}"
    folds = "" if result.folds is None else f", fold model(s) {','.join(map(str, result.folds))} only"
    lines = [
        f"ensemble: {len(result.members)} trial(s), {result.method} selection, {tta}{folds}",
        "  weight  OOF F1  TTA             trial",
    ]
    for m in result.members:
        note = " (OOF re-predicted)" if m.recomputed else ""
        lines.append(
            f"  {m.weight:6.3f}  {m.oof_f1:.4f}  {describe_tta(m.tta):<14}  {m.trial_id} ({m.backbone}){note}"
        )
    lines += [
        f"best single trial: {result.best_single_trial}  OOF macro F1 {result.best_single_f1:.4f}",
        f"ensemble OOF macro F1 {result.oof_f1:.4f} with {tta} ({result.oof_f1_no_tta:.4f} without TTA)"
        + ("" if result.folds is None else f" (on the {len(result.oof_labels)} images of those folds)"),
        *(["estimates of the submission's macro F1:", *result.estimates.lines()] if result.estimates else []),
        f"submission: {result.submission} ({len(result.image_ids)} images); "
        f"probabilities {result.probs_path}",
    ]
    if result.skipped:
        lines.append(
            f"not candidates: {len(result.skipped)} trial(s): "
            + "; ".join(f"{t} ({why})" for t, why in list(result.skipped.items())[:_LISTED])
        )
    if result.mlflow_run_id:
        lines.append(f"MLflow run: {result.mlflow_run_id}")
    return "\n".join(lines)


def build_report(
    result: EnsembleResult,
    search: str,
    search_dir: Path,
    settings: dict,
    confusion: np.ndarray,
    candidates_oof_f1: dict[str, float],
) -> dict:
    """The contents of ``ensemble.json``: how the members were chosen, their weights and every OOF figure.

    ``settings`` are the selection's parameters (None values are left out), ``candidates_oof_f1`` every
    candidate's own OOF F1, best first.
    """
    return {
        "search": search,
        "search_dir": str(search_dir.absolute()),
        "submission": str(result.submission.absolute()),
        "probs": str(result.probs_path.absolute()),
        "selection": result.method,
        **{key: value for key, value in settings.items() if value is not None},
        "tta": list(result.tta) if result.tta is not None else "own",
        "members": [
            {
                "trial_id": m.trial_id,
                "weight": m.weight,
                "count": m.count,
                "backbone": m.backbone,
                "tta": list(m.tta),
                "oof_f1": m.oof_f1,
                "oof_f1_no_tta": m.oof_f1_no_tta,
                "oof_recomputed": m.recomputed,
                "run_dir": str(m.run_dir.absolute()),
            }
            for m in result.members
        ],
        "oof_f1": result.oof_f1,
        "oof_f1_no_tta": result.oof_f1_no_tta,
        "oof_metrics": result.metrics["scalars"],
        "oof_per_class_f1": result.metrics["per_class_f1"],
        "oof_confusion": np.asarray(confusion).tolist(),
        "best_single": {"trial_id": result.best_single_trial, "oof_f1": result.best_single_f1},
        "candidates_oof_f1": candidates_oof_f1,
        "skipped": result.skipped,
        "eval_images": len(result.image_ids),
        "estimates": result.estimates.as_dict() if result.estimates else None,
    }
