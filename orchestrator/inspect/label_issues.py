"""Likely label errors, found from out-of-fold probabilities with confident learning (cleanlab).

Each label is judged at the level it lives at, because that is where a fix is made and where the evidence
adds up:

- gender and age band belong to a PERSON (one row of train.csv): the 18-class probabilities of each image
  are marginalised to the task (2 genders, 3 bands), then combined over the person's 7 images as the mean
  of their log-probabilities, renormalised (a normalised geometric mean). Why not the mean probability:
  evidence adds in log space, so one clear, unmasked face saying "female, 0.99" outweighs five masked
  pictures weakly saying "male, 0.6", as a human reviewer would judge; the mean probability lets the
  masked pictures out-vote it. Why the mean and not the sum: the 7 photos of one session are far from
  independent, and the mean keeps a person's probabilities on the scale of one image, where cleanlab's
  per-class thresholds are meaningful. Each log-probability is floored at ``PROB_FLOOR`` so one
  over-confident image cannot decide alone.
- the mask state belongs to an IMAGE (3 states from its file name).
- the classic error of this data set, a person's ``incorrect_mask`` and ``normal`` files swapped, has its
  own check: the likelihood of the person's two pictures as given against swapped, from their mask-state
  probabilities; the log-likelihood ratio is the score, flagged from ``SWAP_MIN_RATIO`` on.

cleanlab's ``find_label_issues`` makes the default cut (``flagged``) and ``get_label_quality_scores`` the
label quality (normalised margin; low = suspect). Every row also carries ``score``: the log-likelihood
ratio (nats) of the suggested label over the given one, a number comparable across the four kinds, used
to rank. Rows below the cut with a positive score are kept, unflagged, for top-K views (benchmarks).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd

from trainers.labels import GENDER_NAMES, MASK_NAMES, NUM_AGE, NUM_GENDER, NUM_MASK, AgeBands, decode

PROB_FLOOR = 1e-4  # no single probability counts as less than this (bounds one over-confident image)
SWAP_MIN_RATIO = 10.0  # the swapped assignment must be at least this many times as likely to be flagged
SWAP_STEMS = ("incorrect_mask", "normal")
MAX_AGE = 120
KINDS = ("gender", "age", "mask", "mask_swap")
ISSUE_COLUMNS = (
    "id",
    "image",
    "field",
    "given",
    "suggested",
    "confidence",
    "score",
    "kind",
    "flagged",
    "quality",
    "fix",
)
TASK_SIZES = {"mask": NUM_MASK, "gender": NUM_GENDER, "age": NUM_AGE}


def task_marginals(probs: np.ndarray) -> dict[str, np.ndarray]:
    """The 18-class probabilities summed per task: mask (N, 3), gender (N, 2), age band (N, 3)."""
    probs = np.asarray(probs, dtype=np.float64)
    factors = dict(zip(("mask", "gender", "age"), decode(np.arange(probs.shape[1])), strict=True))
    return {
        task: np.stack([probs[:, factors[task] == j].sum(axis=1) for j in range(size)], axis=1)
        for task, size in TASK_SIZES.items()
    }


def _log(probs: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probs, PROB_FLOOR, 1.0))


def person_probs(image_probs: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(group keys sorted, (G, K) probabilities): per group, the mean of the images' floored
    log-probabilities, renormalised (a normalised geometric mean; see the module's docstring for why)."""
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.zeros((len(keys), image_probs.shape[1]))
    np.add.at(sums, inverse, _log(image_probs))
    mean = sums / np.bincount(inverse, minlength=len(keys))[:, None]
    mean -= mean.max(axis=1, keepdims=True)
    combined = np.exp(mean)
    return keys, combined / combined.sum(axis=1, keepdims=True)


