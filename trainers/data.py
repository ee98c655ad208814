"""Read and validate the competition data into one tidy table, one row per image.

Every later step (folds, cache, training, ensemble) trusts this table, so every problem in the data is
found here, before any compute, and reported all at once, each with its file, its row and what to do.

Layout under the data root::

    train/train.csv         id,gender,race,age,path   (race is not used)
    train/images/<path>/    mask1..mask5, incorrect_mask, normal, each .jpg, .jpeg or .png
    eval/info.csv           ImageID,ans               (ans is not used)
    eval/images/<ImageID>

Hidden files and macOS ``._*`` resource forks are skipped and counted (``TrainData.ignored_files``).
Row numbers in messages are line numbers of the CSV file (the header is line 1).

Relabel overlay, ``read_train(..., relabel=PATH)``: a CSV of label fixes laid over train.csv before
anything uses the labels, so known mislabels are fixed without touching the original data. Columns
``id,field,value``; any further column (e.g. ``note``) is free text and ignored::

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

import csv
import functools
import os
import re
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image

from trainers.errors import FoldtuneError
from trainers.labels import (
    GENDER_CODES,
    GENDER_NAMES,
    IMAGE_EXTENSIONS,
    MASK_NAMES,
    MASK_STEMS,
    AgeBands,
    class_names,
    encode,
)

TRAIN_CSV = "train/train.csv"
TRAIN_IMAGES = "train/images"
EVAL_CSV = "eval/info.csv"
EVAL_IMAGES = "eval/images"
TRAIN_COLUMNS = ("id", "gender", "age", "path")
EVAL_COLUMNS = ("ImageID",)
RELABEL_COLUMNS = ("id", "field", "value")
RELABEL_FIELDS = ("gender", "age", "mask_swap")
MAX_AGE = 120
TABLE_COLUMNS = (
    "rel_path",
    "image_path",
    "person_id",
    "person_dir",
    "stem",
    "mask",
    "gender",
    "age",
    "age_band",
    "label",
)
STEM_ORDER = tuple(MASK_STEMS)  # mask1..mask5, incorrect_mask, normal
_EXPECTED_IMAGES = "mask1..mask5, incorrect_mask and normal, each .jpg, .jpeg or .png"
_MAX_LISTED_PROBLEMS = 100

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the data; ``where`` names the file and row or field, ``message`` what to do."""

    severity: Severity
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.where}: {self.message}"


class DataError(FoldtuneError):
    """Bad input data; ``problems`` holds every problem found, not just the first."""

    def __init__(self, problems: list[Problem] | Problem):
        self.problems = [problems] if isinstance(problems, Problem) else list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        errors = sum(p.severity == "error" for p in self.problems)
        warnings = len(self.problems) - errors
        head = f"{errors} error(s)" + (f" and {warnings} warning(s)" if warnings else "") + " in the data:"
        shown = self.problems[:_MAX_LISTED_PROBLEMS]
        lines = [head, *(f"  {p}" for p in shown)]
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more (all in DataError.problems)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._text()


@dataclass
class TrainData:
    """The validated training table plus what reading it found along the way."""

    table: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)  # warnings only
    ignored_files: int = 0
    fixes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELABEL_FIELDS, 0))
    age_bands: AgeBands = field(default_factory=AgeBands)
    root: Path | None = None

    @property
    def num_persons(self) -> int:
        return int(self.table["person_id"].nunique())


@dataclass
class _Person:
    """One row of train.csv while it is being checked; fields are None where the row's value is bad."""

    line: int
    person_id: str
    gender: int | None
    age: int | None
    person_dir: str | None
    masks: dict[str, int] = field(default_factory=lambda: dict(MASK_STEMS))
    files: dict[str, str] = field(default_factory=dict)  # stem -> file name


def _error(problems: list[Problem], where: str, message: str) -> None:
    problems.append(Problem("error", where, message))


def _warning(problems: list[Problem], where: str, message: str) -> None:
    problems.append(Problem("warning", where, message))


def _has_errors(problems: list[Problem]) -> bool:
    return any(p.severity == "error" for p in problems)


