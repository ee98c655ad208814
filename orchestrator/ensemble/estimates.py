"""What the ensemble's F1 figures estimate, and which one to trust.

Three figures, each answering a different question:

- **in-sample OOF**: the selected vote's macro F1 on the out-of-fold rows it was selected on. Each row is
  predicted by single fold models (not the k-fold average that is submitted), and the votes were fitted on
  those rows, so it is biased both ways: low for the k-fold vote, high for the selection.
- **nested**: the same selection procedure, scored on rows it did not select on (``selection.
  nested_estimate``): the answer to "does greedy selection generalise, do more models help". It nests the
  ensemble selection only: each trial's best epoch, ``keep_top`` and the search itself saw every fold, so
  it is not free of their optimism; and when selection is repeated on re-predicted OOF (``select_again``)
  it describes the first selection, and says so. Still single fold models, so usually below what the
  k-fold vote scores on new persons.
- **holdout**: when the search kept holdout persons (``holdout:`` in the space, ``--holdout``), the
  submission itself (every member's k fold models, their TTA, refit models if used, the same weights)
  scored on persons no model trained on and no selection looked at. This one describes the submission.

The report labels the holdout figure as the one to trust when there is one, else the nested figure; with
neither (a single fold and no holdout) it trusts none and says what is missing.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.errors import OrchestratorError
from trainers.folds import HOLDOUT_FOLD
from trainers.io import atomic_savez


@dataclass
class Estimates:
    """The ensemble's F1 estimates (see the module docstring)."""

    in_sample_f1: float  # the selected vote's OOF macro F1, on the rows it was selected on
    nested_f1: float | None  # the selection procedure on rows it did not see (None: a single fold)
    nested_fold_f1: list[float] = field(default_factory=list)
    holdout_f1: float | None = None  # the submission's vote on the holdout persons
    holdout_f1_kfold: float | None = None  # the same vote without refit models (when refit models are in)
    holdout_best_single_f1: float | None = None  # the best single trial's k-fold vote (TTA) on the holdout
    holdout_persons: int = 0
    holdout_images: int = 0
    holdout_interval: tuple[float, float] | None = None  # 95% bootstrap interval over holdout persons
    test_persons: int = 0  # the persons of the predicted test set (its images / the holdout's per person)
    test_interval: tuple[float, float] | None = None  # 95% prediction interval for the vote on those persons
    pruned_would_pick: list[str] = field(default_factory=list)  # pruned trials selection would have picked
    selection_repeated: bool = False  # selection ran again on re-predicted OOF after the nested figure

    @property
    def trusted(self) -> str | None:
        """Which figure describes the submission best: "holdout" when there is one, else "nested"; None
        when neither exists (one fold, no holdout): the in-sample figure was selected and scored on the
        same rows, so it is never the one to trust."""
        if self.holdout_f1 is not None:
            return "holdout"
        return "nested" if self.nested_f1 is not None else None

    @property
    def trusted_f1(self) -> float | None:
        return {"holdout": self.holdout_f1, "nested": self.nested_f1}.get(self.trusted or "")

    def lines(self) -> list[str]:
        """The report's estimate block, the trusted figure marked (when there is none: what is missing)."""
        mark = {name: "  <- trust this one" if name == self.trusted else "" for name in self.NAMES}
        if self.trusted is None:
            mark["in_sample"] = (
                "  <- biased, not an estimate: no figure here scores rows the selection did not see (that "
                "needs more than one fold, or holdout persons)"
            )
        lines = [
            f"  in-sample OOF F1 {self.in_sample_f1:.4f}  (selected and scored on the same rows; single fold "
            f"models){mark['in_sample']}"
        ]
        if self.nested_f1 is not None:
            folds = " ".join(f"{f:.3f}" for f in self.nested_fold_f1)
            again = ""
            if self.selection_repeated:
                again = "; it describes the first selection, which was then repeated on re-predicted OOF"
            lines.append(
                f"  nested F1        {self.nested_f1:.4f}  (greedy selection scored on folds it did not "
                f"select on: {folds}; it nests the selection only: each trial's epochs, keep_top and the "
                f"search saw every fold; single fold models{again}){mark['nested']}"
            )
        if self.holdout_f1 is not None:
            refit = ""
            if self.holdout_f1_kfold is not None:
                refit = f"; k-fold vote without refit {self.holdout_f1_kfold:.4f}"
            single = ""
            if self.holdout_best_single_f1 is not None:
                single = f"; best single trial {self.holdout_best_single_f1:.4f}"
            interval = ""
            if self.holdout_interval is not None:
                low, high = self.holdout_interval
                interval = f"; 95% interval {low:.3f}-{high:.3f} from resampling the persons"
            lines.append(
                f"  holdout F1       {self.holdout_f1:.4f}  (the submission's vote on {self.holdout_persons} "
                f"held-out persons, {self.holdout_images} images{interval}{refit}{single}){mark['holdout']}"
            )
            if self.test_interval is not None:
                low, high = self.test_interval
                lines.append(
                    f"  on the test set  {low:.3f}-{high:.3f}  (95% prediction interval for the "
                    f"{self.test_persons} persons of the predicted images: the holdout figure's error and "
                    "that set's own, since a test set is a sample of persons too)"
                )
        else:
            lines.append(
                "  holdout F1       -       (no holdout persons: search with `holdout: auto` or --holdout "
                "to score the submission itself)"
            )
        if self.pruned_would_pick:
            pruned = ", ".join(self.pruned_would_pick)
            lines.append(
                f"  note: selection would also have picked pruned trial(s) {pruned} (their checkpoints were "
                "deleted by keep_top); raise keep_top to keep them"
            )
        return lines

    NAMES = ("in_sample", "nested", "holdout")

    def score_holdout(self, holdout: Holdout, submitted: np.ndarray, test_images: int) -> None:
        """The submitted vote's figure on the holdout persons, its interval, and the interval it predicts
        for the ``test_images`` images' persons."""
        from orchestrator.ensemble.selection import macro_f1

        labels, person = holdout.label, holdout.person
        self.holdout_f1 = macro_f1(labels, submitted)
        resampled = resampled_f1(labels, submitted, person, BOOTSTRAP_DRAWS)  # both intervals' draws
        self.holdout_interval = _percentiles(resampled)
        self.holdout_persons, self.holdout_images = holdout.persons, len(holdout)
        self.test_persons = persons_of_test_set(test_images, holdout)
        if self.test_persons:
            self.test_interval = prediction_interval(
                labels, submitted, person, self.test_persons, resampled=resampled
            )

    def as_dict(self) -> dict:
        values = asdict(self)
        return {
            **{k: v for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))},
            "trusted": self.trusted,
            "trusted_f1": self.trusted_f1,
        }

    def metrics(self) -> dict[str, float]:
        """The figures as MLflow metrics (the absent ones left out)."""
        values = {
            "estimate/in_sample_oof_f1": self.in_sample_f1,
            "estimate/nested_f1": self.nested_f1,
            "estimate/holdout_f1": self.holdout_f1,
            "estimate/holdout_f1_kfold": self.holdout_f1_kfold,
            "estimate/holdout_best_single_f1": self.holdout_best_single_f1,
            "estimate/trusted_f1": self.trusted_f1,
            "estimate/test_low": self.test_interval[0] if self.test_interval else None,
            "estimate/test_high": self.test_interval[1] if self.test_interval else None,
        }
        return {key: float(value) for key, value in values.items() if value is not None}


