"""What label-issues can find with a given judge: precision and recall on persons the judge never trained on.

label-issues ranks suspects by how strongly its judge (the OOF probabilities of a search) disagrees with a
label, so every person whose *correct* label the judge disputes is a false flag: the judge bounds the
precision. ``benchmarks.label_noise`` measures the finder and one search's judge together, once. This
holds a judge fixed and measures the finder with it over many seeded injections, on the eval persons: a
model's probabilities for them (it never trained on them, like OOF) and their true labels. Per seed it
injects errors at label_noise's rates into copies of those labels, runs the product's finder
(``orchestrator.inspect.label_issues.find_issues``, exactly what ``foldtune label-issues`` runs) and
scores it with ``label_noise.score``. It also prints the judge's person-level disagreement with the
correct labels, the rate of false flags a perfect finder would still raise.

    python -m benchmarks.judge_ceiling --data /tmp/aaffull --people ../shared/datasets/aaf-base/people.csv \\
        --probs single=/tmp/b14/single/eval_probs.npz --probs search=/tmp/b14/runs/cpu/submission.npz

``--probs NAME=FILE``: an npz with ``image_id`` and ``probs`` (N, 18): an ensemble's ``submission.npz`` or
``benchmarks.single_model``'s ``eval_probs.npz``. Eval images are anonymous; ``--people`` (the AAF-Mask
builder's source table) gives each image's person and picture: the builder names an eval image
sha1("{serial:06d}/{picture}"). AAF-Mask only; not part of the product.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.label_noise import INJECTED_COLUMNS, RATES, SWAP, across_edge, score
from benchmarks.settings import BenchError
from orchestrator.inspect.label_issues import find_issues, person_probs, task_marginals
from trainers.data import STEM_ORDER
from trainers.labels import GENDER_CODES, AgeBands, decode

BANDS = AgeBands()


def eval_table(data: Path, people: Path) -> pd.DataFrame:
    """One row per eval image (``answers.csv`` order): the columns find_issues reads, true labels."""
    answers = pd.read_csv(data / "eval" / "answers.csv", dtype={"ImageID": str})
    if answers.empty or list(answers.columns) != ["ImageID", "ans"]:
        raise BenchError(
            f"{data / 'eval' / 'answers.csv'} is not ImageID,ans rows; pass an AAF-Mask data root"
        )
    owner = {}
    with open(people, newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            try:
                person_id = f"{int(row['serial']):06d}"
                person = (int(row["age"]), GENDER_CODES[row["gender"]])
            except (KeyError, TypeError, ValueError):
                raise BenchError(
                    f"{people} line {line}: needs serial, age and gender (male/female)"
                    "; pass aaf-base/people.csv"
                ) from None
            for stem in STEM_ORDER:
                image_id = hashlib.sha1(f"{person_id}/{stem}".encode()).hexdigest() + ".jpg"
                owner[image_id] = (person_id, stem, *person)
    unknown = sorted(set(answers["ImageID"]) - set(owner))
    if unknown:
        raise BenchError(
            f"{len(unknown)} eval image(s) not from {people} (first {unknown[0]}); wrong --people?"
        )
    person_id, stem, age, gender = zip(*(owner[i] for i in answers["ImageID"]), strict=True)
    mask, gender_label, band = decode(answers["ans"].to_numpy())
    table = pd.DataFrame(
        {"rel_path": answers["ImageID"], "person_id": person_id, "stem": stem, "age": age, "mask": mask}
    )
    table["gender"] = np.asarray(gender_label, dtype=np.int64)
    table["age_band"] = np.asarray(band, dtype=np.int64)
    agrees = (table["gender"].to_numpy() == np.asarray(gender)) & (
        table["age_band"].to_numpy() == BANDS.band(np.asarray(age))
    )
    if not agrees.all():
        raise BenchError(
            "answers.csv and --people disagree on a gender or age band; built from another base?"
        )
    return table


def read_probs(path: Path, image_ids: pd.Series) -> np.ndarray:
    """The (N, 18) probabilities of ``path`` in the order of ``image_ids``."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            ids, probs = stored["image_id"].astype(str), stored["probs"].astype(np.float64)
    except (OSError, KeyError, ValueError) as error:
        raise BenchError(f"{path} cannot be read as image_id + probs ({error})") from None
    if probs.ndim != 2 or probs.shape != (len(ids), 18) or len(set(ids)) != len(ids):
        raise BenchError(f"{path}: needs one row of 18 probabilities per image id, each id once")
    where = pd.Series(np.arange(len(ids)), index=ids)
    missing = set(image_ids) - set(ids)
    if missing:
        raise BenchError(
            f"{path} lacks {len(missing)} eval image(s); pass probabilities for the whole eval set"
        )
    return probs[where.loc[image_ids].to_numpy()]


