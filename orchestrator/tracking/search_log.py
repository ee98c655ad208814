"""Every MLflow write of a search after its parent run is open, as a record: written now, or kept on disk
until the tracking store answers again. The search never waits for MLflow.

Why: a tracking server that goes down mid-search used to stall the whole Tune loop (MLflow retries each
call for minutes, and the driver makes several calls per trial result) and lose what it could not write.
Now each write fails fast (no retries, 10 s timeout, unless the user set MLflow's own settings); when the
store does not work, the record goes to ``mlflow_outbox.jsonl`` in the search folder and so does every
later one, to keep their order. The store is asked again (a read that creates nothing, ``PROBE_TIMEOUT_S``
at most) after ``RETRY_AFTER_S``, then after twice as long each time, up to ``RETRY_AFTER_MAX_S``, so that
a hung server costs the driver a few seconds an hour, not a fixed share of its time; when it answers,
what waits is sent in order, then writing goes on directly. What still waits when the search ends is
sent by ``foldtune sync-mlflow NAME``, the next ``--resume`` or ``ensemble``. A record the store refuses
(it answered, and said no) is not kept: one warning line, and the search folder has the result anyway.

Records are plain JSON (``kind`` plus fields, the parent run and the time), written by ``trial_runs`` (a
trial's child run) and ``search_runs`` (the parent run); both write nothing twice when a record is sent
again, so a crash while sending loses nothing and duplicates nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.tracking import search_runs
from orchestrator.tracking.outbox import OUTBOX_FILE, Outbox
from orchestrator.tracking.store import (
    SearchTracking,
    error_line,
    fail_fast_http,
    quiet_store_errors,
    store_answers,
)
from orchestrator.tracking.trial_runs import TrialRuns

RETRY_AFTER_S = 30.0  # a store that stopped answering is asked again after this, then twice as long each
RETRY_AFTER_MAX_S = 300.0  # time it still does not answer, up to this
PROBE_TIMEOUT_S = 2  # asking a server whether it answers: a hung one costs the driver this, no more
WRITE_TIMEOUT_S = 10  # one HTTP write to a tracking server, at most
REFUSED_RETRY_S = 0.5  # a write the answering store failed is tried once more after this


def refused(error: BaseException) -> bool:
    """A write the store answered with "no" (MLflow's 4xx error codes: a bad or conflicting value, a run
    that does not exist) or that can never succeed (a bug in what was sent), as opposed to a store that is
    not working (a connection error, a timeout, a 5xx, a database it cannot open), which is worth waiting
    for."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return 400 <= error.get_http_status_code() < 500
    return isinstance(error, TypeError | ValueError | KeyError | AttributeError | LookupError)


