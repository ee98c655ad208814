"""trainers.folds: person-level stratified folds that never leak, are reproducible and read back safely."""

from __future__ import annotations

import warnings
from collections import Counter

import pandas as pd
import pytest

from trainers.data import DataError, read_train
from trainers.folds import (
    HOLDOUT_AUTO,
    HOLDOUT_FOLD,
    FoldWarning,
    assert_no_leak,
    fold_summary,
    holdout_share,
    make_folds,
    read_folds,
    write_folds,
)
from trainers.labels import class_names


@pytest.fixture(scope="module")
def table60(tmp_path_factory, dataset_builder) -> pd.DataFrame:
    """60 persons, 10 in each gender x age band stratum, read from real files."""
    dataset = dataset_builder(tmp_path_factory.mktemp("data60"), n_persons=60, n_eval=0)
    return read_train(dataset.root, check_images=False).table


def strata_per_fold(folds: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    persons = table.drop_duplicates("person_id").set_index("person_id")
    person_folds = folds.drop_duplicates("person_id").set_index("person_id")["fold"]
    stratum = persons["gender"] * 3 + persons["age_band"]
    return pd.crosstab(stratum, person_folds.reindex(stratum.index))


@pytest.mark.parametrize("k", [3, 5])
def test_folds_balance_every_stratum(table60, k):
    for seed in (0, 1, 2):
        counts = strata_per_fold(make_folds(table60, k=k, seed=seed), table60)
        shares = counts.div(counts.sum(axis=1), axis=0)
        assert counts.shape == (6, k)
        # 10 persons per stratum: each fold holds 10 // k or 10 // k + 1 of them
        assert (shares - 1 / k).abs().to_numpy().max() <= 1 / 10 + 1e-9, counts
        assert counts.to_numpy().min() >= 10 // k


def test_folds_are_one_row_per_image_and_never_leak(table60):
    for seed in range(5):
        folds = make_folds(table60, k=5, seed=seed)
        assert list(folds.columns) == ["rel_path", "person_id", "fold"]
        assert folds["rel_path"].tolist() == table60["rel_path"].tolist()
        assert (folds.groupby("person_id")["fold"].nunique() == 1).all()
        assert sorted(folds["fold"].unique().tolist()) == [0, 1, 2, 3, 4]
        per_fold_persons = folds.drop_duplicates("person_id")["fold"].value_counts()
        assert per_fold_persons.tolist() == [12] * 5
        assert folds["person_id"].tolist()[:7] == ["000001"] * 7  # ids stay strings


def test_same_seed_gives_a_byte_identical_fold_file(table60, tmp_path):
    first = write_folds(make_folds(table60, k=5, seed=7), tmp_path / "a" / "folds.csv")
    second = write_folds(make_folds(table60.copy(), k=5, seed=7), tmp_path / "b" / "folds.csv")
    assert first.read_bytes() == second.read_bytes()
    lines = first.read_text().splitlines()
    assert len(lines) == 421 and lines[0] == "rel_path,person_id,fold"
    assert lines[1].startswith(f"train/images/{table60['person_dir'].iloc[0]}/mask1.jpg,000001,")


def test_table_row_order_does_not_change_the_folds(table60):
    shuffled = table60.sample(frac=1.0, random_state=3).reset_index(drop=True)
    reference = make_folds(table60, k=5, seed=7).set_index("rel_path")["fold"]
    from_shuffled = make_folds(shuffled, k=5, seed=7)
    assert from_shuffled["rel_path"].tolist() == shuffled["rel_path"].tolist()  # rows follow the table
    assert from_shuffled.set_index("rel_path")["fold"].sort_index().equals(reference.sort_index())


def test_different_seeds_give_different_folds(table60):
    assignments = {tuple(make_folds(table60, k=5, seed=seed)["fold"]) for seed in range(4)}
    assert len(assignments) == 4


def test_assert_no_leak_refuses_a_person_on_both_sides():
    folds = pd.DataFrame(
        {
            "rel_path": ["a/mask1.jpg", "a/normal.jpg", "b/mask1.jpg", "b/normal.jpg"],
            "person_id": ["000001", "000001", "000002", "000002"],
            "fold": [0, 1, 1, 1],
        }
    )
    with pytest.raises(DataError, match=r"1 person\(s\) are in more than one fold: 000001"):
        assert_no_leak(folds)
    with pytest.raises(DataError):
        write_folds(folds, "/nonexistent-never-written/folds.csv")
    folds.loc[0, "fold"] = 1
    assert_no_leak(folds)  # now fine
    doubled = pd.concat([folds, folds.iloc[[2]]])
    with pytest.raises(DataError, match="listed twice, e.g. b/mask1.jpg"):
        assert_no_leak(doubled)


def test_write_and_read_folds_round_trip(table60, tmp_path):
    folds = make_folds(table60, k=4, seed=0)
    path = tmp_path / "folds.csv"
    path.write_text("old content")
    assert write_folds(folds, path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["folds.csv"]  # no temp file left behind
    back = read_folds(path)
    pd.testing.assert_frame_equal(back, folds)
    assert back["person_id"].iloc[0] == "000001"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("rel_path,fold\na.jpg,0\n", r"line 1: missing column\(s\) person_id"),
        (
            "rel_path,person_id,fold\na.jpg,000001,x\nb.jpg,000002,1\n",
            r"line 2: fold 'x' is not a whole number",
        ),
        ("rel_path,person_id,fold\na.jpg,000001,-2\nb.jpg,000002,1\n", r"line 2: fold '-2'"),
        (
            "rel_path,person_id,fold\n,000001,0\nb.jpg,000002,1\n",
            r"line 2: rel_path and person_id must not be empty",
        ),
        ("rel_path,person_id,fold\na.jpg,000001,0\nb.jpg,000001,1\n", r"in more than one fold: 000001"),
        ("rel_path,person_id,fold\na.jpg,000001,0\nb.jpg,000002,2\n", r"folds \[0, 2\] are not 0..k-1"),
        ("rel_path,person_id,fold\n", "has no rows"),
    ],
)
def test_read_folds_names_the_problem(tmp_path, content, expected):
    path = tmp_path / "folds.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=expected) as caught:
        read_folds(path)
    assert str(path) in str(caught.value)


