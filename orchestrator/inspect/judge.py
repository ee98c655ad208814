"""How good is this search's judge? label-issues measures it on the search at hand before it drafts anything.

Why: the finder's precision is bounded by its judge, the out-of-fold probabilities. Every person whose
*correct* label the judge disputes can be a false flag, and a weak judge (a short search on few persons)
disputes many: applied as drafted, its relabel draft would corrupt more labels than it fixes. So before
drafting, the finder is run on copies of the search's own labels with known errors injected, at the rates
and kinds it looks for (``RATES``: gender flipped, age moved one year across the nearest band edge,
``incorrect_mask`` and ``normal`` pictures swapped), several seeded times, and scored against what was
injected: per kind, precision and recall at every cut on the finder's ``score`` (the log-likelihood ratio
of the suggested label over the given one). The draft then keeps a kind's rows only above the lowest cut
whose measured precision reaches ``--min-precision``; a kind whose judge reaches it at no cut is listed for
review and not drafted. No training: the same OOF probabilities, the same finder
(``label_issues.person_findings``), seconds.

Why injecting into OOF labels is faithful: a person's OOF probabilities come from the fold model that never
saw that person, so changing the person's label afterwards is what a wrong label in the data would have
looked like to its judge.

The given labels are taken as the truth, so a flag on a person that was not injected counts as a false
flag, including persons the given labels already dispute (found on the search's own labels before any
injection; counted apart as ``disputed``, as ``benchmarks.label_noise --baseline`` counts the data's own
suspects). Exact when the data is clean; when it has errors of its own, some of those flags are real
errors, and the measured precision is a lower bound: the draft errs on the side of doing no harm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from orchestrator.inspect.label_issues import SWAP_STEMS, person_findings
from trainers.labels import AgeBands

RATES = {"gender": 0.05, "age": 0.05, "mask_swap": 0.03}  # benchmarks.label_noise's, the finder's kinds
DEFAULT_SEEDS = 10
DEFAULT_MIN_PRECISION = 0.5
# a cut's precision counts only with this many flags per seeded copy behind it (at least 10 in all): a cut at
# the far end of the curve, with a handful of flags, would draft on a fluke
MIN_FLAGS_PER_SEED, MIN_POOLED_FLAGS = 3, 10


@dataclass
class KindJudgement:
    """One kind's measured judge: the cut the draft uses (None: no draft) and what it reaches there."""

    kind: str
    rate: float
    injected: int  # errors injected per seed
    cut: float | None  # draft rows with score >= cut
    precision: float  # measured at the cut (at the best cut when there is none)
    recall: float
    best_precision: float  # the best precision any cut with enough flags reaches
    disputed: int = 0  # persons the given labels already dispute at the cut (or the best cut)
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)  # see precision_curve

    def line(self, min_precision: float) -> str:
        # the data's own disputes count as false flags: with real errors among them, precision is higher
        caveat = (
            f"; {self.disputed} person(s) the given labels already dispute there count as false"
            if self.disputed
            else ""
        )
        if self.cut is None:
            return (
                f"{self.kind}: this judge reaches precision {self.best_precision:.2f} at best (measured: "
                f"{_injection(self)}{caveat}); below {min_precision:g}, none drafted"
            )
        return (
            f"{self.kind}: expected precision {self.precision:.2f}, recall {self.recall:.2f} above score "
            f"{self.cut:.2f} (measured: {_injection(self)}{caveat})"
        )


def _injection(judgement: KindJudgement) -> str:
    return f"{judgement.injected} injected errors ({judgement.rate:.0%}) per seeded copy"


@dataclass
class JudgeReport:
    """The judge measured per kind; ``cuts`` is what the draft uses."""

    kinds: dict[str, KindJudgement]
    seeds: int
    min_precision: float

    @property
    def cuts(self) -> dict[str, float | None]:
        return {kind: judged.cut for kind, judged in self.kinds.items()}

    def lines(self) -> list[str]:
        return [judged.line(self.min_precision) for judged in self.kinds.values()]

    def curves(self) -> pd.DataFrame:
        """Every kind's precision/recall curve in one table (``judge.csv``)."""
        frames = [judged.curve.assign(kind=kind) for kind, judged in self.kinds.items()]
        columns = ["kind", "threshold", "flags", "hits", "precision", "recall", "false_rate"]
        return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def swap_eligible(table: pd.DataFrame) -> np.ndarray:
    """Persons with both ``incorrect_mask`` and ``normal`` pictures of different given states (a swap of
    those two files is a label error the finder looks for)."""
    pairs = table[table["stem"].isin(SWAP_STEMS)]
    states = pairs.groupby("person_id")["mask"].agg(["count", "nunique"])
    return np.sort(states.index[(states["count"] == 2) & (states["nunique"] == 2)].to_numpy())