class SearchLog:
    """The MLflow side of one running search (see the module docstring): ``record(kind, **fields)``.

    Picklable (Ray keeps callbacks with the experiment): what it knows of the store's state starts over
    in each process; the outbox file is the shared truth.
    """

    def __init__(
        self,
        tracking: SearchTracking,
        parent_run_id: str,
        search_dir: Path,
        name: str = "",
        tell: bool = True,
    ):
        self.tracking = tracking
        self.tell = tell  # say when the store stops and starts answering (the caller says it otherwise)
        self.parent_run_id = parent_run_id
        self.search_dir = Path(search_dir).absolute()
        self.name = name or self.search_dir.name
        self.outbox = Outbox(self.search_dir / OUTBOX_FILE)
        self.trials = TrialRuns(tracking, self.search_dir / "trials")
        self._reset()

    def _reset(self) -> None:
        self._down_since: float | None = None  # wall time the store stopped answering, while it does not
        self._next_try = 0.0  # monotonic time to ask the store again
        self._retry_after = RETRY_AFTER_S  # the wait before that, doubled at each unanswered ask
        self._refused: dict[str, set[str]] = {}  # kind -> trial ids (or "search") whose record was refused
        self._sent_late = 0
        self._unkept = 0  # records neither written nor kept (the outbox could not be written)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for key in ("_down_since", "_next_try", "_retry_after", "_refused", "_sent_late", "_unkept"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # --- what the search records ------------------------------------------------------------------------

    def record(self, kind: str, **fields: Any) -> Any:
        """Write one record now, or keep it for later (then None); returns what the write returned."""
        if kind not in WRITERS:
            raise ValueError(f"unknown MLflow record kind {kind!r}")
        record = {"kind": kind, "parent_run_id": self.parent_run_id, "time_ms": int(time.time() * 1000)}
        record.update(fields)
        if self.outbox.waiting() and not self.send_waiting():
            self._keep(record)  # after what waits: records keep their order
            return None
        return self._send(record, keep=True)[1]

    def runs_closed(self, keep: Collection[str] = (), known: Collection[str] | None = None) -> int:
        """Child runs still RUNNING, except ``keep``'s, become KILLED (``interrupted``; ``orphaned`` when
        ``known`` is given and their trial is not in it); how many (0 when the record waits)."""
        closed = self.record("runs_closed", keep=sorted(keep), known=None if known is None else sorted(known))
        return closed or 0

    def checkpoints_deleted(self, trial_ids: Iterable[str]) -> None:
        self.record("checkpoints_deleted", trial_ids=sorted(trial_ids))

    def search_results(self, summary, rows: list[dict], plots: list[Path], states: Iterable[str]) -> None:
        """The parent run's results (``search_runs.results_record``), and it is closed."""
        self.record("search_results", **search_runs.results_record(summary, rows, plots, states))

    def search_closed(self, error: BaseException) -> None:
        """A driver ending on ``error`` (an exception, Ctrl+C, SIGTERM) closes what it opened: children
        still RUNNING KILLED (``interrupted``), the parent KILLED (interruption) or FAILED with the error."""
        interrupted = isinstance(error, KeyboardInterrupt)
        message = None if interrupted else f"{type(error).__name__}: {error_line(error)}"
        self.record("search_closed", interrupted=interrupted, error=message)

    # --- sending ------------------------------------------------------------------------------------------

    def send_waiting(self, now: bool = False) -> bool:
        """Send what waits in the outbox, in order, if the store answers (asked at most every
        ``RETRY_AFTER_S`` unless ``now``). True when nothing waits afterwards."""
        if not now and time.monotonic() < self._next_try:
            return False
        if not store_answers(self.tracking.tracking_uri, timeout_s=PROBE_TIMEOUT_S):
            self._went_down(None)
            return False
        sent, left, unreadable = self.outbox.drain(self._send_waiting_record)
        self._sent_late += sent
        if unreadable:
            print(
                f"warning: {unreadable} line(s) of {self.outbox.path} were cut short by a crash and skipped",
                file=sys.stderr,
                flush=True,
            )
        if left == 0 and self._down_since is not None and self.tell:
            print(
                f"MLflow store {self.tracking.tracking_uri} answers again: {self._sent_late} waiting "
                "record(s) sent",
                flush=True,
            )
            self._down_since = None
        if left == 0:
            self._retry_after = RETRY_AFTER_S
        return left == 0

    def _send_waiting_record(self, record: dict) -> bool:
        """For the outbox: True when the record is done with (written, or refused for good)."""
        done, _ = self._send(record, keep=False)
        return done

    def _send(self, record: dict, keep: bool) -> tuple[bool, Any]:
        """(done with it, what the write returned). A store that is not working keeps the record (in the
        outbox when ``keep``; the caller leaves it there otherwise); a refusal is told once."""
        try:
            return True, self._write(record)
        except Exception as error:
            failure = error
        if not refused(failure) and store_answers(self.tracking.tracking_uri, timeout_s=PROBE_TIMEOUT_S):
            time.sleep(REFUSED_RETRY_S)  # the store answers: a passing hiccup gets one more try
            try:
                return True, self._write(record)
            except Exception as error:
                failure = error
        if refused(failure):
            self._refuse(record, failure)
            return True, None
        self._went_down(failure)
        if keep:
            self._keep(record)
        return False, None

    def _keep(self, record: dict) -> None:
        """Into the outbox; when even that cannot be written (a full disk), the record is dropped with one
        warning and the search goes on: its folder keeps every result, and a full disk stops the search
        cleanly where the trials and Tune write (``search.disk_full``)."""
        try:
            self.outbox.append(record)
        except OSError as error:
            if not self._unkept:
                print(
                    f"warning: MLflow record(s) of the search cannot be kept for later in {self.outbox.path} "
                    f"({error}); the search folder keeps every result",
                    file=sys.stderr,
                    flush=True,
                )
            self._unkept += 1

    def _write(self, record: dict) -> Any:
        with fail_fast_http(WRITE_TIMEOUT_S), quiet_store_errors():
            return WRITERS[record["kind"]](self, record)

    def _went_down(self, error: BaseException | None) -> None:
        if self._down_since is not None:  # asked again, still away
            self._retry_after = min(self._retry_after * 2, RETRY_AFTER_MAX_S)
        self._next_try = time.monotonic() + self._retry_after
        if self._down_since is not None:
            return
        self._down_since = time.time()
        if not self.tell:
            return
        why = f" ({type(error).__name__}: {error_line(error)})" if error is not None else ""
        print(
            f"warning: MLflow store {self.tracking.tracking_uri} does not answer{why}; the search goes on, "
            f"its MLflow records wait in {self.outbox.path} and are sent when the store answers",
            file=sys.stderr,
            flush=True,
        )

    def _refuse(self, record: dict, error: BaseException) -> None:
        if not self._refused:
            print(
                f"warning: MLflow refused the {record['kind']} record of "
                f"{record.get('trial_id', 'the search')}: {type(error).__name__}: {error_line(error)}; not "
                f"logged (the search folder {self.search_dir} keeps every result)",
                file=sys.stderr,
                flush=True,
            )
        self._refused.setdefault(record["kind"], set()).add(str(record.get("trial_id", "search")))

    def finish(self) -> int:
        """At the driver's end: send what waits if the store answers; one line for what still waits and
        one for what was refused. Returns how many records still wait."""
        waiting = 0
        if self.outbox.waiting():
            self.send_waiting(now=True)
            waiting = self.outbox.count()
        if waiting:
            since = f" since {datetime.fromtimestamp(self._down_since):%H:%M:%S}" if self._down_since else ""
            print(
                f"warning: MLflow store {self.tracking.tracking_uri} does not answer{since}: {waiting} "
                f"record(s) wait in {self.outbox.path}; `foldtune sync-mlflow {self.name}` sends them when "
                "it does (so does the next --resume)",
                file=sys.stderr,
                flush=True,
            )
        if self._refused:
            parts = ", ".join(f"{kind} of {len(ids)}" for kind, ids in self._refused.items())
            print(
                f"warning: MLflow refused some records of the search: {parts}; the search folder "
                f"{self.search_dir} has all results (leaderboard.csv, summary.json, trials/)",
                file=sys.stderr,
                flush=True,
            )
            self._refused = {}
        return waiting


