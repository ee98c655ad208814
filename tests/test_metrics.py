"""trainers.metrics: numpy metrics equal scikit-learn, flat scalar names, atomic PNG plots."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from trainers.labels import NUM_CLASSES, class_names, decode
from trainers.metrics import compute_metrics, flat_scalars, plot_confusion, plot_per_class_f1

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _predictions(seed: int, n: int, true_classes, predicted_classes, accuracy: float):
    """Random labels drawn from `true_classes`; probs whose argmax is right with about `accuracy`."""
    rng = np.random.default_rng(seed)
    y_true = rng.choice(true_classes, size=n)
    y_pred = np.where(rng.random(n) < accuracy, y_true, rng.choice(predicted_classes, size=n))
    probs = rng.random((n, NUM_CLASSES)) * 0.5
    probs[np.arange(n), y_pred] += 1.0
    return y_true, probs / probs.sum(axis=1, keepdims=True), y_pred


def _sk_macro_f1(y_true, y_pred, k):
    return f1_score(y_true, y_pred, average="macro", zero_division=0)  # the classes present (competition)


CASES = {
    "all classes": (np.arange(18), np.arange(18), 0.5),
    # classes 3, 10 and 17 never occur, 0 and 4 are never predicted unless correct
    "classes missing from y_true": (np.setdiff1d(np.arange(18), [3, 10, 17]), np.arange(18), 0.3),
    "classes missing from both": (np.array([0, 1, 2, 6, 7, 13]), np.array([1, 2, 5, 6, 12]), 0.4),
    "a single true class": (np.array([8]), np.array([8, 9, 14]), 0.2),
    "no mask-incorrect images": (np.array([0, 4, 5, 12, 15, 16]), np.array([0, 4, 5, 12, 15, 16]), 0.6),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_metrics_equals_scikit_learn(case, seed):
    true_classes, predicted_classes, accuracy = CASES[case]
    y_true, probs, y_pred = _predictions(seed, 257, true_classes, predicted_classes, accuracy)
    metrics = compute_metrics(y_true, probs, loss=0.75)

    labels = list(range(NUM_CLASSES))
    # bit-for-bit equal: both compute 2TP / (2TP + FP + FN) in float64 and average in the same order
    assert metrics["acc"] == accuracy_score(y_true, y_pred)
    assert metrics["f1"] == _sk_macro_f1(y_true, y_pred, NUM_CLASSES)
    np.testing.assert_array_equal(
        metrics["per_class_f1"], f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    )
    np.testing.assert_array_equal(metrics["confusion"], sk_confusion_matrix(y_true, y_pred, labels=labels))
    assert metrics["confusion"].dtype == np.int64

    true_parts, pred_parts = decode(y_true), decode(y_pred)
    for index, (task, k) in enumerate((("mask", 3), ("gender", 2), ("age", 3))):
        expected = _sk_macro_f1(true_parts[index], pred_parts[index], k)
        assert metrics[f"{task}_f1"] == expected, task
    for mask_state, suffix in enumerate(("wear", "incorrect", "not_wear")):
        rows = true_parts[0] == mask_state
        if rows.any():
            expected = _sk_macro_f1(true_parts[2][rows], pred_parts[2][rows], 3)
            assert metrics[f"age_f1_{suffix}"] == expected, suffix
        else:
            assert np.isnan(metrics[f"age_f1_{suffix}"]), "no image with that mask state: undefined"
    assert metrics["loss"] == 0.75


def test_log_probabilities_give_the_same_metrics_as_probabilities():
    y_true, probs, _ = _predictions(5, 100, np.arange(18), np.arange(18), 0.5)
    from_probs = compute_metrics(y_true, probs)
    from_log_probs = compute_metrics(y_true, np.log(probs))
    assert flat_scalars(from_probs) == flat_scalars(from_log_probs)
    assert "loss" not in from_probs


def test_perfect_predictions_score_one_on_present_classes_only():
    y_true = np.array([0, 1, 2, 3])
    probs = np.eye(NUM_CLASSES)[y_true]
    metrics = compute_metrics(y_true, probs)
    assert metrics["acc"] == 1.0
    # the 14 classes absent from truth and prediction are left out, as the competition's scorer does
    assert metrics["f1"] == 1.0
    assert metrics["gender_f1"] == 1.0
    assert metrics["mask_f1"] == 1.0  # only "wear" is present
    wrong = compute_metrics(y_true, np.eye(NUM_CLASSES)[[1, 0, 2, 3]])  # 0 and 1 swapped
    assert wrong["f1"] == pytest.approx(0.5)  # (0 + 0 + 1 + 1) / 4 present classes


def test_flat_scalars_names_and_values():
    y_true, probs, _ = _predictions(3, 64, np.arange(18), np.arange(18), 0.5)
    metrics = compute_metrics(y_true, probs, loss=np.float32(1.5))
    flat = flat_scalars(metrics, prefix="val")
    assert set(flat) == {
        "val_acc",
        "val_f1",
        "val_mask_f1",
        "val_gender_f1",
        "val_age_f1",
        "val_age_f1_wear",
        "val_age_f1_incorrect",
        "val_age_f1_not_wear",
        "val_loss",
    }
    assert all(type(value) is float for value in flat.values())
    assert flat["val_f1"] == metrics["f1"] and flat["val_loss"] == 1.5
    assert flat_scalars(metrics, prefix="val_") == flat
    assert set(flat_scalars(metrics)) == {name.removeprefix("val_") for name in flat}


@pytest.mark.parametrize(
    ("y_true", "probs", "message"),
    [
        (np.array([0, 1]), np.zeros((2, 17)), r"shape \(N, 18\)"),
        (np.array([0, 1, 2]), np.zeros((2, 18)), r"y_true must have shape \(2,\)"),
        (np.array([0, 18]), np.zeros((2, 18)), "outside 0..17, e.g. 18 at row 1"),
        (np.array([0.0, 1.0]), np.zeros((2, 18)), "integer class indices"),
        (np.array([], dtype=int), np.zeros((0, 18)), "zero samples"),
        (np.array([0, 1]), np.array([[0.0] * 18, [np.nan] * 18]), "NaN or inf .*row 1"),
    ],
)
def test_bad_inputs_are_named(y_true, probs, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(y_true, probs)


def _assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_plot_confusion_writes_a_png_atomically(tmp_path):
    y_true, probs, _ = _predictions(4, 300, np.arange(18), np.arange(18), 0.6)
    cm = compute_metrics(y_true, probs)["confusion"]
    path = tmp_path / "plots" / "confusion.png"
    path.parent.mkdir()
    path.write_bytes(b"old")
    plot_confusion(cm, class_names(), path, title="fold 0")
    _assert_png(path)
    with pytest.raises(ValueError, match="does not match 3 class names"):
        plot_confusion(cm, ["a", "b", "c"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_plot_per_class_f1_for_one_list_and_for_folds(tmp_path):
    rng = np.random.default_rng(0)
    single = tmp_path / "single.png"
    plot_per_class_f1(list(rng.random(18)), class_names(), single)
    _assert_png(single)
    folds = tmp_path / "folds.png"
    plot_per_class_f1({fold: list(rng.random(18)) for fold in range(5)}, class_names(), folds)
    _assert_png(folds)
    assert folds.stat().st_size > single.stat().st_size  # five bars per class plus the means
    with pytest.raises(ValueError, match="fold 2"):
        plot_per_class_f1({1: [0.5] * 18, 2: [0.5] * 17}, class_names(), tmp_path / "bad.png")
