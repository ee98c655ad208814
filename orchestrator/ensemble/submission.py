"""The ensemble's files and the competition's score: the submission CSV, its probabilities, scoring it.

A submission is what gets uploaded, so it is written so that a broken one cannot exist: under a pending
name, re-read and validated against info.csv's ids and order, and only then renamed into place (on any
error no new submission exists and an old one is untouched). The probabilities beside it (.npz) keep what
the argmax threw away, for later blending or calibration.

Scoring reads a submission and an answers CSV strictly (every bad row is named) and computes macro F1 the
way the competition's scorer does: over the classes present in the answers or the predictions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.errors import OrchestratorError
from trainers.io import atomic_savez, write_csv_atomic
from trainers.labels import NUM_CLASSES, class_names
from trainers.metrics import confusion_matrix, f1_per_class, macro_f1_present

SUBMISSION_COLUMNS = ("ImageID", "ans")
_LISTED = 10  # ids named in one message

# ----------------------------------------------------------------------------------------------------------
# writing


def _submission_frame(image_ids: list[str], answers: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"ImageID": pd.Series(image_ids, dtype=str), "ans": np.asarray(answers, dtype=np.int64)}
    )


def validate_submission(path: Path, expected_ids: Sequence[str]) -> None:
    """Re-read a written submission: columns ImageID,ans, info.csv's ids in order, classes 0..17."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"submission {path} cannot be read back ({error})") from None
    if tuple(frame.columns) != SUBMISSION_COLUMNS:
        raise OrchestratorError(
            f"submission {path} has columns {list(frame.columns)}, not {list(SUBMISSION_COLUMNS)}"
        )
    if frame["ImageID"].tolist() != list(expected_ids):
        raise OrchestratorError(
            f"submission {path} does not list eval/info.csv's ImageIDs in info.csv's order"
        )
    valid = frame["ans"].str.fullmatch(r"\d+") & (pd.to_numeric(frame["ans"], errors="coerce") < NUM_CLASSES)
    if not valid.all():
        row = int(np.flatnonzero(~valid.to_numpy())[0])
        raise OrchestratorError(
            f"submission {path} line {row + 2}: ans {frame['ans'][row]!r} is not a class 0..17"
        )


def write_submission(path: Path, image_ids: list[str], answers: np.ndarray) -> None:
    """Atomic and checked: written under a pending name, re-read and validated, then renamed into place."""
    pending = path.with_name(f".{path.name}.pending")
    try:
        write_csv_atomic(_submission_frame(image_ids, answers), pending)
        validate_submission(pending, image_ids)
        os.replace(pending, path)
    finally:
        pending.unlink(missing_ok=True)


def write_probs(
    path: Path,
    image_ids: list[str],
    probs: np.ndarray,
    member_ids: list[str],
    member_probs: np.ndarray,
    weights: list[float],
) -> None:
    """The ensemble's and each member's eval probabilities (float32) with the ids and weights, atomically."""
    atomic_savez(
        path,
        image_id=np.asarray(image_ids, dtype=str),
        probs=probs.astype(np.float32),
        members=np.asarray(member_ids, dtype=str),
        weights=np.asarray(weights),
        member_probs=member_probs.astype(np.float32),
    )


# ----------------------------------------------------------------------------------------------------------
# scoring a submission