def test_read_folds_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_folds(tmp_path / "folds.csv")


@pytest.mark.parametrize("k", [1, 0, -2, 2.5, True])
def test_k_below_two_is_refused(table60, k):
    with pytest.raises(DataError, match="use an integer of at least 2"):
        make_folds(table60, k=k, seed=0)


@pytest.mark.parametrize("seed", [None, -1, 2**32, 1.5])
def test_seed_must_be_a_fixed_integer(table60, seed):
    with pytest.raises(DataError, match=r"must be an integer 0..2\*\*32-1"):
        make_folds(table60, k=5, seed=seed)


def test_k_above_the_number_of_persons_is_refused(make_dataset):
    table = read_train(make_dataset(n_persons=4).root).table
    with pytest.raises(DataError, match=r"k=5 folds but only 4 person\(s\); use k <= 4"):
        make_folds(table, k=5, seed=0)
    with pytest.warns(FoldWarning, match="not stratified"):
        folds = make_folds(table, k=4, seed=0)  # one person per fold still works
    assert folds.drop_duplicates("person_id")["fold"].value_counts().tolist() == [1, 1, 1, 1]


def test_small_stratum_warns_but_splits(make_dataset):
    # 12 persons: 11 young men and one old woman, who cannot be in every one of 3 folds
    genders = ["male"] * 11 + ["female"]
    ages = [20 + i for i in range(11)] + [70]
    table = read_train(make_dataset(n_persons=12, genders=genders, ages=ages, n_eval=0).root).table
    with pytest.warns(FoldWarning, match=r"female/age band 2 \(1 person\(s\)\) have fewer persons than k=3"):
        folds = make_folds(table, k=3, seed=0)
    assert sorted(folds["fold"].unique().tolist()) == [0, 1, 2]
    assert_no_leak(folds)


