"""Which errors mean a full disk, and the notice board on which trials and the searcher say so to the
driver (``disk_full``): a named Ray actor that holds the notices in memory, since the disk may have no
room for them. Below ``disk_full`` so that the Optuna adapter can post too."""

from __future__ import annotations

import errno
import hashlib
import re
from pathlib import Path

import ray

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
FULL_TEXTS = (
    "no space left on device",
    "disk quota exceeded",
    "database or disk is full",
    "no space left on the disk of",
)


def full_disk_path(error: BaseException) -> str | None:
    """None when ``error`` is not a full disk; else the path its chain names ("" when none)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FULL_ERRNOS:
            return str(current.filename or "")
        text = str(current)
        if any(mark in text.lower() for mark in FULL_TEXTS):
            named = re.search(r"no space left on the disk of (.+?) while writing", text)
            if named:
                return named.group(1)
            named = re.search(r"\[Errno (?:28|122)\] [^:]*: '([^']+)'", text)
            return named.group(1) if named else ""
        pending += [current.__cause__, current.__context__, getattr(current, "cause", None)]
        pending.append(getattr(current, "orig", None))  # SQLAlchemy's wrapped DB-API error
    return None


def notices_name(search_dir: Path) -> str:
    return "foldtune-disk-full-" + hashlib.sha1(str(Path(search_dir).absolute()).encode()).hexdigest()[:16]


@ray.remote(num_cpus=0)
class _Notices:
    """What trials say about full disks, held in memory (the disk may have no room for it)."""

    def __init__(self) -> None:
        self.notices: list[dict] = []

    def add(self, notice: dict) -> None:
        self.notices.append(notice)

    def all(self) -> list[dict]:
        return list(self.notices)


def open_notices(search_dir: Path):
    """The driver's notice board for this search's trials (one per search and Ray job)."""
    return _Notices.options(name=notices_name(search_dir), get_if_exists=True, lifetime=None).remote()


def read_notices(board) -> list[dict]:
    try:
        return ray.get(board.all.remote(), timeout=30)
    except Exception:  # a board that went away knows nothing: the search goes on as it would
        return []


def post_notice(search_dir: Path | str, notice: dict) -> bool:
    """Tell the driver of the search in ``search_dir``; False when no driver listens (a search started
    before this existed, or outside a driver)."""
    try:
        ray.get(ray.get_actor(notices_name(search_dir)).add.remote(notice), timeout=30)
    except Exception:
        return False
    return True
