"""What a finished run leaves beside its checkpoints: out-of-fold predictions, metrics files and plots,
and ``result.json``.

``oof.npz`` holds every training image's probabilities from the one fold model that never saw it, at that
fold's best epoch, with and without TTA: the honest material the ensemble selects on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from trainers.checkpoint import fold_checkpoint_path, load_best_weights
from trainers.config import TrainConfig
from trainers.fold_state import predict_validation
from trainers.folds import HOLDOUT_FOLD
from trainers.io import atomic_savez, write_csv_atomic, write_text_atomic
from trainers.labels import NUM_CLASSES, AgeBands, class_names
from trainers.metrics import compute_metrics, flat_scalars, plot_confusion, plot_per_class_f1

if TYPE_CHECKING:
    from trainers.fold_state import FoldState


@dataclass
class FitResult:
    """How a run ended and where its results are."""

    status: str  # "completed" | "early_stopped" | "diverged"
    message: str
    best_f1: float  # best mean-over-folds validation macro F1 of any epoch
    best_epoch: int
    epochs_trained: int
    run_dir: Path
    oof_f1: float = float("nan")  # macro F1 of all out-of-fold predictions pooled (best checkpoints)
    oof_f1_tta: float = float("nan")
    trainable_params: int = 0
    total_params: int = 0
    extra: dict = field(default_factory=dict)


def write_out_of_fold(
    folds: list[FoldState],
    data: pd.DataFrame,
    cfg: TrainConfig,
    cache,
    device,
    mean,
    std,
    run_dir: Path,
    result: FitResult,
) -> None:
    """Every training image's probabilities from the fold model that never saw it, at its best epoch.

    Held-out persons (fold ``HOLDOUT_FOLD``) are in no fold's validation set: they are left out here, and
    so are the persons of folds a ``train_folds`` run did not train (no model held them out)."""
    probs = np.zeros((len(data), NUM_CLASSES), dtype=np.float32)
    probs_tta = np.zeros_like(probs)
    names = class_names(AgeBands(tuple(cfg.age_edges)))
    per_class = {}
    for fold in folds:
        load_best_weights(fold.model, fold_checkpoint_path(run_dir, fold.index))
        probs[fold.val_positions] = fold.best_probs
        probs_tta[fold.val_positions] = predict_validation(
            fold, cfg, cache.images, device, mean, std, cfg.tta
        )
        metrics = compute_metrics(fold.val_labels, fold.best_probs)
        per_class[f"fold{fold.index}"] = metrics["per_class_f1"]
        write_csv_atomic(
            pd.DataFrame(metrics["confusion"], index=names, columns=names),
            run_dir / "metrics" / f"confusion_fold{fold.index}.csv",
            index=True,
        )
    fold_of = data["fold"].to_numpy()
    in_folds = (fold_of != HOLDOUT_FOLD) & (fold_of < cfg.folds_trained)  # the trained folds' persons
    data, probs, probs_tta = data[in_folds], probs[in_folds], probs_tta[in_folds]
    labels = data["label"].to_numpy()
    oof = compute_metrics(labels, probs)
    oof_tta = compute_metrics(labels, probs_tta)
    result.oof_f1, result.oof_f1_tta = float(oof["f1"]), float(oof_tta["f1"])
    result.extra = {
        "oof": flat_scalars(oof, prefix="oof_"),
        "oof_tta": flat_scalars(oof_tta, prefix="oof_tta_"),
        "fold_best_epochs": [f.best_epoch for f in folds],
        "fold_best_f1": [float(f.best_f1) for f in folds],
    }
    per_class["oof"] = oof["per_class_f1"]
    per_class["oof_tta"] = oof_tta["per_class_f1"]
    write_csv_atomic(
        pd.DataFrame(per_class, index=names), run_dir / "metrics" / "per_class_f1.csv", index=True
    )
    write_csv_atomic(
        pd.DataFrame(oof["confusion"], index=names, columns=names),
        run_dir / "metrics" / "confusion_oof.csv",
        index=True,
    )
    plot_confusion(
        np.asarray(oof["confusion"]),
        names,
        run_dir / "plots" / "confusion.png",
        title=f"{cfg.backbone} out-of-fold confusion (macro F1 {result.oof_f1:.3f})",
    )
    plot_per_class_f1(per_class, names, run_dir / "plots" / "per_class_f1.png")
    atomic_savez(
        run_dir / "oof.npz",
        rel_path=data["rel_path"].to_numpy(dtype=str),
        label=labels,
        fold=data["fold"].to_numpy(),
        probs=probs,
        probs_tta=probs_tta,
    )


def epoch_metrics(history: pd.DataFrame, epoch: int) -> dict[str, float]:
    """One epoch of ``metrics/epochs.csv`` as the flat metrics a run reports (``val_f1``, ``fold0/val_f1``,
    ...): the mean row unprefixed, each fold's prefixed; a column a row does not have (the mean row's
    ``epoch_seconds``) is left out, not reported as NaN."""
    metrics: dict[str, float] = {}
    for row in history[history["epoch"] == epoch].to_dict("records"):
        prefix = "" if row["fold"] == "mean" else f"fold{row['fold']}/"
        metrics.update(
            {f"{prefix}{k}": v for k, v in row.items() if k not in ("epoch", "fold") and pd.notna(v)}
        )
    return metrics


def write_result(result: FitResult, cfg: TrainConfig, run_dir: Path) -> None:
    payload = {**asdict(result), "run_dir": str(result.run_dir), "config": cfg.to_dict()}
    write_text_atomic(json.dumps(payload, indent=2, default=float), run_dir / "result.json")


def assemble_out_of_fold(run_dir: Path, k: int, trained: int | None = None) -> dict[str, np.ndarray]:
    """The OOF arrays of a run that never reached its end (stopped early by ASHA, cut by a time budget,
    interrupted), rebuilt from its fold checkpoints: each holds its fold's validation probabilities at its
    best epoch (``val_probs``), written in the same atomic step as the weights, so they always match.

    ``trained``: the folds the run trains (its ``train_folds``; default all k): only their persons have
    out-of-fold rows. Without TTA (``probs_tta`` is ``probs``) and flagged ``partial``. Raises ValueError
    or CheckpointError with the reason when the run cannot give them (an older run folder, a checkpoint
    without them).
    """
    from trainers.checkpoint import read_checkpoint

    folds_path = Path(run_dir) / "folds.csv"
    folds = pd.read_csv(folds_path, dtype={"rel_path": str, "person_id": str})
    if "label" not in folds.columns:
        raise ValueError(f"{folds_path} has no label column (written by an older foldtune)")
    fold_of = folds["fold"].to_numpy(dtype=np.int64)
    if k < 2 or set(fold_of.tolist()) - {HOLDOUT_FOLD} != set(range(k)):
        raise ValueError(f"{folds_path} does not hold folds 0..{k - 1} (k={k})")
    trained = k if trained is None else int(trained)
    probs = np.zeros((len(folds), NUM_CLASSES), dtype=np.float32)
    for fold in range(trained):
        path = fold_checkpoint_path(run_dir, fold)
        payload = read_checkpoint(path, mmap=True)
        rows = np.flatnonzero(fold_of == fold)
        fold_probs = payload.get("val_probs")
        if fold_probs is None or tuple(fold_probs.shape) != (len(rows), NUM_CLASSES):
            raise ValueError(
                f"{path} holds no validation probabilities for the {len(rows)} images of fold {fold}"
            )
        probs[rows] = fold_probs.numpy()
    in_folds = (fold_of != HOLDOUT_FOLD) & (fold_of < trained)
    return {
        "rel_path": folds["rel_path"].to_numpy(dtype=str)[in_folds],
        "label": folds["label"].to_numpy(dtype=np.int64)[in_folds],
        "fold": fold_of[in_folds],
        "probs": probs[in_folds],
        "probs_tta": probs[in_folds],
        "partial": np.array(True),
    }


def save_partial_out_of_fold(run_dir: Path, k: int, trained: int | None = None) -> Path:
    """Keep an unfinished run's OOF arrays as ``oof.npz`` (e.g. before its checkpoints are pruned)."""
    return atomic_savez(Path(run_dir) / "oof.npz", **assemble_out_of_fold(run_dir, k, trained))