BOOTSTRAP_DRAWS = 1000  # resamples of the holdout persons for the interval (seeded: the same every run)


def person_bootstrap(
    labels: np.ndarray, probs: np.ndarray, person: np.ndarray, draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float] | None:
    """The 95% percentile interval of macro F1 when the holdout persons are drawn again with replacement
    (all of a person's images together: they are not independent). A 273-person holdout is noisy; the
    interval says how much, so it is not trusted blindly. None without at least two persons."""
    return _percentiles(resampled_f1(labels, probs, person, draws, seed))


def _percentiles(scores: list[float] | None) -> tuple[float, float] | None:
    """The 2.5 and 97.5 percentiles of resampled figures (None: too few persons to resample)."""
    if scores is None:
        return None
    low, high = np.percentile(scores, [2.5, 97.5])
    return float(low), float(high)


def prediction_interval(
    labels: np.ndarray,
    probs: np.ndarray,
    person: np.ndarray,
    new_persons: int,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = 0,
    resampled: list[float] | None = None,
) -> tuple[float, float] | None:
    """The 95% interval for the same vote's macro F1 on ``new_persons`` other persons (a test set, a
    leaderboard), not for the population figure: the holdout figure's own error and the new set's together.
    Why: the figure a user compares the estimate with is scored on a sample of persons too; an 870-person
    set's macro F1 moves by about ±0.03 by itself, so ``person_bootstrap``'s interval is too narrow for it.
    Each draw scores a resample of the holdout's size and an independent one of ``new_persons`` persons; the
    interval is the holdout figure plus the 2.5 and 97.5 percentiles of their difference (which also carries
    macro F1's dependence on the set's size). ``resampled``: the holdout-size draws when already made
    (``resampled_f1`` with the same ``draws`` and ``seed``, as ``person_bootstrap`` makes them). None without
    at least two persons."""
    from orchestrator.ensemble.selection import macro_f1

    here = resampled if resampled is not None else resampled_f1(labels, probs, person, draws, seed)
    there = resampled_f1(labels, probs, person, draws, seed + 1, persons=max(2, new_persons))
    if here is None or there is None:
        return None
    low, high = np.percentile(np.asarray(there) - np.asarray(here), [2.5, 97.5])
    figure = macro_f1(labels, probs)
    return float(figure + low), float(figure + high)


