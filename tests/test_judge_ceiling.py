"""``benchmarks.judge_ceiling``: label-issues measured with a fixed judge on eval persons.

The world: a tiny eval set in the AAF-Mask layout (anonymous sha1 image names, ``answers.csv``), the
builder's ``people.csv``, and judges written as npz files: one that learned every label, and one that is
confidently wrong about the gender of a known set of persons.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import judge_ceiling
from benchmarks.settings import BenchError
from trainers.data import STEM_ORDER
from trainers.labels import AgeBands, encode

PERSONS = 60
WRONG_GENDER = {"000003", "000017", "000029", "000041", "000052", "000058"}  # the judge disputes these


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(data root, people.csv, table of truths in answers order)."""
    root = tmp_path_factory.mktemp("aafmask")
    rng = np.random.default_rng(0)
    people, rows = [], []
    for serial in range(PERSONS):
        person_id = f"{serial:06d}"
        age, gender = int(rng.integers(20, 80)), int(rng.integers(0, 2))
        people.append((f"{person_id}A{age}.jpg", serial, age, ("male", "female")[gender]))
        for stem in STEM_ORDER:
            mask = {"incorrect_mask": 1, "normal": 2}.get(stem, 0)
            image_id = hashlib.sha1(f"{person_id}/{stem}".encode()).hexdigest() + ".jpg"
            label = int(encode(mask, gender, AgeBands().band(age)))
            rows.append((image_id, label, person_id, mask, gender, AgeBands().band(age)))
    truth = pd.DataFrame(rows, columns=["ImageID", "ans", "person_id", "mask", "gender", "band"])
    truth = truth.sample(frac=1.0, random_state=0).reset_index(drop=True)  # answers.csv is shuffled
    (root / "eval").mkdir()
    truth[["ImageID", "ans"]].to_csv(root / "eval" / "answers.csv", index=False)
    people_csv = root / "people.csv"
    pd.DataFrame(people, columns=["file", "serial", "age", "gender"]).to_csv(people_csv, index=False)
    return root, people_csv, truth


def write_judge(path: Path, truth: pd.DataFrame, wrong_gender: set[str]) -> Path:
    """A judge sure of every label, except the gender of ``wrong_gender`` persons (sure of the other)."""
    gender = np.where(truth["person_id"].isin(wrong_gender), 1 - truth["gender"], truth["gender"])
    labels = encode(truth["mask"].to_numpy(), gender, truth["band"].to_numpy())
    probs = softmax(8.0 * np.eye(18)[labels])
    order = np.random.default_rng(1).permutation(len(truth))  # the npz need not be in answers order
    np.savez(
        path, image_id=truth["ImageID"].to_numpy(dtype=str)[order], probs=probs[order].astype(np.float32)
    )
    return path


def test_eval_images_are_grouped_into_their_persons_with_true_labels(world):
    root, people_csv, truth = world
    table = judge_ceiling.eval_table(root, people_csv)
    assert len(table) == 7 * PERSONS and table["person_id"].nunique() == PERSONS
    stems = table.groupby("person_id")["stem"].apply(sorted).tolist()
    assert stems == [sorted(STEM_ORDER)] * PERSONS
    assert (table["rel_path"].to_numpy() == truth["ImageID"].to_numpy()).all()
    assert (table["gender"].to_numpy() == truth["gender"].to_numpy()).all()
    assert (table["age_band"].to_numpy() == truth["band"].to_numpy()).all()


def test_a_judge_that_learned_every_label_finds_exactly_the_injected_errors(world, tmp_path):
    root, people_csv, truth = world
    table = judge_ceiling.eval_table(root, people_csv)
    probs = judge_ceiling.read_probs(write_judge(tmp_path / "j.npz", truth, set()), table["rel_path"])
    assert judge_ceiling.disagreement(table, probs) == {"gender": 0.0, "age": 0.0}
    result = judge_ceiling.measure(table, probs, seeds=3).set_index("kind")
    assert result.loc["gender", "injected"] == 3 and result.loc["mask_swap", "injected"] == 2
    for kind in ("gender", "age", "mask_swap"):
        assert result.loc[kind, "precision"] == 1.0 and result.loc[kind, "recall"] == 1.0, kind


def test_persons_the_judge_gets_wrong_become_false_flags(world, tmp_path):
    root, people_csv, truth = world
    table = judge_ceiling.eval_table(root, people_csv)
    probs = judge_ceiling.read_probs(write_judge(tmp_path / "j.npz", truth, WRONG_GENDER), table["rel_path"])
    assert judge_ceiling.disagreement(table, probs)["gender"] == pytest.approx(len(WRONG_GENDER) / PERSONS)
    noisy, _, injected = judge_ceiling.inject(table, probs, seed=0)
    flipped = set(injected.loc[injected["kind"] == "gender", "id"])
    disputed = WRONG_GENDER - flipped  # a flipped disputed person ends up agreeing with the judge
    result = judge_ceiling.measure(table, probs, seeds=1).set_index("kind")
    hits = len(flipped - WRONG_GENDER)
    assert result.loc["gender", "flagged"] == hits + len(disputed)
    assert result.loc["gender", "precision"] == pytest.approx(hits / (hits + len(disputed)))
    assert (noisy["gender"] != table["gender"]).groupby(noisy["person_id"]).all().sum() == len(flipped)


def test_an_eval_set_from_another_base_is_one_error(world, tmp_path, capsys):
    root, _, _ = world
    other = tmp_path / "people.csv"
    pd.DataFrame([("x.jpg", 999999, 30, "male")], columns=["file", "serial", "age", "gender"]).to_csv(
        other, index=False
    )
    with pytest.raises(BenchError, match="not from"):
        judge_ceiling.eval_table(root, other)
    code = judge_ceiling.main(
        ["--data", str(root), "--people", str(other), "--probs", f"j={tmp_path / 'none.npz'}"]
    )
    assert code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_probabilities_missing_eval_images_are_one_error(world, tmp_path, capsys):
    root, people_csv, truth = world
    path = write_judge(tmp_path / "j.npz", truth.iloc[:-7], set())
    code = judge_ceiling.main(["--data", str(root), "--people", str(people_csv), "--probs", f"j={path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lacks 7 eval image" in err


def test_a_people_table_without_genders_is_one_error(world, tmp_path):
    root, _, _ = world
    broken = tmp_path / "people.csv"
    broken.write_text("file,serial,age\nx.jpg,1,30\n")
    with pytest.raises(BenchError, match="line 2: needs serial, age and gender"):
        judge_ceiling.eval_table(root, broken)
