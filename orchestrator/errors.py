"""Errors the orchestrator raises for the user to act on (the CLI prints them without a traceback)."""

from trainers.errors import FoldtuneError


class OrchestratorError(FoldtuneError, RuntimeError):
    """A search, ensemble or UI problem the user can fix; the message says what to do."""