def _read_labelled_csv(path: Path, role: str) -> pd.DataFrame:
    """An ImageID,ans CSV with ids as strings and ans as classes 0..17; every bad row is named."""
    path = Path(path)
    if not path.is_file():
        raise OrchestratorError(f"{role} file {path} not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"{role} file {path} is not a readable CSV ({error})") from None
    missing = [c for c in SUBMISSION_COLUMNS if c not in frame.columns]
    if missing:
        raise OrchestratorError(f"{role} file {path} lacks column(s) {missing}; it needs ImageID,ans")
    ans = frame["ans"].str.strip()
    valid = ans.str.fullmatch(r"\d+") & (pd.to_numeric(ans, errors="coerce") < NUM_CLASSES)
    if not valid.all():
        bad = np.flatnonzero(~valid.to_numpy())
        listed = ", ".join(f"line {i + 2} ({frame['ans'][i]!r})" for i in bad[:_LISTED])
        raise OrchestratorError(
            f"{role} file {path}: {len(bad)} ans value(s) are not a class 0..17: {listed}"
        )
    duplicated = frame["ImageID"][frame["ImageID"].duplicated()].unique().tolist()
    if duplicated:
        raise OrchestratorError(
            f"{role} file {path} lists {len(duplicated)} ImageID(s) twice, e.g. {duplicated[:_LISTED]}"
        )
    return pd.DataFrame({"ImageID": frame["ImageID"], "ans": ans.astype(np.int64)})


def _macro_f1_present(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """Macro F1 over the classes present in the answers or the predictions (scikit-learn's default).

    A test set rarely lacks a class, but a small one may: a class absent from both sides is left out, as
    the competition's scorer does, instead of counting as 0. Per-class F1 is NaN for such a class.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return macro_f1_present(cm), np.where(present, f1_per_class(cm), np.nan)


def score_arrays(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Competition scores of predicted classes: f1 (macro), acc, mask/gender/age_f1, per_class_f1, n."""
    from trainers.labels import NUM_AGE, NUM_GENDER, NUM_MASK, decode

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or not len(y_true):
        raise ValueError(f"need two equally long 1-D label arrays, got {y_true.shape} and {y_pred.shape}")
    f1, per_class = _macro_f1_present(y_true, y_pred, NUM_CLASSES)
    scores = {"f1": f1, "acc": float((y_true == y_pred).mean())}
    for name, size, truth, predicted in zip(
        ("mask_f1", "gender_f1", "age_f1"),
        (NUM_MASK, NUM_GENDER, NUM_AGE),
        decode(y_true),
        decode(y_pred),
        strict=True,
    ):
        scores[name] = _macro_f1_present(truth, predicted, size)[0]
    scores["per_class_f1"] = [float(v) for v in per_class]
    scores["n"] = int(len(y_true))
    return scores


def score_submission_arrays(submission: Path, answers: Path) -> dict:
    """``score_arrays`` of a submission CSV against an answers CSV, after checking both list the same ids."""
    predicted = _read_labelled_csv(submission, "submission")
    truth = _read_labelled_csv(answers, "answers")
    truth_ids, predicted_ids = set(truth["ImageID"]), set(predicted["ImageID"])
    missing = [i for i in truth["ImageID"] if i not in predicted_ids]
    extra = [i for i in predicted["ImageID"] if i not in truth_ids]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} answer id(s) missing from the submission: {missing[:_LISTED]}")
        if extra:
            parts.append(f"{len(extra)} submission id(s) not in the answers: {extra[:_LISTED]}")
        raise OrchestratorError(
            f"submission {submission} and answers {answers} list different images; " + "; ".join(parts)
        )
    aligned = predicted.set_index("ImageID").loc[truth["ImageID"], "ans"].to_numpy()
    return score_arrays(truth["ans"].to_numpy(), aligned)


def score_submission(submission: Path, answers: Path) -> str:
    """`foldtune score`: macro F1, accuracy and per-task F1 of a submission, as printable text."""
    scores = score_submission_arrays(submission, answers)
    names = class_names()
    per_class = "  ".join(
        f"{i}:{f1:.2f}" if math.isfinite(f1) else f"{i}:-" for i, f1 in enumerate(scores["per_class_f1"])
    )
    return "\n".join(
        [
            f"{submission} vs {answers}: {scores['n']} images",
            f"macro F1 {scores['f1']:.4f}  accuracy {scores['acc']:.4f}",
            f"mask F1 {scores['mask_f1']:.4f}  gender F1 {scores['gender_f1']:.4f}  "
            f"age F1 {scores['age_f1']:.4f}",
            f"per-class F1 (0={names[0]} .. 17={names[17]}): {per_class}",
        ]
    )
