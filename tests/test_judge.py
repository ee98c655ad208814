"""label-issues measures its own judge before it drafts: synthetic judges of known quality on synthetic
persons (no images, no training), and the product's own injection, finder and draft gate.

A judge here is 18-class probabilities per picture built from three factors: the mask state (always
clear), the age band (clear) and the gender, which the judge gets wrong for a chosen share of persons
(``disputes``), less confidently than it gets the others right, as a trained model does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from orchestrator.inspect.draft import drafted_rows
from orchestrator.inspect.judge import RATES, inject, measure_judge, precision_curve, swap_eligible
from orchestrator.inspect.label_issues import find_issues
from trainers.data import STEM_ORDER
from trainers.labels import AgeBands, encode

BANDS = AgeBands((30, 60))
MASK_OF_STEM = {
    stem: (2 if stem == "normal" else 1 if stem == "incorrect_mask" else 0) for stem in STEM_ORDER
}


def synthetic_persons(persons: int, seed: int = 0) -> pd.DataFrame:
    """``persons`` x 7 pictures with clean labels, in the columns the finder reads."""
    rng = np.random.default_rng(seed)
    ages = rng.choice([22, 25, 35, 45, 52, 65, 70], persons)
    rows = []
    for index in range(persons):
        person_id, gender, age = f"{index:06d}", int(rng.integers(0, 2)), int(ages[index])
        for stem in STEM_ORDER:
            rows.append(
                {
                    "rel_path": f"train/images/{person_id}/{stem}.jpg",
                    "person_id": person_id,
                    "stem": stem,
                    "mask": MASK_OF_STEM[stem],
                    "gender": gender,
                    "age": age,
                    "age_band": int(BANDS.band(np.array([age]))[0]),
                }
            )
    table = pd.DataFrame(rows)
    table["label"] = encode(
        table["mask"].to_numpy(), table["gender"].to_numpy(), table["age_band"].to_numpy()
    )
    return table


def synthetic_judge(table: pd.DataFrame, disputes: float, seed: int = 1, sure_when_wrong: bool = False):
    """Probabilities of a judge that prefers the wrong gender for a share ``disputes`` of the persons
    (with log-odds 0.5-2.5, or as sure as when right with ``sure_when_wrong``) and the right one for the
    others (log-odds 2-5); mask and age band clear."""
    rng = np.random.default_rng(seed)
    persons = table["person_id"].unique()
    wrong = dict(zip(persons, rng.random(len(persons)) < disputes, strict=True))
    wrong_range = (2.0, 5.0) if sure_when_wrong else (0.5, 2.5)
    strength = {p: (rng.uniform(*wrong_range) if wrong[p] else rng.uniform(2.0, 5.0)) for p in persons}
    n = len(table)
    sign = np.where(table["person_id"].map(wrong).to_numpy(), -1.0, 1.0)
    logit = sign * table["person_id"].map(strength).to_numpy() + rng.normal(0, 0.3, n)
    p_true = 1 / (1 + np.exp(-logit))
    gender = np.stack([p_true, 1 - p_true], axis=1)
    gender = np.where(table["gender"].to_numpy()[:, None] == 0, gender, gender[:, ::-1])

    def clear(true: np.ndarray, size: int) -> np.ndarray:
        logits = 5.0 * np.eye(size)[true] + rng.normal(0, 0.5, (n, size))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    mask, age = clear(table["mask"].to_numpy(), 3), clear(table["age_band"].to_numpy(), 3)
    classes = np.arange(18)
    return mask[:, classes // 6] * gender[:, (classes // 3) % 2] * age[:, classes % 3]


def drafted_precision(table, probs, cuts, seed: int) -> tuple[float, float, int]:
    """The draft's true precision and recall for gender on a fresh injection (a seed the judge never saw)."""
    noisy, noisy_probs, injected = inject(table, probs, BANDS, seed)
    issues = find_issues(noisy, noisy_probs, BANDS)
    drafted = issues[drafted_rows(issues, cuts) & (issues["kind"] == "gender")]
    hits = drafted["id"].isin(injected["gender"]).sum()
    precision = hits / len(drafted) if len(drafted) else float("nan")
    return precision, hits / len(injected["gender"]), len(drafted)