def read_csv_records(
    path: Path, display: str, required: tuple[str, ...], problems: list[Problem]
) -> list[tuple[int, dict[str, str]]] | None:
    """Rows of a CSV as (line number, {column: stripped value}); None (with a problem) when unusable.

    The csv module, not pandas, so ids stay strings and every row keeps its true line number.
    """
    if not path.is_file():
        _error(problems, display, "file not found; check the data root or create the file")
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                _error(problems, display, f"the file is empty; it needs the header {','.join(required)}")
                return None
            header = [name.strip() for name in header]
            missing = [name for name in required if name not in header]
            if missing:
                _error(
                    problems,
                    f"{display} line 1",
                    f"missing column(s) {', '.join(missing)}; the header must contain "
                    f"{','.join(required)} (found {','.join(header) or 'nothing'})",
                )
                return None
            records = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # blank line
                if len(row) != len(header):
                    _error(
                        problems,
                        f"{display} line {reader.line_num}",
                        f"has {len(row)} field(s) but the header has {len(header)}; "
                        "fix the commas or quote the value",
                    )
                    continue
                records.append((reader.line_num, {k: v.strip() for k, v in zip(header, row, strict=True)}))
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        _error(problems, display, f"cannot be read as a UTF-8 CSV file ({exc}); re-save it as CSV")
        return None
    return records


def _check_root(root: Path) -> None:
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            Problem("error", str(root), f"data root {what}; pass the folder that holds train/ and eval/")
        )


def _relative_folder(raw: str) -> tuple[str | None, str]:
    """A train.csv ``path`` as a clean relative folder, or (None, why it is refused)."""
    if not raw:
        return None, "path is empty; give the person's folder name under train/images"
    if PurePosixPath(raw).is_absolute() or PureWindowsPath(raw).is_absolute() or raw.startswith("~"):
        return None, f"path {raw!r} is absolute; write the folder name relative to train/images"
    parts = [part for part in PurePosixPath(raw).parts if part != "."]
    if ".." in parts:
        return None, f"path {raw!r} escapes train/images through '..'; write a folder inside train/images"
    if not parts:
        return None, f"path {raw!r} is train/images itself; give the person's own folder"
    return "/".join(parts), ""


def _parse_age(raw: str) -> int | None:
    if not re.fullmatch(r"\+?\d+", raw):
        return None
    age = int(raw)
    return age if age <= MAX_AGE else None


def _parse_person(line: int, record: dict[str, str], problems: list[Problem]) -> _Person:
    person_id = record["id"]
    where = f"{TRAIN_CSV} line {line}" + (f" (id {person_id})" if person_id else "")
    person = _Person(line, person_id, None, None, None)
    if not person_id:
        _error(problems, where, "id is empty; give every person a unique id")
    gender = record["gender"].lower()
    if gender in GENDER_CODES:
        person.gender = GENDER_CODES[gender]
    else:
        _error(problems, where, f"gender {record['gender']!r} is not male or female; write male or female")
    person.age = _parse_age(record["age"])
    if person.age is None:
        _error(
            problems, where, f"age {record['age']!r} is not an integer 0..{MAX_AGE}; write the age in years"
        )
    person.person_dir, why = _relative_folder(record["path"])
    if person.person_dir is None:
        _error(problems, where, why)
    return person