def sync_search(search_dir: Path) -> tuple[int, int, str]:
    """``foldtune sync-mlflow NAME``: send the records a search left waiting to the store it was started
    with (its ``tracking.json``). Returns (sent, still waiting, the store's URI)."""
    import json

    from orchestrator.errors import OrchestratorError

    record = Path(search_dir) / "tracking.json"
    try:
        saved = json.loads(record.read_text())
        tracking = SearchTracking(saved["tracking_uri"], saved["experiment_name"])
    except FileNotFoundError:
        raise OrchestratorError(
            f"{record} not found: no search started in {search_dir}; pass the NAME and --storage it used"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise OrchestratorError(
            f"{record} is unreadable ({error}); it names the search's MLflow store"
        ) from None
    sent, left = send_outbox(Path(search_dir), tracking)
    return sent, left, tracking.tracking_uri


def send_outbox(search_dir: Path, tracking: SearchTracking) -> tuple[int, int]:
    """``foldtune sync-mlflow``, and any command about to write a search's parent run: send the records
    the search's drivers left waiting, in order. Returns (sent, still waiting)."""
    log = SearchLog(tracking, "", search_dir, tell=False)
    if not log.outbox.waiting():
        return 0, 0
    log.send_waiting(now=True)
    return log._sent_late, log.outbox.count()


def _trial(method: str):
    def write(log: SearchLog, record: dict) -> Any:
        fields = {
            k: v for k, v in record.items() if k not in ("kind", "parent_run_id", "time_ms", "trial_id")
        }
        if method == "result":
            fields["time_ms"] = record["time_ms"]
        return getattr(log.trials, method)(record["parent_run_id"], record["trial_id"], **fields)

    return write


def _search(function):
    def write(log: SearchLog, record: dict) -> Any:
        fields = {k: v for k, v in record.items() if k not in ("kind", "parent_run_id", "time_ms")}
        return function(log.tracking, record["parent_run_id"], **fields)

    return write


WRITERS = {  # record kind -> its write; the one list of what a search records in MLflow
    "trial_started": _trial("started"),
    "trial_result": _trial("result"),
    "trial_completed": _trial("completed"),
    "trial_promoted": _trial("promoted"),
    "trial_retried": _trial("retried"),
    "trial_failed": _trial("failed"),
    "runs_closed": _search(search_runs.close_runs),
    "checkpoints_deleted": _search(search_runs.mark_checkpoints_deleted),
    "search_results": _search(search_runs.write_results),
    "search_closed": _search(search_runs.write_closed),
}
