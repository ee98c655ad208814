"""The relabel overlay: label fixes laid over train.csv before anything uses the labels, so known
mislabels are fixed without touching the original data (``read_train(..., relabel=PATH)``). The overlay
is a CSV with the columns ``id,field,value``; any further column (e.g. ``note``) is free text and ignored::

    id,field,value,note
    000123,gender,female,the photos show a woman
    000456,age,62,
    000789,mask_swap,incorrect_mask<->normal,the two pictures are swapped

- ``gender``: ``male`` or ``female``; replaces the person's gender.
- ``age``: an integer 0..120; replaces the person's age (and so the age band).
- ``mask_swap``: ``STEM<->STEM``, two image stems (mask1..mask5, incorrect_mask, normal) of different
  mask state; the two images of that person swap their mask labels.

``id`` is written exactly as in train.csv, leading zeros included. Every fix that changes a label counts
in ``TrainData.fixes[field]``; a fix that changes nothing is a warning; an unknown id, an unknown field, a
bad value, or a second fix of the same thing is an error naming the overlay file and line.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from trainers.data_checks import (
    MAX_AGE,
    PersonRecord,
    Problem,
    add_error,
    add_warning,
    parse_age,
    read_csv_records,
)
from trainers.labels import GENDER_CODES, GENDER_NAMES, MASK_STEMS

RELABEL_COLUMNS = ("id", "field", "value")
RELABEL_FIELDS = ("gender", "age", "mask_swap")
STEM_ORDER = tuple(MASK_STEMS)  # mask1..mask5, incorrect_mask, normal


def _parse_swap(value: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"\s*(\w+)\s*<->\s*(\w+)\s*", value)
    if not match:
        return None
    first, second = match.groups()
    if first not in MASK_STEMS or second not in MASK_STEMS or MASK_STEMS[first] == MASK_STEMS[second]:
        return None
    return first, second


def apply_relabel(relabel: Path, persons: list[PersonRecord], problems: list[Problem]) -> dict[str, int]:
    """Lay the overlay's fixes over the parsed persons; returns applied fixes per field."""
    fixes = dict.fromkeys(RELABEL_FIELDS, 0)
    records = read_csv_records(relabel, str(relabel), RELABEL_COLUMNS, problems)
    if records is None:
        return fixes
    by_id: dict[str, list[PersonRecord]] = defaultdict(list)
    for person in persons:
        by_id[person.person_id].append(person)
    fixed_at: dict[tuple[str, str], int] = {}
    for line, record in records:
        person_id, kind, value = record["id"], record["field"].lower(), record["value"]
        where = f"{relabel} line {line}"
        if person_id not in by_id:
            add_error(
                problems,
                where,
                f"id {person_id!r} is not in train.csv; write the id exactly as in train.csv (e.g. 000001)",
            )
            continue
        if kind not in RELABEL_FIELDS:
            add_error(
                problems, where, f"unknown field {record['field']!r}; use one of {', '.join(RELABEL_FIELDS)}"
            )
            continue
        if kind == "gender":
            new = GENDER_CODES.get(value.lower())
            if new is None:
                add_error(problems, where, f"gender value {value!r} must be male or female")
                continue
            keys = [(person_id, "gender")]
        elif kind == "age":
            new = parse_age(value)
            if new is None:
                add_error(problems, where, f"age value {value!r} must be an integer 0..{MAX_AGE}")
                continue
            keys = [(person_id, "age")]
        else:
            new = _parse_swap(value)
            if new is None:
                add_error(
                    problems,
                    where,
                    f"mask_swap value {value!r} must be STEM<->STEM with two of {', '.join(STEM_ORDER)} "
                    "of different mask state, e.g. incorrect_mask<->normal",
                )
                continue
            keys = [(person_id, f"mask_swap {stem}") for stem in new]
        earlier = [fixed_at[key] for key in keys if key in fixed_at]
        if earlier:
            add_error(
                problems, where, f"id {person_id} already has this fixed on line {earlier[0]}; keep one fix"
            )
            continue
        fixed_at.update(dict.fromkeys(keys, line))
        person = by_id[person_id][0]  # identical duplicates were dropped; conflicting ones are errors
        if kind == "gender":
            if person.gender == new:
                add_warning(
                    problems, where, f"id {person_id} is already {GENDER_NAMES[new]}; the fix changes nothing"
                )
                continue
            person.gender = new
        elif kind == "age":
            if person.age == new:
                add_warning(problems, where, f"id {person_id} is already {new}; the fix changes nothing")
                continue
            person.age = new
        else:
            first, second = new
            person.masks[first], person.masks[second] = person.masks[second], person.masks[first]
        fixes[kind] += 1
    return fixes
