"""Read and validate the competition data into one tidy table, one row per image.

Every later step (folds, cache, training, ensemble) trusts this table, so every problem in the data is
found here, before any compute, and reported all at once, each with its file, its row and what to do.

Layout under the data root::

    train/train.csv         id,gender,race,age,path   (race is not used)
    train/images/<path>/    mask1..mask5, incorrect_mask, normal, each .jpg, .jpeg or .png
    eval/info.csv           ImageID,ans               (ans is not used)
    eval/images/<ImageID>

Hidden files and macOS ``._*`` resource forks are skipped and counted (``TrainData.ignored_files``).
Row numbers in messages are line numbers of the CSV file (the header is line 1). Label fixes: see
trainers.relabel (``read_train(..., relabel=PATH)``).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from trainers.data_checks import (
    MAX_AGE,
    DataError,
    PersonRecord,
    Problem,
    add_error,
    add_warning,
    check_root,
    has_errors,
    inside,
    parse_age,
    read_csv_records,
    verify_images,
)
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
from trainers.relabel import RELABEL_FIELDS, apply_relabel

TRAIN_CSV = "train/train.csv"
TRAIN_IMAGES = "train/images"
EVAL_CSV = "eval/info.csv"
EVAL_IMAGES = "eval/images"
TRAIN_COLUMNS = ("id", "gender", "age", "path")
EVAL_COLUMNS = ("ImageID",)
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


@dataclass
class TrainData:
    """The validated training table plus what reading it found along the way."""

    table: pd.DataFrame
    problems: list[Problem] = field(default_factory=list)  # warnings only
    ignored_files: int = 0
    fixes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RELABEL_FIELDS, 0))
    age_bands: AgeBands = field(default_factory=AgeBands)
    root: Path | None = None


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


def _parse_person(line: int, record: dict[str, str], problems: list[Problem]) -> PersonRecord:
    person_id = record["id"]
    where = f"{TRAIN_CSV} line {line}" + (f" (id {person_id})" if person_id else "")
    person = PersonRecord(line, person_id, None, None, None)
    if not person_id:
        add_error(problems, where, "id is empty; give every person a unique id")
    gender = record["gender"].lower()
    if gender in GENDER_CODES:
        person.gender = GENDER_CODES[gender]
    else:
        add_error(problems, where, f"gender {record['gender']!r} is not male or female; write male or female")
    person.age = parse_age(record["age"])
    if person.age is None:
        add_error(
            problems, where, f"age {record['age']!r} is not an integer 0..{MAX_AGE}; write the age in years"
        )
    person.person_dir, why = _relative_folder(record["path"])
    if person.person_dir is None:
        add_error(problems, where, why)
    return person


def _read_persons(records: list[tuple[int, dict[str, str]]], problems: list[Problem]) -> list[PersonRecord]:
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
                    add_warning(
                        problems, where, f"duplicate of line {first_line} (identical); kept line {first_line}"
                    )
                    continue
            elif line == first_line:
                differing = sorted({k for _, other in same_id for k in first if other[k] != first[k]})
                add_error(
                    problems,
                    where,
                    f"id {record['id']} appears on lines {lines} with different {', '.join(differing)}; "
                    "keep one row per person (give the other person its own id)",
                )
        persons.append(_parse_person(line, record, problems))
    by_dir: dict[str, list[PersonRecord]] = defaultdict(list)
    for person in persons:
        if person.person_dir is not None:
            by_dir[person.person_dir].append(person)
    for person_dir, owners in by_dir.items():
        ids = sorted({p.person_id for p in owners})
        if len(ids) > 1:
            lines = ", ".join(str(p.line) for p in owners)
            add_error(
                problems,
                f"{TRAIN_CSV} lines {lines}",
                f"ids {', '.join(ids)} share the folder {person_dir!r}; each person needs its own folder",
            )
    return persons


def _scan_person(
    person: PersonRecord,
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
        add_error(
            problems, where, f"{what} {row}; restore the person's folder or remove the row from train.csv"
        )
        return 0
    if not inside(folder, images_root):
        add_error(
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
        add_error(problems, where, f"cannot be listed ({exc.strerror}) {row}; check the folder's permissions")
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
        add_error(
            problems,
            where + name,
            f"unexpected {kind} {row}: a person folder holds only {_EXPECTED_IMAGES}; {hint}",
        )
    for stem in STEM_ORDER:
        names = found.get(stem, [])
        if len(names) > 1:
            add_error(
                problems,
                where,
                f"{stem} is there {len(names)} times ({', '.join(names)}) {row}; "
                "keep one and delete the others",
            )
        for name in names:
            path = folder / name
            if not path.is_file():
                add_error(problems, where + name, f"is not a regular file {row}; replace it with the image")
            elif symlinks[name] and not inside(path, images_root):  # resolve() only links: it is slow
                add_error(
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
        add_error(
            problems,
            where,
            f"missing image(s) {', '.join(missing)} {row}; each person needs {_EXPECTED_IMAGES}",
        )
    return ignored


def _scan_images_root(images_dir: Path, persons: list[PersonRecord], problems: list[Problem]) -> int:
    """Warn about folders nobody in train.csv uses; count hidden entries at the top of train/images."""
    listed = {p.person_dir.split("/")[0] for p in persons if p.person_dir is not None}
    ignored, unlisted, stray = 0, [], []
    try:
        entries = list(os.scandir(images_dir))
    except OSError as exc:
        add_error(
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
            add_warning(
                problems,
                f"{TRAIN_IMAGES}/",
                f"{len(names)} {what} not listed in train.csv are not used: {shown}; "
                "add rows to train.csv if they belong to the data",
            )
    return ignored


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
    check_root(root)
    problems: list[Problem] = []
    records = read_csv_records(root / TRAIN_CSV, TRAIN_CSV, TRAIN_COLUMNS, problems)
    images_dir = root / TRAIN_IMAGES
    if not images_dir.is_dir():
        add_error(problems, f"{TRAIN_IMAGES}/", "folder not found; put one folder per person in train/images")
    if records is None or not images_dir.is_dir():
        raise DataError(problems)
    persons = _read_persons(records, problems)
    if not persons and not has_errors(problems):
        add_error(problems, TRAIN_CSV, "has no rows; add one row per person")
    fixes = (
        apply_relabel(Path(relabel), persons, problems)
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
        whys = verify_images([p for p, _, _ in to_verify], decode=decode_images)
        for (_, where, row), why in zip(to_verify, whys, strict=True):
            if why:
                add_error(problems, where, f"cannot be read as an image ({why}) {row}; replace the file")
    if has_errors(problems):
        raise DataError(problems)
    table = _build_table(root.resolve(), persons, age_bands)
    return TrainData(table, problems, ignored, fixes, age_bands, root.resolve())


def _build_table(root: Path, persons: list[PersonRecord], age_bands: AgeBands) -> pd.DataFrame:
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
    check_root(root)
    problems: list[Problem] = []
    records = read_csv_records(root / EVAL_CSV, EVAL_CSV, EVAL_COLUMNS, problems)
    images_dir = root / EVAL_IMAGES
    if not images_dir.is_dir():
        add_error(
            problems, f"{EVAL_IMAGES}/", "folder not found; put the images listed in eval/info.csv there"
        )
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
            add_error(problems, where, "ImageID is empty; give the image's file name in eval/images")
            continue
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            add_error(
                problems,
                where,
                f"ImageID {image_id!r} is not a plain file name; give the name in eval/images",
            )
            continue
        if image_id in seen:
            add_error(
                problems,
                where,
                f"ImageID {image_id} is already on line {seen[image_id]}; list each image once",
            )
            continue
        seen[image_id] = line
        path = images_dir / image_id
        if not path.is_file():
            add_error(
                problems, where, f"{EVAL_IMAGES}/{image_id} is missing; restore it or check the data root"
            )
        elif not inside(path, images_root):
            add_error(
                problems, where, f"{EVAL_IMAGES}/{image_id} links outside {EVAL_IMAGES}; copy the image in"
            )
        elif check_images:
            to_verify.append((path, where, image_id))
        image_ids.append(image_id)
        image_paths.append(str(images_root / image_id))
    for (_, where, image_id), why in zip(
        to_verify, verify_images([p for p, _, _ in to_verify], decode=decode_images), strict=True
    ):
        if why:
            add_error(
                problems, where, f"{EVAL_IMAGES}/{image_id} cannot be read as an image ({why}); replace it"
            )
    if not seen and not has_errors(problems):
        add_error(problems, EVAL_CSV, "has no rows; list the test images, one ImageID per row")
    if has_errors(problems):
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
