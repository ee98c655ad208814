"""The one error family: every failure a user can fix is a ``FoldtuneError`` whose message says what to do.

The CLI catches ``FoldtuneError`` alone and prints it as one ``error:`` line (exit code 2); anything else is
a bug and keeps its traceback. Each room raises its own subclass (``DataError``, ``ConfigError``, ...), so a
caller can still tell them apart, and each also keeps the built-in base it always had (``ValueError``,
``RuntimeError``), so code written against those keeps working.
"""

from __future__ import annotations


class FoldtuneError(Exception):
    """A problem the user can fix; ``str(error)`` names the file, row or field and what to change."""
