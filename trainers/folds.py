"""Person-level stratified folds: one fold file shared by every trial, so all trials compare fairly.

All seven pictures of a person land in the same fold (a person on both sides of a split would leak their
face into validation). Persons are spread with ``StratifiedGroupKFold`` stratified on gender x age band,
the two person-level parts of the class; the mask part is balanced by construction (every person has the
same seven pictures). The fold file is a CSV ``rel_path,person_id,fold``, one row per image.

Optionally a stratified slice of persons is held out of every fold (``holdout``): their rows get fold
``HOLDOUT_FOLD`` (-1), no fold model trains or is selected on them, so the ensemble can score exactly what
it submits (the k-fold vote with TTA) on persons nothing has seen. ``holdout: auto`` sizes that slice for
the figure's precision rather than as a fixed share: ``HOLDOUT_PERSONS`` persons, at most
``HOLDOUT_MAX_SHARE`` of them (``holdout_share``).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from trainers.data_checks import DataError, Problem, read_csv_records
from trainers.io import write_csv_atomic
from trainers.labels import GENDER_NAMES, NUM_AGE, AgeBands, class_names

FOLD_COLUMNS = ("rel_path", "person_id", "fold")
HOLDOUT_FOLD = -1  # the fold value of held-out persons: in no fold's training or validation set
HOLDOUT_AUTO = "auto"  # a holdout sized by persons (holdout_share), not by a fixed share
# Persons an auto holdout holds: on AAF-Mask the 18-class macro F1 of 273 persons has a bootstrap standard
# error of about 0.034, of 546 about 0.025 (BENCHMARKS.md, "How precise is the holdout figure")
HOLDOUT_PERSONS = 500
HOLDOUT_MAX_SHARE = 0.2  # ... but never more than a fifth of the persons out of training
HOLDOUT_WANTED = f"a share of persons from 0 to 0.5 (e.g. 0.1) or {HOLDOUT_AUTO}"  # what a holdout can be


class FoldWarning(UserWarning):
    """The split works but is weaker than asked for (e.g. a stratum with fewer persons than folds)."""


def _stratum_name(stratum: int) -> str:
    return f"{GENDER_NAMES[stratum // NUM_AGE]}/age band {stratum % NUM_AGE}"


def _require_columns(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            Problem("error", what, f"missing column(s) {', '.join(missing)}; expected {', '.join(columns)}")
        )


def _persons(table: pd.DataFrame) -> pd.DataFrame:
    """One row per person (sorted by id, so folds do not depend on the table's row order)."""
    _require_columns(table, ("rel_path", "person_id", "gender", "age_band"), "table")
    if table.empty:
        raise DataError(Problem("error", "table", "no images; read the data first"))
    doubled_images = table["rel_path"][table["rel_path"].duplicated()].tolist()
    if doubled_images:
        raise DataError(Problem("error", "table", f"images listed twice, e.g. {doubled_images[0]}"))
    persons = table.drop_duplicates(["person_id", "gender", "age_band"])
    doubled = persons["person_id"][persons["person_id"].duplicated()].tolist()
    if doubled:
        raise DataError(
            Problem(
                "error",
                "table",
                f"person(s) {', '.join(map(str, doubled[:10]))} have images with different gender or age "
                "band; fix the labels (a relabel overlay applies to the whole person)",
            )
        )
    persons = persons.sort_values("person_id", kind="stable")
    return persons.assign(stratum=persons["gender"].astype(int) * NUM_AGE + persons["age_band"].astype(int))


def holdout_value(value: object) -> float | str | None:
    """A ``holdout`` setting as a space, a command line or a caller gives it: a share from 0 to 0.5, or
    ``HOLDOUT_AUTO``; None when it is neither (the caller says so in its own words)."""
    if value == HOLDOUT_AUTO:
        return HOLDOUT_AUTO
    if isinstance(value, bool):
        return None
    try:
        share = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return share if 0 <= share <= 0.5 else None


def holdout_share(holdout: float | str, persons: int) -> float:
    """The share of ``persons`` to hold out: ``holdout`` itself, or for ``HOLDOUT_AUTO`` the share 1/n
    (the only shares a stratified person split makes exactly) that holds at least ``HOLDOUT_PERSONS``
    persons, at most ``HOLDOUT_MAX_SHARE``: 2,730 persons hold out 1/5 (546), the competition's 4,500
    hold out 1/9 (500), 20,000 hold out 1/40 (500). Why persons, not a share: the holdout figure's error
    depends on how many persons it scores, and every person held out is one the final models miss."""
    if holdout != HOLDOUT_AUTO:
        return float(holdout)
    return 1 / max(round(1 / HOLDOUT_MAX_SHARE), persons // HOLDOUT_PERSONS)


def make_folds(table: pd.DataFrame, k: int, seed: int, holdout: float | str = 0.0) -> pd.DataFrame:
    """Assign every image to one of ``k`` folds by person; columns ``rel_path, person_id, fold``.

    Rows follow the table's order. A stratum with fewer persons than ``k`` gives a FoldWarning, not an
    error; when every stratum is that small the split falls back to unstratified (also a FoldWarning).
    ``holdout`` (a fraction, 0 = none, or ``HOLDOUT_AUTO``: see ``holdout_share``) first sets aside that
    share of persons, stratified the same way, with fold ``HOLDOUT_FOLD``; the folds split the rest.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise DataError(Problem("error", "k", f"k={k!r} folds is not possible; use an integer of at least 2"))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise DataError(Problem("error", "seed", f"seed={seed!r} must be an integer 0..2**32-1"))
    if holdout_value(holdout) is None:
        raise DataError(Problem("error", "holdout", f"holdout={holdout!r} must be {HOLDOUT_WANTED}"))
    persons = _persons(table)
    holdout = holdout_share(holdout, len(persons))
    person_fold = np.full(len(persons), HOLDOUT_FOLD, dtype=np.int64)
    kept = np.arange(len(persons))
    if holdout > 0:
        kept = _split_holdout(persons, holdout, seed)
    if k > len(kept):
        raise DataError(
            Problem(
                "error",
                "k",
                f"k={k} folds but only {len(kept)} person(s)"
                + (" outside the holdout" if holdout > 0 else "")
                + f"; use k <= {len(kept)} or add data",
            )
        )
    person_fold[kept] = _split_persons(persons.iloc[kept], k, seed)
    sizes = np.bincount(np.clip(person_fold[kept], 0, None), minlength=k)
    if (person_fold[kept] < 0).any() or (sizes == 0).any():
        raise DataError(
            Problem("error", "k", f"k={k} left a fold without persons ({sizes.tolist()}); use a smaller k")
        )
    fold_of = dict(zip(persons["person_id"].tolist(), person_fold.tolist(), strict=True))
    folds = pd.DataFrame(
        {
            "rel_path": table["rel_path"].astype(str).to_numpy(),
            "person_id": table["person_id"].astype(str).to_numpy(),
            "fold": [fold_of[p] for p in table["person_id"].tolist()],
        }
    )
    folds["rel_path"] = folds["rel_path"].astype(str)
    folds["person_id"] = folds["person_id"].astype(str)
    folds["fold"] = folds["fold"].astype(np.int64)
    assert_no_leak(folds)
    return folds


def _split_holdout(persons: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Positions of the persons kept for the folds: one stratified, person-level slice of ``fraction``
    (one split of a ``1/fraction``-fold split, so the share must be 1/n: 0.5, 0.25, 0.2, 0.1, ...)."""
    n_splits = max(2, round(1 / fraction))
    if abs(1 / n_splits - fraction) > 0.01:
        raise DataError(
            Problem(
                "error", "holdout", f"holdout={fraction:g}: use a share 1/n of the persons, e.g. 0.1 or 0.2"
            )
        )
    if n_splits > len(persons):
        raise DataError(
            Problem(
                "error",
                "holdout",
                f"holdout={fraction:g} needs at least {n_splits} persons, there are {len(persons)}; use a "
                "larger share or no holdout",
            )
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    strata = persons["stratum"].to_numpy(dtype=np.int64)
    if min(Counter(strata.tolist()).values()) < n_splits:
        strata = np.where(np.isin(strata, _rare(strata, n_splits)), -1, strata)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        kept, _ = next(splitter.split(np.zeros(len(persons)), strata, np.arange(len(persons))))
    return np.sort(kept)


def _rare(strata: np.ndarray, n: int) -> list[int]:
    counts = Counter(strata.tolist())
    return [s for s, c in counts.items() if c < n]


def _split_persons(persons: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Each person's fold, stratified on gender x age band (see ``make_folds`` for the warnings)."""
    strata = persons["stratum"].to_numpy(dtype=np.int64)
    counts = Counter(strata.tolist())
    small = sorted(s for s, n in counts.items() if n < k)
    names = ", ".join(f"{_stratum_name(s)} ({counts[s]} person(s))" for s in small)
    if small and len(small) == len(counts):
        warnings.warn(
            f"every gender x age band stratum has fewer persons than k={k} ({names}); "
            "the folds are not stratified, only grouped by person",
            FoldWarning,
            stacklevel=3,
        )
        strata = np.zeros_like(strata)
    elif small:
        warnings.warn(
            f"stratum/strata {names} have fewer persons than k={k}; some folds will have none of them",
            FoldWarning,
            stacklevel=3,
        )
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    person_fold = np.full(len(persons), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        groups = np.arange(len(persons))
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(persons)), strata, groups)):
            person_fold[held_out] = fold
    return person_fold


def fold_count(folds: pd.DataFrame) -> int:
    """k: the number of folds, not counting held-out persons."""
    return int(folds.loc[folds["fold"] != HOLDOUT_FOLD, "fold"].nunique())


def assert_no_leak(folds: pd.DataFrame) -> None:
    """Refuse a split that puts one person (or one image) in more than one fold."""
    _require_columns(folds, FOLD_COLUMNS, "folds")
    per_person = folds.groupby("person_id", sort=True)["fold"].nunique()
    leaking = per_person[per_person > 1].index.tolist()
    problems = []
    if leaking:
        shown = ", ".join(map(str, leaking[:10])) + (
            f" and {len(leaking) - 10} more" if len(leaking) > 10 else ""
        )
        problems.append(
            Problem(
                "error",
                "folds",
                f"{len(leaking)} person(s) are in more than one fold: {shown}; "
                "a person's images must share one fold; rebuild the folds with `foldtune folds`",
            )
        )
    doubled = folds["rel_path"][folds["rel_path"].duplicated()].tolist()
    if doubled:
        problems.append(
            Problem(
                "error",
                "folds",
                f"{len(doubled)} image(s) listed twice, e.g. {doubled[0]}; rebuild the folds",
            )
        )
    if problems:
        raise DataError(problems)


def write_folds(folds: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write the fold file atomically (temp file in the same folder, then rename); returns the path."""
    assert_no_leak(folds)
    write_csv_atomic(folds.loc[:, list(FOLD_COLUMNS)], path)
    return Path(path)


def read_folds(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a fold file; any bad row, missing column or leak is a DataError naming it."""
    path = Path(path)
    problems: list[Problem] = []
    records = read_csv_records(path, str(path), FOLD_COLUMNS, problems)
    if records is None:
        raise DataError(problems)
    for line, record in records:
        where = f"{path} line {line}"
        if not record["rel_path"] or not record["person_id"]:
            problems.append(Problem("error", where, "rel_path and person_id must not be empty"))
        if not (record["fold"].isdigit() or record["fold"] == str(HOLDOUT_FOLD)):
            problems.append(
                Problem(
                    "error",
                    where,
                    f"fold {record['fold']!r} is not a whole number >= 0 (or {HOLDOUT_FOLD}: held out); "
                    "rebuild the folds",
                )
            )
    if not records:
        problems.append(Problem("error", str(path), "has no rows; rebuild the folds with `foldtune folds`"))
    if problems:
        raise DataError(problems)
    folds = pd.DataFrame(
        {
            "rel_path": pd.Series([r["rel_path"] for _, r in records], dtype=str),
            "person_id": pd.Series([r["person_id"] for _, r in records], dtype=str),
            "fold": np.array([int(r["fold"]) for _, r in records], dtype=np.int64),
        }
    )
    present = sorted(set(folds["fold"].tolist()) - {HOLDOUT_FOLD})
    if present != list(range(len(present))) or len(present) < 2:
        raise DataError(
            Problem(
                "error",
                str(path),
                f"folds {present} are not 0..k-1 with k >= 2; rebuild the folds with `foldtune folds`",
            )
        )
    try:
        assert_no_leak(folds)
    except DataError as exc:
        raise DataError([Problem(p.severity, f"{path}", p.message) for p in exc.problems]) from None
    return folds


def fold_summary(folds: pd.DataFrame, table: pd.DataFrame, age_bands: AgeBands = AgeBands()) -> str:
    """Per fold: persons, images and class balance, so a lopsided split is seen before training."""
    _require_columns(folds, FOLD_COLUMNS, "folds")
    _require_columns(table, ("rel_path", "label"), "table")
    merged = folds.merge(table[["rel_path", "label"]], on="rel_path", how="outer", indicator=True)
    only_folds = merged.loc[merged["_merge"] == "left_only", "rel_path"].tolist()
    only_table = merged.loc[merged["_merge"] == "right_only", "rel_path"].tolist()
    if only_folds or only_table:
        raise DataError(
            Problem(
                "error",
                "folds",
                f"the fold file does not match the data ({len(only_folds)} image(s) only in the folds, "
                f"e.g. {only_folds[:1]}; {len(only_table)} only in the data, e.g. {only_table[:1]}); "
                "rebuild the folds with `foldtune folds`",
            )
        )
    merged["label"] = merged["label"].astype(int)
    merged["fold"] = merged["fold"].astype(int)
    held_out = merged[merged["fold"] == HOLDOUT_FOLD]
    merged = merged[merged["fold"] != HOLDOUT_FOLD]
    k = int(merged["fold"].max()) + 1
    header = f"{'':<26}" + "".join(f"{f'fold {f}':>14}" for f in range(k))
    lines = [
        f"{k} folds, {merged['person_id'].nunique()} persons, {len(merged)} images",
        header,
        f"{'persons':<26}"
        + "".join(f"{merged.loc[merged['fold'] == f, 'person_id'].nunique():>14}" for f in range(k)),
        f"{'images':<26}" + "".join(f"{int((merged['fold'] == f).sum()):>14}" for f in range(k)),
    ]
    counts = merged.groupby(["label", "fold"]).size()
    fold_sizes = merged.groupby("fold").size()
    for label, name in enumerate(class_names(age_bands)):
        cells = []
        for f in range(k):
            count = int(counts.get((label, f), 0))
            cells.append(f"{count:>6} {count / max(int(fold_sizes.get(f, 0)), 1):>6.1%}")
        lines.append(f"{label:>2} {name:<23}" + "".join(f"{c:>14}" for c in cells))
    folds_with = Counter(label for label, _ in counts.index.tolist())
    thin = [name for label, name in enumerate(class_names(age_bands)) if 0 < folds_with[label] < k]
    if thin:
        lines.append(f"note: class(es) missing from some folds: {', '.join(thin)}")
    if len(held_out):
        lines.append(
            f"held out of every fold: {held_out['person_id'].nunique()} persons, {len(held_out)} images "
            "(scored by the ensemble only)"
        )
    return "\n".join(lines)
