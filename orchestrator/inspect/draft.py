"""The relabel draft: the findings above their kind's cut written as the overlay ``--relabel`` reads
(trainers.relabel), ready to be reviewed, edited and passed to the next search.

Why a draft and not a fix: a finding is the models' opinion; a person decides. The draft is in exactly the
overlay format (``id,field,value,note``) so that accepting a finding is leaving its line in, and rejecting
it is deleting the line. Which findings: per kind, those scoring at or above the cut ``inspect.judge``
measured for this search's judge (the lowest at which its measured precision reaches ``--min-precision``);
a kind without a cut drafts nothing. Each line's note carries its kind's expected precision. An image-level
mask finding is drafted as a swap, at the swap kind's cut. Only what the overlay can express is drafted:

- ``gender``: the suggested gender;
- ``age``: the age in the suggested band nearest to the given one (the smallest change that moves the
  person into it; the note asks for the true age);
- ``mask_swap``: ``incorrect_mask<->normal`` for a swapped pair, or an image-level mask finding paired with
  the person's image it most likely swapped with; a finding without such a partner has no overlay form
  (the overlay never relabels one image alone) and stays in label_issues.csv only.

The overlay refuses a second fix of one thing, so each person gets at most one gender, one age and one
swap per image (the best-ranked). When the search itself was trained with an overlay, its lines are kept
(the draft replaces it): a new fix of the same field replaces the old line, and a swap of the same pair
undoes the old one (both lines go); a swap overlapping an old one in one image is left to the reviewer.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from orchestrator.errors import OrchestratorError

DRAFT_COLUMNS = ("id", "field", "value", "note")
OVERLAY_FIELD = {"gender": "gender", "age": "age", "mask": "mask_swap", "mask_swap": "mask_swap"}


def _stems(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split("<->"))


MEASURED_AS = {"gender": "gender", "age": "age", "mask_swap": "mask_swap", "mask": "mask_swap"}


def _note(row: pd.Series, precision: float) -> str:
    what = f"{row['given']} -> {row['suggested']}"
    where = f" ({row['image']})" if row["image"] else ""
    extra = "; put the true age" if row["kind"] == "age" else ""
    expected = f"; expected precision of {row['kind']} lines {precision:.2f}"
    return f"label-issues {row['kind']}{where}: {what}, confidence {row['confidence']:.2f}{extra}{expected}"


def drafted_rows(issues: pd.DataFrame, cuts: dict[str, float | None]) -> pd.Series:
    """Which findings reach their kind's cut and have an overlay form (before one-per-person thinning)."""
    cut = issues["kind"].map(lambda kind: cuts.get(MEASURED_AS[kind]))
    reaches = cut.notna() & (issues["score"] >= cut.fillna(float("inf")))
    return reaches & (issues["fix"] != "")


def new_fixes(
    issues: pd.DataFrame, cuts: dict[str, float | None], precision: dict[str, float]
) -> tuple[list[dict[str, str]], list[int]]:
    """The findings at or above their kind's cut with an overlay form, strongest evidence first, at most
    one per person and thing; and the index of each drafted finding in ``issues``."""
    fixes, used, taken, swapped = [], [], set(), set()
    candidates = issues[drafted_rows(issues, cuts)].sort_values("score", ascending=False, kind="mergesort")
    for index, row in candidates.iterrows():
        person, field = str(row["id"]), OVERLAY_FIELD[row["kind"]]
        if field == "mask_swap":
            stems = _stems(row["fix"])
            if any((person, stem) in swapped for stem in stems):
                continue
            swapped.update((person, stem) for stem in stems)
        elif (person, field) in taken:
            continue
        taken.add((person, field))
        note = _note(row, precision[MEASURED_AS[row["kind"]]])
        fixes.append({"id": person, "field": field, "value": str(row["fix"]), "note": note})
        used.append(index)
    return fixes, used


def read_overlay(path: Path) -> list[dict[str, str]]:
    """The lines of an existing overlay (the search's own copy), with its note where it has one."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            return [
                {column: (record.get(column) or "").strip() for column in DRAFT_COLUMNS}
                for record in csv.DictReader(handle)
                if any((value or "").strip() for value in record.values())
            ]
    except (OSError, csv.Error) as error:
        raise OrchestratorError(
            f"{path}: the search's label fixes cannot be read ({error}); restore the file"
        ) from None


def merge(previous: list[dict[str, str]], fixes: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
    """The previous overlay's lines with the new fixes laid over them; returns (lines, new fixes left out
    because they overlap an old swap in one image only)."""
    kept = list(previous)
    merged_new, conflicts = [], 0
    for fix in fixes:
        person, field = fix["id"], fix["field"]
        if field != "mask_swap":
            kept = [line for line in kept if not (line["id"] == person and line["field"].lower() == field)]
            merged_new.append(fix)
            continue
        stems = _stems(fix["value"])
        old = [
            line
            for line in kept
            if line["id"] == person and line["field"].lower() == "mask_swap" and _stems(line["value"]) & stems
        ]
        if any(_stems(line["value"]) == stems for line in old):  # the same swap again: undo the old one
            kept = [line for line in kept if not (line in old and _stems(line["value"]) == stems)]
        elif old:
            conflicts += 1
        else:
            merged_new.append(fix)
    return kept + merged_new, conflicts


def build_draft(
    issues: pd.DataFrame,
    cuts: dict[str, float | None],
    precision: dict[str, float],
    previous: Path | None = None,
) -> tuple[pd.DataFrame, int, list[int]]:
    """The draft overlay as a frame (``DRAFT_COLUMNS``), how many fixes conflict with ``previous``, and the
    index in ``issues`` of each finding drafted."""
    fixes, used = new_fixes(issues, cuts, precision)
    lines, conflicts = merge(read_overlay(previous), fixes) if previous is not None else (fixes, 0)
    return pd.DataFrame(lines, columns=list(DRAFT_COLUMNS)), conflicts, used