def disagreement(table: pd.DataFrame, probs: np.ndarray) -> dict[str, float]:
    """Fraction of persons whose correct gender / age band the judge finds less likely than another."""
    marginals = task_marginals(probs)
    persons = table.drop_duplicates("person_id").set_index("person_id")
    rates = {}
    for task, column in (("gender", "gender"), ("age", "age_band")):
        keys, combined = person_probs(marginals[task], table["person_id"].to_numpy())
        rates[task] = float((combined.argmax(axis=1) != persons.loc[keys, column].to_numpy()).mean())
    return rates


def inject(
    table: pd.DataFrame, probs: np.ndarray, seed: int
) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Copies of the labels and probabilities with label_noise's errors for seeded disjoint persons: gender
    flipped, age moved across the nearest edge, and the incorrect_mask/normal pictures swapped (their
    probability rows exchanged, as swapping the files would)."""
    table, probs = table.copy(), probs.copy()
    persons = np.sort(table["person_id"].unique())
    order = np.random.default_rng(seed).permutation(len(persons))
    injected, start = [], 0
    for kind, rate in RATES.items():
        count = max(1, round(rate * len(persons)))
        for person_id in persons[order[start : start + count]]:
            rows = table.index[table["person_id"] == person_id]
            if kind == "gender":
                old = int(table.at[rows[0], "gender"])
                table.loc[rows, "gender"] = 1 - old
                injected.append((person_id, kind, "gender", str(old), str(1 - old)))
            elif kind == "age":
                old = int(table.at[rows[0], "age"])
                table.loc[rows, "age"] = across_edge(old)
                table.loc[rows, "age_band"] = BANDS.band(across_edge(old))
                injected.append((person_id, kind, "age", str(old), str(across_edge(old))))
            else:
                stems = table.loc[rows, "stem"]
                a, b = (rows[(stems == stem).to_numpy()][0] for stem in SWAP)
                probs[[a, b]] = probs[[b, a]]
                injected.append((person_id, kind, "mask_swap", "", "incorrect_mask<->normal"))
        start += count
    return table, probs, pd.DataFrame(injected, columns=list(INJECTED_COLUMNS))


def measure(table: pd.DataFrame, probs: np.ndarray, seeds: int) -> pd.DataFrame:
    """label_noise.score per kind, mean and standard deviation over ``seeds`` injections (a seed whose cut
    flags nothing of a kind has no precision for it and is left out of that mean)."""
    scores = []
    for seed in range(seeds):
        noisy, noisy_probs, injected = inject(table, probs, seed)
        scores.append(score(injected, find_issues(noisy, noisy_probs, BANDS)))
    every = pd.concat(scores)
    columns = ["injected", "flagged", "precision", "recall", "precision_at_k"]
    mean = every.groupby("kind", sort=False)[columns].mean()
    spread = every.groupby("kind", sort=False)[["precision", "recall", "precision_at_k"]].std(ddof=0)
    return mean.join(spread.add_suffix("_sd")).reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.judge_ceiling", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--data", required=True, type=Path, help="an AAF-Mask data root (eval/answers.csv)")
    parser.add_argument(
        "--people", required=True, type=Path, help="the aaf-base people.csv it was built from"
    )
    parser.add_argument("--probs", required=True, action="append", help="NAME=FILE.npz (image_id, probs)")
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        table = eval_table(args.data, args.people)
        print(f"{table['person_id'].nunique()} eval persons, {len(table)} images; {args.seeds} seeds")
        for item in args.probs:
            name, _, path = item.partition("=")
            probs = read_probs(Path(path), table["rel_path"])
            rates = disagreement(table, probs)
            print(
                f"\njudge {name} ({path}): disputes the correct label of "
                f"{rates['gender']:.1%} of persons (gender), {rates['age']:.1%} (age band)"
            )
            result = measure(table, probs, args.seeds)
            print(result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        return 0
    except (BenchError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