@pytest.fixture(scope="module")
def persons():
    return synthetic_persons(600)


@pytest.mark.parametrize("disputes", [0.01, 0.04])
def test_the_measured_precision_is_the_drafts_precision_on_fresh_errors(persons, disputes):
    probs = synthetic_judge(persons, disputes)
    report = measure_judge(persons, probs, BANDS, seeds=10, min_precision=0.5)
    gender = report.kinds["gender"]
    assert gender.cut is not None and gender.precision >= 0.5
    fresh = [drafted_precision(persons, probs, report.cuts, seed) for seed in range(100, 110)]
    true_precision = np.nanmean([p for p, _, _ in fresh])
    assert abs(gender.precision - true_precision) <= 0.1, (gender.precision, true_precision)
    if disputes == 0.01:  # a strong judge keeps the recall
        assert np.mean([r for _, r, _ in fresh]) >= 0.8 and gender.recall >= 0.8


def test_a_weak_judge_drafts_nothing_of_its_weak_kind(persons):
    # the 320-person quick search's judge, roughly: disputes a fifth of the genders, as sure as when right
    probs = synthetic_judge(persons, disputes=0.20, sure_when_wrong=True)
    report = measure_judge(persons, probs, BANDS, seeds=10, min_precision=0.5)
    gender = report.kinds["gender"]
    assert gender.cut is None and gender.best_precision < 0.5
    assert "reaches precision" in gender.line(0.5) and "none drafted" in gender.line(0.5)
    _, _, drafted = drafted_precision(persons, probs, report.cuts, seed=100)
    assert drafted == 0
    assert report.kinds["mask_swap"].cut is not None  # the clear kinds still draft


def test_injection_hits_disjoint_persons_at_the_finders_rates(persons):
    probs = synthetic_judge(persons, disputes=0.0)
    noisy, noisy_probs, injected = inject(persons, probs, BANDS, seed=3)
    sizes = {kind: len(ids) for kind, ids in injected.items()}
    eligible = len(swap_eligible(persons))
    assert sizes == {"gender": 30, "age": 30, "mask_swap": round(RATES["mask_swap"] * eligible)}
    assert not injected["gender"] & injected["age"] and not injected["age"] & injected["mask_swap"]
    flipped = noisy.loc[noisy["person_id"].isin(injected["gender"]), "gender"]
    before = persons.loc[persons["person_id"].isin(injected["gender"]), "gender"]
    assert (flipped.to_numpy() == 1 - before.to_numpy()).all()
    moved = noisy[noisy["person_id"].isin(injected["age"])]
    assert (moved["age_band"].to_numpy() != persons.loc[moved.index, "age_band"].to_numpy()).all()
    swapped = persons["person_id"].isin(injected["mask_swap"]) & persons["stem"].isin(
        ["incorrect_mask", "normal"]
    )
    assert not np.allclose(noisy_probs[swapped.to_numpy()], probs[swapped.to_numpy()])
    untouched = ~swapped.to_numpy()
    np.testing.assert_array_equal(noisy_probs[untouched], probs[untouched])
    again = inject(persons, probs, BANDS, seed=3)[2]
    assert again == injected  # seeded


def test_precision_curve_counts_flags_and_hits_from_the_top():
    curve = precision_curve(np.array([3.0, 1.0, 2.0, 2.0]), np.array([True, False, True, False]), injected=4)
    assert curve["threshold"].tolist() == [3.0, 2.0, 1.0]
    assert curve["flags"].tolist() == [1, 3, 4] and curve["hits"].tolist() == [1, 2, 2]
    assert curve["precision"].tolist() == pytest.approx([1.0, 2 / 3, 0.5])
    assert curve["recall"].tolist() == pytest.approx([0.25, 0.5, 0.5])
