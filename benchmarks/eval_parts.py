"""Is one eval set a hard sample of persons? A submission scored on two parts of AAF-Mask's eval persons.

    python ../shared/tools/aafmask.py ../shared/datasets/aaf-base /tmp/aaf40 --eval-frac 0.40
    python -m benchmarks.eval_parts --base ../shared/datasets/aaf-base --data /tmp/aaf40 SUBMISSION [...]

aafmask puts a person in eval when ``sha256(person id) mod 10,000 < eval_frac * 10,000``, so a build with
``--eval-frac 0.40`` keeps the default build's eval persons (``first``: the 870 of ``--eval-frac 0.25``)
and moves about 510 more out of train (``moved``). A search on that build trained on neither part, and the
holdout persons it draws from its training pool are drawn from the same persons as ``moved`` were. So when
the holdout figure reads above ``first`` but not above ``moved``, ``first`` is a hard sample, not the
estimate biased; when it reads above both, the estimate is. Each part's macro F1 (the competition's) comes
with a 95% interval from 1,000 seeded person resamples (``estimates.resampled_f1``, as the ensemble's).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from orchestrator.ensemble.estimates import resampled_f1
from orchestrator.ensemble.selection import macro_f1
from trainers.labels import MASK_STEMS, NUM_CLASSES

PICTURES = tuple(MASK_STEMS)  # the seven pictures of a person, as aafmask names them
FIRST_FRAC = 0.25  # aafmask's default --eval-frac
DRAWS = 1000


def person_of_images(
    people_csv: Path, first_frac: float = FIRST_FRAC
) -> tuple[dict[str, str], dict[str, str]]:
    """({eval image id: person id}, {person id: 'first' or 'moved'}) for every person of aafmask's base
    ``people.csv``, from aafmask's own hashes (its image ids are sha1 of ``person/picture``)."""
    image_person, part = {}, {}
    with open(people_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            person = f"{int(row['serial']):06d}"
            bucket = int(hashlib.sha256(person.encode()).hexdigest(), 16) % 10000
            part[person] = "first" if bucket < first_frac * 10000 else "moved"
            for picture in PICTURES:
                image_person[hashlib.sha1(f"{person}/{picture}".encode()).hexdigest() + ".jpg"] = person
    return image_person, part


def score_parts(submission: Path, answers: Path, image_person: dict, part: dict) -> dict[str, dict]:
    """Each part's (and all eval's) persons, macro F1 and 95% person-resample interval."""
    truth = _classes(answers)
    predicted = _classes(submission)
    missing = sorted(set(truth) - set(predicted))
    if missing:
        raise SystemExit(f"error: {submission} has no row for {len(missing)} eval images, e.g. {missing[0]}")
    scores = {}
    for name in ("first", "moved", "all"):
        ids = [i for i in truth if name == "all" or part[image_person[i]] == name]
        labels = np.array([truth[i] for i in ids])
        probs = np.eye(NUM_CLASSES)[[predicted[i] for i in ids]]
        person = np.array([image_person[i] for i in ids])
        draws = resampled_f1(labels, probs, person, DRAWS, 0) or [float("nan")]
        low, high = np.percentile(draws, [2.5, 97.5])
        scores[name] = {
            "persons": len(set(person)),
            "f1": macro_f1(labels, probs),
            "interval": [float(low), float(high)],
        }
    return scores


def _classes(path: Path) -> dict[str, int]:
    with open(path, newline="") as handle:
        return {row["ImageID"]: int(row["ans"]) for row in csv.DictReader(handle)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("submissions", nargs="+", type=Path)
    parser.add_argument("--base", required=True, type=Path, help="aafmask's base folder (people.csv)")
    parser.add_argument("--data", required=True, type=Path, help="the build with the larger --eval-frac")
    # each submission's figures are also written beside it, as eval_parts.json
    args = parser.parse_args(argv)
    image_person, part = person_of_images(args.base / "people.csv")
    answers = args.data / "eval" / "answers.csv"
    for submission in args.submissions:
        scores = score_parts(submission, answers, image_person, part)
        for name, figure in scores.items():
            low, high = figure["interval"]
            print(
                f"{submission}  {name:5s} {figure['persons']:4d} persons  macro F1 {figure['f1']:.4f}  "
                f"[{low:.3f}, {high:.3f}]"
            )
        submission.with_name("eval_parts.json").write_text(json.dumps(scores, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