def _read_persons(records: list[tuple[int, dict[str, str]]], problems: list[Problem]) -> list[_Person]:
    """Parse train.csv rows; identical duplicate ids keep one (warning), conflicting ones are errors."""
    by_id: dict[str, list[tuple[int, dict[str, str]]]] = defaultdict(list)
    for line, record in records:
        by_id[record["id"]].append((line, record))
    persons = []
    for line, record in records:
        same_id = by_id[record["id"]]
        if record["id"] and len(same_id) > 1:
            first_line, first = same_id[0]
            lines = ", ".join(str(n) for n, _ in same_id)
            where = f"{TRAIN_CSV} line {line} (id {record['id']})"
            if all(other == first for _, other in same_id):
                if line != first_line:
                    _warning(
                        problems, where, f"duplicate of line {first_line} (identical); kept line {first_line}"
                    )
                    continue
            elif line == first_line:
                differing = sorted({k for _, other in same_id for k in first if other[k] != first[k]})
                _error(
                    problems,
                    where,
                    f"id {record['id']} appears on lines {lines} with different {', '.join(differing)}; "
                    "keep one row per person (give the other person its own id)",
                )
        persons.append(_parse_person(line, record, problems))
    by_dir: dict[str, list[_Person]] = defaultdict(list)
    for person in persons:
        if person.person_dir is not None:
            by_dir[person.person_dir].append(person)
    for person_dir, owners in by_dir.items():
        ids = sorted({p.person_id for p in owners})
        if len(ids) > 1:
            lines = ", ".join(str(p.line) for p in owners)
            _error(
                problems,
                f"{TRAIN_CSV} lines {lines}",
                f"ids {', '.join(ids)} share the folder {person_dir!r}; each person needs its own folder",
            )
    return persons


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def _image_opens(path: Path, decode: bool = False) -> str:
    """'' when PIL can open and verify the file, else why not.

    verify() reads headers only (fast) and lets a truncated JPEG through; ``decode`` reads every byte of
    the compressed data (JPEGs at 1/8 scale, so about a tenth of a full decode), which catches it.
    """
    try:
        with Image.open(path) as image:
            if decode:
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
            else:
                image.verify()
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        reason = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip() or "no detail"
        return f"{type(exc).__name__}: {reason}"
    return ""


