"""Validation metrics for the 18-class problem, their flat scalar names, and the two diagnostic plots.

`compute_metrics` runs every epoch for every fold, so it is plain numpy on one 18x18 confusion matrix (every
score below is derived from it) instead of a dozen scikit-learn calls; tests check it equals scikit-learn.

Dict returned by `compute_metrics` (F1 = macro F1 as the competition scores it, scikit-learn's
`f1_score(average="macro", zero_division=0)`: over the classes present in y_true or y_pred; a class absent
from both is left out instead of counting as 0. One definition everywhere: training, selection, estimates
and `foldtune score` all use `macro_f1_present`):

    acc                 accuracy over the 18 classes
    f1                  macro F1 over the 18 classes (the competition score)
    mask_f1             macro F1 over the 3 mask states   (true and predicted class decoded to mask)
    gender_f1           macro F1 over the 2 genders
    age_f1              macro F1 over the 3 age bands
    age_f1_wear         age-band macro F1 on the images whose TRUE mask state is wear
    age_f1_incorrect    ... incorrect mask
    age_f1_not_wear     ... no mask; NaN when no image has that true mask state (undefined, not 0)
    loss                only when `loss` is given
    per_class_f1        list of 18 floats, class-index order
    confusion           (18, 18) int64 array, rows = true class, columns = predicted class

`flat_scalars(metrics, prefix="val")` keeps the scalars and prefixes them: `val_acc`, `val_f1`,
`val_mask_f1`, `val_gender_f1`, `val_age_f1`, `val_age_f1_wear`, `val_age_f1_incorrect`,
`val_age_f1_not_wear` and `val_loss` when present. These are the names the trainer logs and the search
optimises (`val_f1`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from trainers.io import save_figure_atomic
from trainers.labels import MASK_NAMES, NUM_AGE, NUM_CLASSES, NUM_GENDER, NUM_MASK, decode


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(k, k) int64 counts, rows = true, columns = predicted; one bincount instead of a Python loop."""
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """F1 of each class from a confusion matrix: 2TP / (2TP + FP + FN), 0 where that is 0/0."""
    tp = np.diag(cm).astype(np.float64)
    denominator = cm.sum(axis=0) + cm.sum(axis=1)  # (TP + FP) + (TP + FN)
    return np.divide(2.0 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)


def macro_f1_present(cm: np.ndarray) -> float:
    """Macro F1 of a confusion matrix over the classes present in its truth or its predictions (the
    competition's scorer); NaN for an empty matrix."""
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    if not present.any():
        return float("nan")
    return float(f1_per_class(cm)[present].mean())


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    if y_true.size == 0:
        return float("nan")
    return macro_f1_present(confusion_matrix(y_true, y_pred, num_classes))


def _validate(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != NUM_CLASSES:
        raise ValueError(f"probs must have shape (N, {NUM_CLASSES}), got {probs.shape}")
    if y_true.ndim != 1 or y_true.shape[0] != probs.shape[0]:
        raise ValueError(f"y_true must have shape ({probs.shape[0]},) to match probs, got {y_true.shape}")
    if y_true.size == 0:
        raise ValueError("cannot compute metrics on zero samples (is the validation fold empty?)")
    if not np.issubdtype(y_true.dtype, np.integer):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y_true.dtype}")
    bad = (y_true < 0) | (y_true >= NUM_CLASSES)
    if bad.any():
        raise ValueError(
            f"y_true holds labels outside 0..{NUM_CLASSES - 1}, e.g. {y_true[bad][0]} at row {np.argmax(bad)}"
        )
    if not np.isfinite(probs).all():
        row = int(np.argmax(~np.isfinite(probs).all(axis=1)))
        raise ValueError(f"probs contain NaN or inf (first at row {row}); the model has probably diverged")
    return y_true.astype(np.int64), probs


