"""How precise is a holdout figure of n persons? The standard error of macro F1 by person bootstrap.

    python -m benchmarks.holdout_precision SEARCH_DIR [SEARCH_DIR ...] [--eval-persons 870]

For each search folder (one that kept holdout persons and ran ``make ensemble``), its holdout persons'
k-fold vote (``holdout_probs.npz``) is scored on persons drawn again with replacement, at half, all and
twice its holdout persons: the spread is the figure's standard error at that size. Then, with the
standard error taken as proportional to 1/sqrt(persons), how often a holdout figure of n persons lands
within +-0.03 of an independent eval figure of ``--eval-persons`` persons (both normal, independent):
the chance the issue's "within 0.03 of eval" has, whatever the estimator, at that holdout size.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

from orchestrator.ensemble.estimates import resampled_f1
from orchestrator.ensemble.selection import macro_f1
from trainers.folds import read_folds

DRAWS = 400
TOLERANCE = 0.03


def bootstrap_se(
    labels: np.ndarray, probs: np.ndarray, person: np.ndarray, persons: int, seed: int = 0
) -> float:
    """Macro F1's standard deviation over ``DRAWS`` draws of ``persons`` persons with replacement
    (``resampled_f1``, which the ensemble's holdout interval is made of)."""
    return float(np.std(resampled_f1(labels, probs, person, DRAWS, seed, persons)))


def within(se_holdout: float, se_eval: float, tolerance: float = TOLERANCE) -> float:
    """P(|holdout - eval| <= tolerance) for two independent normal figures around the same value."""
    return math.erf(tolerance / math.sqrt(2 * (se_holdout**2 + se_eval**2)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("search_dirs", nargs="+", type=Path)
    parser.add_argument("--eval-persons", type=int, default=870)
    args = parser.parse_args(argv)
    print(
        "search | holdout persons | F1 | SE at n/2, n, 2n | P(within 0.03 of eval) at n/2, n, 2n, all-rows*"
    )
    for search_dir in args.search_dirs:
        with np.load(search_dir / "holdout_probs.npz") as saved:
            labels, probs, rel_path = saved["label"], saved["probs"], saved["rel_path"]
        person_of = read_folds(search_dir / "folds.csv").set_index("rel_path")["person_id"]
        person = person_of.loc[rel_path].to_numpy()
        n = len(np.unique(person))
        sizes = (n // 2, n, 2 * n)
        se = [bootstrap_se(labels, probs, person, size) for size in sizes]
        se_at = se[1] * math.sqrt(n)  # SE x sqrt(persons): the constant of the 1/sqrt(n) law
        se_eval = se_at / math.sqrt(args.eval_persons)
        chances = [within(s, se_eval) for s in se] + [within(0.0, se_eval)]
        print(
            f"{search_dir} | {n} | {macro_f1(labels, probs):.4f} | "
            + ", ".join(f"{s:.4f}" for s in se)
            + " | "
            + ", ".join(f"{c:.2f}" for c in chances)
        )
    print("* all-rows: a figure with no error of its own, against eval's (the ceiling of any estimator)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