def confident_issues(labels: np.ndarray, pred_probs: np.ndarray) -> dict[str, np.ndarray]:
    """cleanlab on one task: ``flagged`` (find_label_issues), ``quality`` (label quality, normalised
    margin), ``suggested`` (the most likely other label), ``confidence`` (its probability) and ``score``
    (log p(suggested) - log p(given))."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    with warnings.catch_warnings():  # "too few examples in class k": expected for small data sets
        warnings.simplefilter("ignore")
        if len(np.unique(labels)) > 1:
            flagged = find_label_issues(labels, pred_probs, n_jobs=1)
        else:  # one class given: no per-class thresholds to learn, nothing flagged (still ranked)
            flagged = np.zeros(len(labels), dtype=bool)
        quality = get_label_quality_scores(labels, pred_probs, method="normalized_margin")
    rows = np.arange(len(labels))
    others = pred_probs.copy()
    others[rows, labels] = -1.0
    suggested = others.argmax(axis=1)
    confidence = pred_probs[rows, suggested]
    score = _log(confidence) - _log(pred_probs[rows, labels])
    return {
        "flagged": np.asarray(flagged, dtype=bool),
        "quality": np.asarray(quality, dtype=np.float64),
        "suggested": suggested,
        "confidence": confidence,
        "score": score,
    }


def swap_log_ratio(probs_a: np.ndarray, given_a: int, probs_b: np.ndarray, given_b: int) -> float:
    """log [p_a(given_b) p_b(given_a)] - log [p_a(given_a) p_b(given_b)]: how much likelier images a and b
    are with their mask states swapped than as given."""
    return float(
        _log(probs_a[given_b]) + _log(probs_b[given_a]) - _log(probs_a[given_a]) - _log(probs_b[given_b])
    )


def nearest_age_in_band(age: int, band: int, bands: AgeBands) -> int:
    """The age in ``band`` closest to ``age``: the smallest change that moves the person into it."""
    low, high = bands.edges
    lowest, highest = ((0, low - 1), (low, high - 1), (high, MAX_AGE))[band]
    return int(min(max(age, lowest), highest))


def _person_rows(table: pd.DataFrame, marginals: dict, bands: AgeBands) -> list[dict]:
    """Gender and age band per person: images combined, then cleanlab over the persons."""
    persons = table.drop_duplicates("person_id").set_index("person_id")
    rows = []
    for task in ("gender", "age"):
        keys, probs = person_probs(marginals[task], table["person_id"].to_numpy())
        column = "gender" if task == "gender" else "age_band"
        given = persons.loc[keys, column].to_numpy(dtype=np.int64)
        found = confident_issues(given, probs)
        for i, person_id in enumerate(keys.tolist()):
            if not (found["flagged"][i] or found["score"][i] > 0):
                continue
            suggested = int(found["suggested"][i])
            if task == "gender":
                given_text, suggested_text = GENDER_NAMES[given[i]], GENDER_NAMES[suggested]
                fix = suggested_text
            else:
                age = int(persons.loc[person_id, "age"])
                given_text, suggested_text = f"{bands.names[given[i]]} (age {age})", bands.names[suggested]
                fix = str(nearest_age_in_band(age, suggested, bands))
            rows.append(_row(person_id, "", task, given_text, suggested_text, found, i, fix=fix))
    return rows


def _row(
    person_id: str, image: str, kind: str, given: str, suggested: str, found: dict, i: int, fix: str
) -> dict:
    """One finding as a row of ``ISSUE_COLUMNS`` (``found``: a task's arrays, ``i``: its index there)."""
    return {
        "id": str(person_id),
        "image": image,
        "field": kind,
        "given": given,
        "suggested": suggested,
        "confidence": float(found["confidence"][i]),
        "score": float(found["score"][i]),
        "kind": kind,
        "flagged": bool(found["flagged"][i]),
        "quality": float(found["quality"][i]),
        "fix": fix,
    }


def _swap_rows(table: pd.DataFrame, mask_probs: np.ndarray) -> tuple[list[dict], set[tuple[str, str]]]:
    """The incorrect_mask <-> normal check per person; returns its rows and the (person, stem) images a
    flagged swap explains (their image-level mask rows are left out: one finding, one row)."""
    rows, explained = [], set()
    threshold = math.log(SWAP_MIN_RATIO)
    pairs = table[table["stem"].isin(SWAP_STEMS)]
    for person_id, images in pairs.groupby("person_id", sort=True):
        if len(images) != 2:
            continue
        (a, row_a), (b, row_b) = images.sort_values("stem").iterrows()  # incorrect_mask, normal
        given_a, given_b = int(row_a["mask"]), int(row_b["mask"])
        if given_a == given_b:
            continue
        score = swap_log_ratio(mask_probs[a], given_a, mask_probs[b], given_b)
        if score <= 0:
            continue
        flagged = score >= threshold
        if flagged:
            explained.update({(person_id, row_a["stem"]), (person_id, row_b["stem"])})
        stem_a, stem_b = row_a["stem"], row_b["stem"]
        found = {
            "flagged": [flagged],
            "quality": [1.0 / (1.0 + math.exp(score))],  # P(as given | given or swapped)
            "confidence": [1.0 / (1.0 + math.exp(-score))],  # P(swapped | given or swapped)
            "score": [score],
        }
        rows.append(
            _row(
                person_id,
                "",
                "mask_swap",
                f"{stem_a}: {MASK_NAMES[given_a]}, {stem_b}: {MASK_NAMES[given_b]}",
                f"{stem_a}: {MASK_NAMES[given_b]}, {stem_b}: {MASK_NAMES[given_a]}",
                found,
                0,
                fix=f"{stem_a}<->{stem_b}",
            )
        )
    return rows, explained


def _mask_partner(table: pd.DataFrame, mask_probs: np.ndarray, index: int, suggested: int) -> str:
    """The overlay form of an image-level mask fix: a swap with the person's image given ``suggested``
    that makes the pair at least ``SWAP_MIN_RATIO`` times likelier, or '' (no overlay form: the overlay
    only swaps two images of one person). The partner must itself look like this image's given state: a
    picture that is merely odd (the model confidently wrong on it) has no partner that wants to swap."""
    row = table.loc[index]
    given = int(row["mask"])
    same = table[(table["person_id"] == row["person_id"]) & (table["mask"] == suggested)]
    best, partner = math.log(SWAP_MIN_RATIO), ""
    for other, other_row in same.iterrows():
        if not _log(mask_probs[other][given]) > _log(mask_probs[other][suggested]):
            continue
        ratio = swap_log_ratio(mask_probs[index], given, mask_probs[other], suggested)
        if ratio >= best:
            best, partner = ratio, str(other_row["stem"])
    return f"{row['stem']}<->{partner}" if partner else ""


def _mask_rows(table: pd.DataFrame, mask_probs: np.ndarray, explained: set[tuple[str, str]]) -> list[dict]:
    """The mask state per image, except images a flagged swap already explains."""
    given = table["mask"].to_numpy(dtype=np.int64)
    found = confident_issues(given, mask_probs)
    rows = []
    for i in range(len(table)):
        person_id, stem = table.at[i, "person_id"], table.at[i, "stem"]
        if (person_id, stem) in explained or not (found["flagged"][i] or found["score"][i] > 0):
            continue
        suggested = int(found["suggested"][i])
        fix = _mask_partner(table, mask_probs, i, suggested) if found["flagged"][i] else ""
        rows.append(
            _row(
                person_id,
                table.at[i, "rel_path"],
                "mask",
                MASK_NAMES[given[i]],
                MASK_NAMES[suggested],
                found,
                i,
                fix=fix,
            )
        )
    return rows


def person_findings(table: pd.DataFrame, probs: np.ndarray, bands: AgeBands) -> pd.DataFrame:
    """The person-level findings alone (gender, age band, ``incorrect_mask`` <-> ``normal`` swaps), as
    ``find_issues`` makes them: what ``inspect.judge`` measures the judge on, many times over."""
    table = table.reset_index(drop=True)
    marginals = task_marginals(probs)
    swaps, _ = _swap_rows(table, marginals["mask"])
    return pd.DataFrame(_person_rows(table, marginals, bands) + swaps, columns=list(ISSUE_COLUMNS))


def find_issues(table: pd.DataFrame, probs: np.ndarray, bands: AgeBands) -> pd.DataFrame:
    """Every suspect label, ranked: flagged rows (the default cut) first, then by ``score``, descending.

    ``table`` is the training table (trainers.data) in the row order of ``probs`` (N, 18), the OOF
    probabilities. Columns: ``ISSUE_COLUMNS``; ``fix`` is the overlay value the relabel draft would write
    ('' when the finding has no overlay form).
    """
    table = table.reset_index(drop=True)
    marginals = task_marginals(probs)
    swaps, explained = _swap_rows(table, marginals["mask"])
    rows = _person_rows(table, marginals, bands) + swaps + _mask_rows(table, marginals["mask"], explained)
    issues = pd.DataFrame(rows, columns=list(ISSUE_COLUMNS))
    issues["kind_order"] = issues["kind"].map({kind: i for i, kind in enumerate(KINDS)})
    issues = issues.sort_values(
        ["flagged", "score", "kind_order", "id", "image"],
        ascending=[False, False, True, True, True],
        kind="mergesort",
    )
    return issues.drop(columns="kind_order").reset_index(drop=True)


def counts_by_kind(issues: pd.DataFrame) -> dict[str, int]:
    """Flagged rows per kind (the default cut), every kind listed."""
    flagged = issues[issues["flagged"].astype(bool)]
    return {kind: int((flagged["kind"] == kind).sum()) for kind in KINDS}