def inject(
    table: pd.DataFrame, probs: np.ndarray, bands: AgeBands, seed: int, rates: dict[str, float] = RATES
) -> tuple[pd.DataFrame, np.ndarray, dict[str, set[str]]]:
    """Copies of the labels and probabilities with seeded errors for disjoint persons: gender flipped, age
    moved one year across the nearest band edge, the two swap pictures' probability rows exchanged (what
    swapping the files would have given). Returns the copies and the injected persons per kind."""
    table, probs = table.reset_index(drop=True).copy(), probs.copy()
    persons = np.sort(table["person_id"].unique())
    rng = np.random.default_rng(seed)
    eligible = {"gender": persons, "age": persons, "mask_swap": swap_eligible(table)}
    taken: set[str] = set()
    injected: dict[str, set[str]] = {}
    for kind, rate in rates.items():
        pool = np.array([p for p in rng.permutation(eligible[kind]) if p not in taken])
        chosen = pool[: max(1, round(rate * len(eligible[kind])))] if len(pool) else pool
        injected[kind] = {str(p) for p in chosen}
        taken |= injected[kind]
        rows = table.index[table["person_id"].isin(chosen)]
        if kind == "gender":
            table.loc[rows, "gender"] = 1 - table.loc[rows, "gender"]
        elif kind == "age":
            moved = table.loc[rows, "age"].map(lambda age: across_edge(int(age), bands))
            table.loc[rows, "age"] = moved
            table.loc[rows, "age_band"] = bands.band(moved.to_numpy())
        else:
            pairs = table.loc[rows][table.loc[rows, "stem"].isin(SWAP_STEMS)].sort_values(
                ["person_id", "stem"]
            )
            first, second = pairs.index[0::2].to_numpy(), pairs.index[1::2].to_numpy()
            probs[np.concatenate([first, second])] = probs[np.concatenate([second, first])]
    return table, probs, injected


def across_edge(age: int, bands: AgeBands) -> int:
    """The age one year across the nearest band edge (28 -> 30, 35 -> 29, 50 -> 60, 64 -> 59): the hardest
    age error, and the one a band edge's noise makes."""
    low, high = bands.edges
    if age < low:
        return low
    if age >= high:
        return high - 1
    return low - 1 if age - (low - 1) < high - age else high


def measure_judge(
    table: pd.DataFrame,
    probs: np.ndarray,
    bands: AgeBands,
    seeds: int = DEFAULT_SEEDS,
    min_precision: float = DEFAULT_MIN_PRECISION,
    rates: dict[str, float] = RATES,
) -> JudgeReport:
    """The finder's precision and recall per kind over ``seeds`` seeded injections into the given labels,
    and each kind's draft cut (see the module docstring)."""
    table = table.reset_index(drop=True)
    given = person_findings(table, probs, bands)
    scored: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {kind: [] for kind in rates}
    injected_counts = {kind: 0 for kind in rates}
    persons = table["person_id"].nunique()
    eligible = {"gender": persons, "age": persons, "mask_swap": len(swap_eligible(table))}
    for seed in range(seeds):
        noisy, noisy_probs, injected = inject(table, probs, bands, seed, rates)
        found = person_findings(noisy, noisy_probs, bands)
        for kind in rates:
            rows = found[found["kind"] == kind].drop_duplicates("id")
            hits = rows["id"].isin(injected[kind]).to_numpy()
            scored[kind].append((rows["score"].to_numpy(dtype=np.float64), hits))
            injected_counts[kind] += len(injected[kind])
    kinds = {}
    for kind, rate in rates.items():
        scores = np.concatenate([s for s, _ in scored[kind]]) if scored[kind] else np.zeros(0)
        hits = np.concatenate([h for _, h in scored[kind]]) if scored[kind] else np.zeros(0, dtype=bool)
        others = seeds * eligible[kind] - injected_counts[kind]
        curve = precision_curve(scores, hits, injected_counts[kind], others)
        base = given.loc[given["kind"] == kind, "score"].to_numpy(dtype=np.float64)
        support = max(MIN_POOLED_FLAGS, MIN_FLAGS_PER_SEED * seeds)
        kinds[kind] = _judge_kind(
            kind, rate, injected_counts[kind] // max(1, seeds), curve, base, min_precision, support
        )
    return JudgeReport(kinds, seeds, min_precision)


def precision_curve(scores: np.ndarray, hits: np.ndarray, injected: int, others: int = 0) -> pd.DataFrame:
    """Per distinct score, highest first: flags and hits at or above it, precision and recall there, and
    ``false_rate``: the share of the ``others`` (persons not injected, over all seeds) flagged there."""
    order = np.argsort(-scores, kind="stable")
    scores, hits = scores[order], hits[order].astype(np.int64)
    flags, found = np.arange(1, len(scores) + 1), np.cumsum(hits)
    last = np.r_[scores[1:] != scores[:-1], True] if len(scores) else np.zeros(0, dtype=bool)
    return pd.DataFrame(
        {
            "threshold": scores[last],
            "flags": flags[last],
            "hits": found[last],
            "precision": found[last] / flags[last],
            "recall": found[last] / max(1, injected),
            "false_rate": (flags[last] - found[last]) / max(1, others),
        }
    )


def _judge_kind(
    kind: str,
    rate: float,
    injected: int,
    curve: pd.DataFrame,
    base: np.ndarray,
    min_precision: float,
    support: int = MIN_POOLED_FLAGS,
) -> KindJudgement:
    """The lowest cut (most recall) whose precision reaches ``min_precision`` with enough flags behind it."""
    # a cut keeps rows whose suggested label is likelier than the given one (score > 0), with enough flags
    enough = curve[(curve["flags"] >= support) & (curve["threshold"] > 0)]
    if enough.empty:
        return KindJudgement(kind, rate, injected, None, float("nan"), 0.0, float("nan"), 0, curve)
    best = enough.loc[enough["precision"].idxmax()]
    reaching = enough[enough["precision"] >= min_precision]
    at = reaching.iloc[-1] if len(reaching) else best  # the curve runs from the highest score down
    cut = float(at["threshold"]) if len(reaching) else None
    disputed = int((base >= float(at["threshold"])).sum())
    return KindJudgement(
        kind,
        rate,
        injected,
        cut,
        float(at["precision"]),
        float(at["recall"]),
        float(best["precision"]),
        disputed,
        curve,
    )