def persons_of_test_set(test_images: int, holdout: Holdout) -> int:
    """How many persons a test set of ``test_images`` images holds, at the holdout's images per person (7
    in the competition's layout, whose test set names images, not persons)."""
    if not holdout.persons:
        return 0
    return max(1, round(test_images * holdout.persons / len(holdout)))


def resampled_f1(
    labels: np.ndarray,
    probs: np.ndarray,
    person: np.ndarray,
    draws: int,
    seed: int = 0,
    persons: int | None = None,
) -> list[float] | None:
    """Macro F1 of ``draws`` samples of ``persons`` persons (default: as many as there are) drawn with
    replacement, each with all of its images; None without at least two persons."""
    from orchestrator.ensemble.selection import macro_f1

    groups = pd.factorize(np.asarray(person))[0]
    if groups.size == 0 or groups.max() < 1:
        return None
    rows_of = [np.flatnonzero(groups == g) for g in range(groups.max() + 1)]
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(draws):
        rows = np.concatenate([rows_of[g] for g in rng.integers(0, len(rows_of), persons or len(rows_of))])
        scores.append(macro_f1(labels[rows], probs[rows]))
    return scores


@dataclass
class Holdout:
    """The held-out persons' images (relative paths, sorted), their labels and persons; empty when none."""

    rel_path: np.ndarray
    label: np.ndarray
    persons: int
    person: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))  # each image's person

    def __len__(self) -> int:
        return len(self.rel_path)


def read_holdout(run_dir: Path) -> Holdout:
    """The holdout rows of a trial's ``folds.csv`` (fold ``HOLDOUT_FOLD``), with the labels it trained on."""
    path = Path(run_dir) / "folds.csv"
    empty = Holdout(np.array([], dtype=str), np.array([], dtype=np.int64), 0)
    if not path.is_file():
        return empty
    folds = pd.read_csv(path, dtype={"rel_path": str, "person_id": str})
    held = folds[folds["fold"] == HOLDOUT_FOLD].sort_values("rel_path", kind="stable")
    if held.empty:
        return empty
    if "label" not in held.columns:
        raise OrchestratorError(f"{path} has holdout rows but no label column; re-run the search")
    return Holdout(
        held["rel_path"].to_numpy(dtype=str),
        held["label"].to_numpy(dtype=np.int64),
        int(held["person_id"].nunique()),
        held["person_id"].to_numpy(dtype=str),
    )


def holdout_of(search_dir: Path, candidates, log) -> Holdout:
    """The holdout persons with the labels the trials trained on (a trial's own ``folds.csv``: label fixes
    applied), from the first candidate that has one. When the search's split has holdout rows but no
    candidate's run folder has its ``folds.csv``, the report says so instead of dropping the figure."""
    for candidate in candidates:
        if (Path(candidate.run_dir) / "folds.csv").is_file():
            return read_holdout(candidate.run_dir)
    searched = Path(search_dir) / "folds.csv"
    if searched.is_file():
        folds = pd.read_csv(searched, usecols=["fold"])
        if (folds["fold"] == HOLDOUT_FOLD).any():
            log(
                f"note: {searched} holds holdout persons but no candidate's run folder has its folds.csv "
                "(with the labels it trained on); the holdout figure is not computed"
            )
    return read_holdout(Path(candidates[0].run_dir))


HOLDOUT_PROBS = "holdout_probs.npz"  # beside ensemble.json: the members' k-fold vote on the holdout persons


def write_holdout_probs(
    path: Path,
    holdout: Holdout,
    probs: np.ndarray,
    member_ids: list[str],
    own_tta: bool,
    all_folds: bool,
) -> None:
    """The members' k-fold vote (no refit models) on the holdout persons' images, with the labels the search
    trained on, the members and whether each used its own TTA and all k fold models, atomically. No model
    trained on these persons, so ``foldtune label-issues`` can judge their labels with these probabilities
    as it judges the others with the same members' out-of-fold ones (``inspect.oof.with_holdout``)."""
    atomic_savez(
        path,
        rel_path=np.asarray(holdout.rel_path, dtype=str),
        label=np.asarray(holdout.label, dtype=np.int64),
        probs=np.asarray(probs, dtype=np.float32),
        members=np.asarray(member_ids, dtype=str),
        own_tta=np.asarray(own_tta),
        all_folds=np.asarray(all_folds),
    )
