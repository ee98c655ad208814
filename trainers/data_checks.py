"""Problems in input files, found all at once: the Problem/DataError pair, CSV rows with their line numbers,
and image-file checks shared by the training and the test data.

Every check appends a ``Problem`` (severity, where, what to do) instead of raising, so a user fixing the
data sees every problem in one run, not one per run.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from PIL import Image

from trainers.errors import FoldtuneError
from trainers.labels import MASK_STEMS

MAX_AGE = 120
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


def add_error(problems: list[Problem], where: str, message: str) -> None:
    problems.append(Problem("error", where, message))


def add_warning(problems: list[Problem], where: str, message: str) -> None:
    problems.append(Problem("warning", where, message))


def has_errors(problems: list[Problem]) -> bool:
    return any(p.severity == "error" for p in problems)


def read_csv_records(
    path: Path, display: str, required: tuple[str, ...], problems: list[Problem]
) -> list[tuple[int, dict[str, str]]] | None:
    """Rows of a CSV as (line number, {column: stripped value}); None (with a problem) when unusable.

    The csv module, not pandas, so ids stay strings and every row keeps its true line number.
    """
    if not path.is_file():
        add_error(problems, display, "file not found; check the data root or create the file")
        return None
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                add_error(problems, display, f"the file is empty; it needs the header {','.join(required)}")
                return None
            header = [name.strip() for name in header]
            missing = [name for name in required if name not in header]
            if missing:
                add_error(
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
                    add_error(
                        problems,
                        f"{display} line {reader.line_num}",
                        f"has {len(row)} field(s) but the header has {len(header)}; "
                        "fix the commas or quote the value",
                    )
                    continue
                records.append((reader.line_num, {k: v.strip() for k, v in zip(header, row, strict=True)}))
    except (UnicodeDecodeError, csv.Error, OSError) as exc:
        add_error(problems, display, f"cannot be read as a UTF-8 CSV file ({exc}); re-save it as CSV")
        return None
    return records


def check_root(root: Path) -> None:
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(
            Problem("error", str(root), f"data root {what}; pass the folder that holds train/ and eval/")
        )


def parse_age(raw: str) -> int | None:
    if not re.fullmatch(r"\+?\d+", raw):
        return None
    age = int(raw)
    return age if age <= MAX_AGE else None


def inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder)


def image_opens(path: Path, decode: bool = False) -> str:
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


def verify_images(paths: list[Path], decode: bool = False) -> list[str]:
    """``image_opens`` for many files; threads, because the time goes to reading files, not to Python."""
    check = functools.partial(image_opens, decode=decode)
    if len(paths) < 64:
        return [check(path) for path in paths]
    with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(check, paths, chunksize=32))


@dataclass
class PersonRecord:
    """One row of train.csv while it is being checked; fields are None where the row's value is bad.
    Here, below ``data`` and ``relabel``, because both read and change it."""

    line: int
    person_id: str
    gender: int | None
    age: int | None
    person_dir: str | None
    masks: dict[str, int] = field(default_factory=lambda: dict(MASK_STEMS))
    files: dict[str, str] = field(default_factory=dict)  # stem -> file name
