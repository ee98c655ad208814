"""Signals, in one place: what SIGTERM does while a command runs.

The CLI turns SIGTERM into ``Terminated`` (a KeyboardInterrupt) raised where the command is, so its
``finally`` blocks close MLflow runs and remove staging folders, exactly as Ctrl-C would; the search, while
Tune runs, sends it down Ctrl-C's path instead (Tune's graceful stop). Both install their handler with
``on_sigterm``, which puts the previous one back. Only the main thread can set signal handlers: elsewhere
``on_sigterm`` changes nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, like Ctrl-C: its ``finally`` blocks close its MLflow runs,
    remove its staging folders and keep the previous output (a killed process would run none of them)."""


def raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def on_sigterm(handler: Callable) -> Iterator[None]:
    """``handler`` for SIGTERM for the duration of the block (the main thread only), then the previous one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