def compute_metrics(y_true, probs, loss: float | None = None) -> dict:
    """All validation metrics of one fold (see the module docstring for the keys).

    `probs` may be probabilities or log-probabilities (N, 18): only the per-row argmax is used.
    """
    y_true, probs = _validate(y_true, probs)
    y_pred = probs.argmax(axis=1).astype(np.int64)
    cm = confusion_matrix(y_true, y_pred, NUM_CLASSES)
    per_class = f1_per_class(cm)

    true_mask, true_gender, true_age = decode(y_true)
    pred_mask, pred_gender, pred_age = decode(y_pred)
    metrics: dict = {
        "acc": float(np.trace(cm) / cm.sum()),
        "f1": macro_f1_present(cm),
        "mask_f1": _macro_f1(true_mask, pred_mask, NUM_MASK),
        "gender_f1": _macro_f1(true_gender, pred_gender, NUM_GENDER),
        "age_f1": _macro_f1(true_age, pred_age, NUM_AGE),
    }
    for mask_state, mask_name in enumerate(MASK_NAMES):
        rows = true_mask == mask_state
        metrics[f"age_f1_{mask_name}"] = _macro_f1(true_age[rows], pred_age[rows], NUM_AGE)
    if loss is not None:
        metrics["loss"] = float(loss)
    metrics["per_class_f1"] = [float(value) for value in per_class]
    metrics["confusion"] = cm
    return metrics


def flat_scalars(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """The scalar metrics as floats, named `<prefix>_<key>` (`val` and `val_` both give `val_f1`)."""
    if prefix and not prefix.endswith("_"):
        prefix += "_"
    return {
        f"{prefix}{key}": float(value)
        for key, value in metrics.items()
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    }


def _new_figure(width: float, height: float):
    """A figure on the Agg canvas directly: no pyplot global state, no display, safe in worker threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_confusion(cm, class_names: Sequence[str], path: str | os.PathLike, title: str = "") -> None:
    """Confusion matrix as a PNG: colour = share of the true class (row), text = count."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix shape {cm.shape} does not match {len(class_names)} class names")
    row_totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)

    size = 3.0 + 0.45 * len(class_names)
    figure = _new_figure(size + 1.5, size)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=class_names, rotation=90, fontsize=7)
    axes.set_yticks(ticks, labels=class_names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for (row, col), count in np.ndenumerate(cm):
        if count:
            colour = "white" if shares[row, col] > 0.5 else "black"
            axes.text(col, row, str(int(count)), ha="center", va="center", fontsize=6, color=colour)
    if title:
        axes.set_title(title)
    save_figure_atomic(figure, path)


def plot_per_class_f1(
    per_class_f1: Sequence[float] | Mapping[object, Sequence[float]],
    class_names: Sequence[str],
    path: str | os.PathLike,
    title: str = "per-class F1",
) -> None:
    """Bar chart of per-class F1; given {fold: scores} it draws one bar per fold and marks the mean."""
    series = dict(per_class_f1) if isinstance(per_class_f1, Mapping) else {"all": per_class_f1}
    if not series:
        raise ValueError("plot_per_class_f1 needs at least one list of per-class F1 scores")
    for name, scores in series.items():
        if len(scores) != len(class_names):
            raise ValueError(f"fold {name!r}: {len(scores)} F1 scores for {len(class_names)} class names")

    figure = _new_figure(3.0 + 0.6 * len(class_names), 4.5)
    axes = figure.add_subplot()
    positions = np.arange(len(class_names))
    bar_width = 0.8 / len(series)
    for index, (name, scores) in enumerate(series.items()):
        offset = (index - (len(series) - 1) / 2) * bar_width
        label = f"fold {name}" if isinstance(name, (int, np.integer)) else str(name)
        axes.bar(positions + offset, scores, width=bar_width, label=label)
    if len(series) > 1:
        mean = np.mean([np.asarray(scores, dtype=float) for scores in series.values()], axis=0)
        axes.scatter(positions, mean, color="black", marker="_", s=300, zorder=3, label="mean")
    axes.set_xticks(positions, labels=class_names, rotation=90, fontsize=7)
    axes.set_ylim(0.0, 1.05)
    axes.set_ylabel("F1")
    axes.set_title(title)
    axes.legend(fontsize=7, ncols=min(len(series) + 1, 6), loc="lower right")
    save_figure_atomic(figure, path)
