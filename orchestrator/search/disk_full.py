"""A full disk stops the search cleanly, with one line naming where and how much, and loses nothing.

Why not let it fail where it happens: in a trial, a full disk is not the trial's fault, yet Tune would
mark it failed (and retry it, onto the same full disk); in the driver, Tune's snapshot, ``optuna.db`` and
the search folder's files would end in a traceback. Instead:

- a trial whose writes hit a full disk (``ENOSPC``/``EDQUOT``, SQLite's "database or disk is full", a
  ``trainers.io.DiskFullError``) tells the driver through a small named Ray actor, which needs no disk, and
  waits; the driver's ``DiskFullStop`` callback sees the notice and asks Tune for its graceful stop (as
  Ctrl+C does), so every trial stops where its last checkpoint is, and is continued by ``--resume``;
- a full disk in the driver itself (any exception whose chain says so) ends the same way;
- both end with ``DiskFull``, whose message is the line to show: the path, what is free there, about how
  much the trials left need (the largest trial folder so far, times the trials not finished), and
  ``--resume``.

Atomic writes (``trainers.io``) keep the previous checkpoint whole, so the resumed trial continues from the
last epoch that was written.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import ray
from ray.tune import Callback

from orchestrator.search.budget import interrupt_tune
from orchestrator.search.closing import SearchInterrupted
from orchestrator.search.disk_notices import full_disk_path, notices_name, post_notice, read_notices
from orchestrator.search.summary import folder_bytes, human_bytes
from trainers.io import existing_parent

WAIT_FOR_STOP_S = 600.0  # a trial that told the driver waits this long to be stopped, then fails
POLL_S = 1.0  # how often the driver asks for notices


class DiskFull(SearchInterrupted):
    """The search stopped because a disk is full; the message is the one line (see the module docstring)."""


def guard_trial(trial_fn, search_dir: Path):
    """``trial_fn`` that, when the disk fills up, tells the driver and waits to be stopped (instead of
    failing); a closure so Ray ships it by value. Keeps ``trial_fn``'s name, which Tune's restore checks."""
    search_dir_text = str(Path(search_dir).absolute())

    def guarded(params, context) -> None:
        try:
            return trial_fn(params, context)
        except Exception as error:
            path = full_disk_path(error)
            if path is None:
                raise
            from ray import tune

            notice = {
                "trial_id": tune.get_context().get_trial_id(),
                "path": path or search_dir_text,
                "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
            }
            if not post_notice(search_dir_text, notice):  # no driver listens: fail as before
                raise
            deadline = time.monotonic() + WAIT_FOR_STOP_S
            while time.monotonic() < deadline:  # the driver stops this trial; its checkpoint stays the last
                time.sleep(0.5)
            raise

    guarded.__name__ = getattr(trial_fn, "__name__", "trial")
    guarded.__qualname__ = getattr(trial_fn, "__qualname__", guarded.__name__)
    return guarded


class DiskFullStop(Callback):
    """Asks Tune for its graceful stop once a trial said its disk is full (``guard_trial``)."""

    def __init__(self, search_dir: Path):
        self.search_dir = Path(search_dir).absolute()
        self._next_poll = 0.0
        self._asked = False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_next_poll": 0.0, "_asked": False}

    def on_step_end(self, iteration, trials, **info) -> None:
        if self._asked or time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + POLL_S
        try:
            board = ray.get_actor(notices_name(self.search_dir))
        except ValueError:  # not opened by this driver
            return
        if read_notices(board):
            self._asked = True
            if not interrupt_tune():  # no Tune handler here (driver off the main thread): end the loop
                raise DiskFull("a trial's disk is full")


def stopped_line(name: str, path: str, search_dir: Path, planned: int, finished: int) -> str:
    """The one line: where the disk is full, what is free there, about what the trials left need."""
    where = Path(path or search_dir)
    if where.suffix and not where.is_dir():  # a file's path: its folder is what the user frees
        where = where.parent
    free = shutil.disk_usage(existing_parent(where)).free
    left = max(planned - finished, 1)
    per_trial = max((folder_bytes(folder) for folder in (search_dir / "trials").glob("*")), default=0)
    need = (
        f"about {human_bytes(per_trial * left)} more for the {left} trial(s) left"
        if per_trial
        else ("room for at least one trial's checkpoints")
    )
    return (
        f"search '{name}' stopped: no space left on the disk of {where} ({human_bytes(free)} free there; "
        f"{need}); free space there and continue with --resume (nothing finished is lost)"
    )
