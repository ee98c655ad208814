"""A search's MLflow records that wait for the tracking store, on disk in the search folder, in order.

Why a file and not memory: the wait can outlast the driver (a server down until the search ends, a driver
killed while it is down), and what waits must still reach MLflow then, by the next driver (``--resume``)
or by ``foldtune sync-mlflow NAME``. One JSON record per line, appended and flushed to disk; a line cut
short by a crash while it was written is skipped. An advisory lock on ``<file>.lock`` keeps a driver and a
``sync-mlflow`` from interleaving their reads and writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from trainers.io import write_text_atomic

OUTBOX_FILE = "mlflow_outbox.jsonl"


class Outbox:
    """Records waiting for MLflow, oldest first (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def waiting(self) -> bool:
        """Whether any record waits (a stat, cheap enough for every record of a search)."""
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def count(self) -> int:
        with self._locked():
            return len(self._read()[0])

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=str, allow_nan=True) + "\n"
        with self._locked(), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def drain(self, send: Callable[[dict], bool]) -> tuple[int, int, int]:
        """Hand the records to ``send`` in order while it returns True (the record reached MLflow, or will
        never: refused), keeping the rest, also when ``send`` raises. Returns (handed over, left, unreadable
        lines skipped)."""
        with self._locked():
            records, unreadable = self._read()
            handed = 0
            try:
                for record in records:
                    if not send(record):
                        break
                    handed += 1
            finally:
                rest = records[handed:]
                if rest:
                    write_text_atomic("".join(json.dumps(r, default=str) + "\n" for r in rest), self.path)
                elif self.path.exists() or unreadable:
                    self.path.unlink(missing_ok=True)
        return handed, len(rest), unreadable

    def _read(self) -> tuple[list[dict], int]:
        if not self.path.exists():
            return [], 0
        records, unreadable = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # cut short by a crash while it was written
                unreadable += 1
        return records, unreadable

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