def test_every_stratum_too_small_falls_back_to_grouped_folds(tiny_dataset):
    table = read_train(tiny_dataset.root).table  # six persons, one per stratum
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folds = make_folds(table, k=3, seed=0)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "the folds are not stratified" in messages[0]  # sklearn's own is hidden
    assert Counter(folds.drop_duplicates("person_id")["fold"]) == {0: 2, 1: 2, 2: 2}


def test_fold_summary_shows_persons_images_and_classes(table60):
    folds = make_folds(table60, k=3, seed=0)
    text = fold_summary(folds, table60)
    lines = text.splitlines()
    assert lines[0] == "3 folds, 60 persons, 420 images"
    assert lines[2].split() == ["persons", "20", "20", "20"]
    assert lines[3].split() == ["images", "140", "140", "140"]
    for name in class_names():
        assert name in text
    wear_male_young = next(line for line in lines if "wear/male/<30" in line and "incorrect" not in line)
    counts = [int(v) for v in wear_male_young.split()[2::2]]
    assert sum(counts) == 10 * 5 and min(counts) > 0


def test_fold_summary_notes_classes_missing_from_a_fold(tiny_dataset):
    table = read_train(tiny_dataset.root).table
    with pytest.warns(FoldWarning):
        folds = make_folds(table, k=3, seed=0)
    assert "note: class(es) missing from some folds" in fold_summary(folds, table)


def test_fold_summary_refuses_folds_of_other_data(table60):
    folds = make_folds(table60, k=3, seed=0)
    with pytest.raises(DataError, match=r"does not match the data \(0 image\(s\) only in the folds"):
        fold_summary(folds.iloc[7:], table60)


def test_person_with_inconsistent_labels_is_refused(table60):
    broken = table60.copy()
    broken.loc[0, "gender"] = 1 - broken.loc[0, "gender"]
    with pytest.raises(DataError, match="have images with different gender or age band"):
        make_folds(broken, k=3, seed=0)


def test_folds_depend_only_on_the_person_strata_not_the_images(table60):
    """Relabelling one image's mask must not move anyone: folds are a person-level decision."""
    relabelled = table60.copy()
    relabelled.loc[relabelled["stem"] == "normal", "mask"] = 1
    assert make_folds(relabelled, k=5, seed=3).equals(make_folds(table60, k=5, seed=3))


@pytest.mark.parametrize(
    ("persons", "share", "held"),
    [(2730, 1 / 5, 546), (4500, 1 / 9, 500), (20000, 1 / 40, 500), (200, 1 / 5, 40), (60, 1 / 5, 12)],
)
def test_an_auto_holdout_holds_enough_persons_for_its_figure_and_at_most_a_fifth(persons, share, held):
    assert holdout_share(HOLDOUT_AUTO, persons) == pytest.approx(share)
    assert round(persons * holdout_share(HOLDOUT_AUTO, persons)) == held
    assert holdout_share(0.1, persons) == 0.1  # a share is kept as given


def test_make_folds_with_an_auto_holdout_sets_aside_a_stratified_fifth_of_few_persons(table60):
    folds = make_folds(table60, k=3, seed=0, holdout=HOLDOUT_AUTO)
    held = folds.loc[folds["fold"] == HOLDOUT_FOLD, "person_id"].unique()
    assert len(held) == 12  # 60 persons < 5 x 500: the largest share, 1/5
    assert folds.equals(make_folds(table60, k=3, seed=0, holdout=0.2))  # the same split as the share
    with pytest.raises(
        DataError, match=r"holdout='most' must be a share of persons from 0 to 0.5 \(e.g. 0.1\) or auto"
    ):
        make_folds(table60, k=3, seed=0, holdout="most")