def _verify_images(paths: list[Path], decode: bool = False) -> list[str]:
    """``_image_opens`` for many files; threads, because the time goes to reading files, not to Python."""
    check = functools.partial(_image_opens, decode=decode)
    if len(paths) < 64:
        return [check(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(check, paths, chunksize=32))


def _scan_person(
    person: _Person,
    images_dir: Path,
    images_root: Path,
    to_verify: list[tuple[Path, str, str]],
    problems: list[Problem],
) -> int:
    """Check one person's folder, fill ``person.files``; returns how many hidden files it skipped.

    Images to open are appended to ``to_verify`` as (path, where, row), so they can be checked in parallel.
    """
    folder = images_dir / person.person_dir
    where = f"{TRAIN_IMAGES}/{person.person_dir}/"
    row = f"(train.csv line {person.line}, id {person.person_id})"
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "folder is missing"
        _error(problems, where, f"{what} {row}; restore the person's folder or remove the row from train.csv")
        return 0
    if not _inside(folder, images_root):
        _error(
            problems,
            where,
            f"resolves to {folder.resolve()}, outside {TRAIN_IMAGES} {row}; "
            "copy the images into train/images instead of linking",
        )
        return 0
    ignored = 0
    found: dict[str, list[str]] = defaultdict(list)
    symlinks: dict[str, bool] = {}
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        _error(problems, where, f"cannot be listed ({exc.strerror}) {row}; check the folder's permissions")
        return 0
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            ignored += 1
            continue
        stem, ext = os.path.splitext(name)
        if stem in MASK_STEMS and ext.lower() in IMAGE_EXTENSIONS:
            found[stem].append(name)
            symlinks[name] = entry.is_symlink()
            continue
        kind = "folder" if entry.is_dir() else "file"
        hint = (
            f"rename it to {stem.lower()}{ext.lower()}"
            if stem.lower() in MASK_STEMS and ext.lower() in IMAGE_EXTENSIONS
            else "remove it or move it out of the images folder"
        )
        _error(
            problems,
            where + name,
            f"unexpected {kind} {row}: a person folder holds only {_EXPECTED_IMAGES}; {hint}",
        )
    for stem in STEM_ORDER:
        names = found.get(stem, [])
        if len(names) > 1:
            _error(
                problems,
                where,
                f"{stem} is there {len(names)} times ({', '.join(names)}) {row}; "
                "keep one and delete the others",
            )
        for name in names:
            path = folder / name
            if not path.is_file():
                _error(problems, where + name, f"is not a regular file {row}; replace it with the image")
            elif symlinks[name] and not _inside(path, images_root):  # resolve() only links: it is slow
                _error(
                    problems,
                    where + name,
                    f"is a link to {path.resolve()}, outside {TRAIN_IMAGES} {row}; copy the image in instead",
                )
            else:
                to_verify.append((path, where + name, row))
        if len(names) == 1:
            person.files[stem] = names[0]
    missing = [stem for stem in STEM_ORDER if stem not in found]
    if missing:
        _error(
            problems,
            where,
            f"missing image(s) {', '.join(missing)} {row}; each person needs {_EXPECTED_IMAGES}",
        )
    return ignored


def _scan_images_root(images_dir: Path, persons: list[_Person], problems: list[Problem]) -> int:
    """Warn about folders nobody in train.csv uses; count hidden entries at the top of train/images."""
    listed = {p.person_dir.split("/")[0] for p in persons if p.person_dir is not None}
    ignored, unlisted, stray = 0, [], []
    try:
        entries = list(os.scandir(images_dir))
    except OSError as exc:
        _error(
            problems, f"{TRAIN_IMAGES}/", f"cannot be listed ({exc.strerror}); check the folder's permissions"
        )
        return 0
    for entry in entries:
        if entry.name.startswith("."):
            ignored += 1
        elif entry.name not in listed:
            (unlisted if entry.is_dir() else stray).append(entry.name)
    for names, what in ((sorted(unlisted), "folder(s)"), (sorted(stray), "file(s)")):
        if names:
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            _warning(
                problems,
                f"{TRAIN_IMAGES}/",
                f"{len(names)} {what} not listed in train.csv are not used: {shown}; "
                "add rows to train.csv if they belong to the data",
            )
    return ignored


def _parse_swap(value: str) -> tuple[str, str] | None:
    match = re.fullmatch(r"\s*(\w+)\s*<->\s*(\w+)\s*", value)
    if not match:
        return None
    first, second = match.groups()
    if first not in MASK_STEMS or second not in MASK_STEMS or MASK_STEMS[first] == MASK_STEMS[second]:
        return None
    return first, second


def _apply_relabel(relabel: Path, persons: list[_Person], problems: list[Problem]) -> dict[str, int]:
    """Lay the overlay's fixes over the parsed persons; returns applied fixes per field."""
    fixes = dict.fromkeys(RELABEL_FIELDS, 0)
    records = read_csv_records(relabel, str(relabel), RELABEL_COLUMNS, problems)
    if records is None:
        return fixes
    by_id: dict[str, list[_Person]] = defaultdict(list)
    for person in persons:
        by_id[person.person_id].append(person)
    fixed_at: dict[tuple[str, str], int] = {}
    for line, record in records:
        person_id, kind, value = record["id"], record["field"].lower(), record["value"]
        where = f"{relabel} line {line}"
        if person_id not in by_id:
            _error(
                problems,
                where,
                f"id {person_id!r} is not in train.csv; write the id exactly as in train.csv (e.g. 000001)",
            )
            continue
        if kind not in RELABEL_FIELDS:
            _error(
                problems, where, f"unknown field {record['field']!r}; use one of {', '.join(RELABEL_FIELDS)}"
            )
            continue
        if kind == "gender":
            new = GENDER_CODES.get(value.lower())
            if new is None:
                _error(problems, where, f"gender value {value!r} must be male or female")
                continue
            keys = [(person_id, "gender")]
        elif kind == "age":
            new = _parse_age(value)
            if new is None:
                _error(problems, where, f"age value {value!r} must be an integer 0..{MAX_AGE}")
                continue
            keys = [(person_id, "age")]
        else:
            new = _parse_swap(value)
            if new is None:
                _error(
                    problems,
                    where,
                    f"mask_swap value {value!r} must be STEM<->STEM with two of {', '.join(STEM_ORDER)} "
                    "of different mask state, e.g. incorrect_mask<->normal",
                )
                continue
            keys = [(person_id, f"mask_swap {stem}") for stem in new]
        earlier = [fixed_at[key] for key in keys if key in fixed_at]
        if earlier:
            _error(
                problems, where, f"id {person_id} already has this fixed on line {earlier[0]}; keep one fix"
            )
            continue
        fixed_at.update(dict.fromkeys(keys, line))
        person = by_id[person_id][0]  # identical duplicates were dropped; conflicting ones are errors
        if kind == "gender":
            if person.gender == new:
                _warning(
                    problems, where, f"id {person_id} is already {GENDER_NAMES[new]}; the fix changes nothing"
                )
                continue
            person.gender = new
        elif kind == "age":
            if person.age == new:
                _warning(problems, where, f"id {person_id} is already {new}; the fix changes nothing")
                continue
            person.age = new
        else:
            first, second = new
            person.masks[first], person.masks[second] = person.masks[second], person.masks[first]
        fixes[kind] += 1
    return fixes


def read_train(
    root: str | os.PathLike,
    age_bands: AgeBands = AgeBands(),
    relabel: str | os.PathLike | None = None,
    check_images: bool = True,
    decode_images: bool = False,
) -> TrainData:
    """Read train.csv and train/images into one validated row per image.

    Raises DataError listing every error-severity problem (and the warnings) found; nothing is returned
    half-checked. With ``check_images`` each image is opened and verified by PIL (headers only: fast);
    ``decode_images`` also reads all its compressed data, which finds truncated files.
    """
    root = Path(root)
    _check_root(root)
    problems: list[Problem] = []
    records = read_csv_records(root / TRAIN_CSV, TRAIN_CSV, TRAIN_COLUMNS, problems)
    images_dir = root / TRAIN_IMAGES
    if not images_dir.is_dir():
        _error(problems, f"{TRAIN_IMAGES}/", "folder not found; put one folder per person in train/images")
    if records is None or not images_dir.is_dir():
        raise DataError(problems)
    persons = _read_persons(records, problems)
    if not persons and not _has_errors(problems):
        _error(problems, TRAIN_CSV, "has no rows; add one row per person")
    fixes = (
        _apply_relabel(Path(relabel), persons, problems)
        if relabel is not None
        else dict.fromkeys(RELABEL_FIELDS, 0)
    )
    images_root = images_dir.resolve()
    ignored = _scan_images_root(images_dir, persons, problems)
    scanned: set[str] = set()
    to_verify: list[tuple[Path, str, str]] = []
    for person in persons:
        if person.person_dir is not None and person.person_dir not in scanned:
            scanned.add(person.person_dir)
            ignored += _scan_person(person, images_dir, images_root, to_verify, problems)
    if check_images:
        whys = _verify_images([p for p, _, _ in to_verify], decode=decode_images)
        for (_, where, row), why in zip(to_verify, whys, strict=True):
            if why:
                _error(problems, where, f"cannot be read as an image ({why}) {row}; replace the file")
    if _has_errors(problems):
        raise DataError(problems)
    table = _build_table(root.resolve(), persons, age_bands)
    return TrainData(table, problems, ignored, fixes, age_bands, root.resolve())


def _build_table(root: Path, persons: list[_Person], age_bands: AgeBands) -> pd.DataFrame:
    rows = []
    for person in sorted(persons, key=lambda p: p.person_dir):
        age_band = age_bands.band(person.age)
        for stem in STEM_ORDER:
            rel_path = f"{TRAIN_IMAGES}/{person.person_dir}/{person.files[stem]}"
            mask = person.masks[stem]
            rows.append(
                (
                    rel_path,
                    str(root / rel_path),
                    person.person_id,
                    person.person_dir,
                    stem,
                    mask,
                    person.gender,
                    person.age,
                    age_band,
                    encode(mask, person.gender, age_band),
                )
            )
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    for column in ("rel_path", "image_path", "person_id", "person_dir", "stem"):
        table[column] = table[column].astype(str)
    for column in ("mask", "gender", "age", "age_band", "label"):
        table[column] = table[column].astype(np.int64)
    return table


def read_eval(
    root: str | os.PathLike, check_images: bool = True, decode_images: bool = False
) -> pd.DataFrame:
    """The test images in info.csv order: columns ``image_id`` (as written) and ``image_path`` (absolute).

    Raises DataError listing every missing, duplicated, escaping or unreadable image at once.
    """
    root = Path(root)
    _check_root(root)
    problems: list[Problem] = []
    records = read_csv_records(root / EVAL_CSV, EVAL_CSV, EVAL_COLUMNS, problems)
    images_dir = root / EVAL_IMAGES
    if not images_dir.is_dir():
        _error(problems, f"{EVAL_IMAGES}/", "folder not found; put the images listed in eval/info.csv there")
    if records is None or not images_dir.is_dir():
        raise DataError(problems)
    images_root = images_dir.resolve()
    seen: dict[str, int] = {}
    image_ids, image_paths = [], []
    to_verify: list[tuple[Path, str, str]] = []
    for line, record in records:
        image_id = record["ImageID"]
        where = f"{EVAL_CSV} line {line}"
        if not image_id:
            _error(problems, where, "ImageID is empty; give the image's file name in eval/images")
            continue
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            _error(
                problems,
                where,
                f"ImageID {image_id!r} is not a plain file name; give the name in eval/images",
            )
            continue
        if image_id in seen:
            _error(
                problems,
                where,
                f"ImageID {image_id} is already on line {seen[image_id]}; list each image once",
            )
            continue
        seen[image_id] = line
        path = images_dir / image_id
        if not path.is_file():
            _error(problems, where, f"{EVAL_IMAGES}/{image_id} is missing; restore it or check the data root")
        elif not _inside(path, images_root):
            _error(
                problems, where, f"{EVAL_IMAGES}/{image_id} links outside {EVAL_IMAGES}; copy the image in"
            )
        elif check_images:
            to_verify.append((path, where, image_id))
        image_ids.append(image_id)
        image_paths.append(str(images_root / image_id))
    for (_, where, image_id), why in zip(
        to_verify, _verify_images([p for p, _, _ in to_verify], decode=decode_images), strict=True
    ):
        if why:
            _error(
                problems, where, f"{EVAL_IMAGES}/{image_id} cannot be read as an image ({why}); replace it"
            )
    if not seen and not _has_errors(problems):
        _error(problems, EVAL_CSV, "has no rows; list the test images, one ImageID per row")
    if _has_errors(problems):
        raise DataError(problems)
    return pd.DataFrame(
        {"image_id": pd.Series(image_ids, dtype=str), "image_path": pd.Series(image_paths, dtype=str)}
    )


def _count_line(title: str, names: list[str] | tuple[str, ...], counts: Counter) -> str:
    return f"{title:<12}" + " | ".join(f"{name} {counts.get(i, 0)}" for i, name in enumerate(names))


def summarize(train_data: TrainData) -> str:
    """A readable report of what was read: sizes, label counts, ignored files, fixes and warnings."""
    table, bands = train_data.table, train_data.age_bands
    persons = table.drop_duplicates("person_id")
    lines = []
    if train_data.root is not None:
        lines.append(f"data root: {train_data.root}")
    lines += [
        f"persons: {len(persons)}   images: {len(table)}   "
        f"ignored files (hidden or ._*): {train_data.ignored_files}",
        "relabel fixes: " + ", ".join(f"{kind} {count}" for kind, count in train_data.fixes.items()),
        "",
        "images per",
        _count_line("  mask", MASK_NAMES, Counter(table["mask"].tolist())),
        _count_line("  gender", GENDER_NAMES, Counter(table["gender"].tolist())),
        _count_line("  age band", bands.names, Counter(table["age_band"].tolist())),
        "persons per",
        _count_line("  gender", GENDER_NAMES, Counter(persons["gender"].tolist())),
        _count_line("  age band", bands.names, Counter(persons["age_band"].tolist())),
        "",
        f"{'class':<26}{'images':>8}{'share':>8}",
    ]
    per_class = Counter(table["label"].tolist())
    for label, name in enumerate(class_names(bands)):
        count = per_class.get(label, 0)
        share = count / len(table) if len(table) else 0.0
        lines.append(f"{label:>2} {name:<23}{count:>8}{share:>8.1%}")
    lines += ["", f"warnings: {len(train_data.problems)}"]
    lines += [f"  {problem}" for problem in train_data.problems]
    return "\n".join(lines)
