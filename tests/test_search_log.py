"""A search never waits for MLflow and loses nothing it meant to write there (``tracking.search_log``).

The store stops answering for real in these tests: a SQLite store whose folder is replaced by a file (a
lost mount), or a TCP port that accepts and drops every connection (a tracking server gone bad). Records
wait in the search folder's outbox, in order, and reach MLflow when it answers again, by the driver itself
or by ``foldtune sync-mlflow``; sent twice (a crash while sending), they write nothing twice. A search
against a real ``mlflow server`` stopped and restarted mid-search is in tests/test_faults_search.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from test_tracking import StandInTrial, epoch_result, history, make_callback, run_dir, write_run_folder

import orchestrator.tracking.search_log as search_log
from orchestrator.cli import main
from orchestrator.tracking import SearchLog, SearchTracking
from orchestrator.tracking.outbox import OUTBOX_FILE, Outbox
from orchestrator.tracking.store import store_answers


@pytest.fixture
def quick_retries(monkeypatch):
    """Ask the store again at every record instead of every 30 s; no pause before a second try."""
    monkeypatch.setattr(search_log, "RETRY_AFTER_S", 0.0)
    monkeypatch.setattr(search_log, "REFUSED_RETRY_S", 0.0)


def take_store_away(tracking_uri: str) -> Path:
    """The store's folder is gone and a file stands in its place (a lost mount); returns the folder."""
    folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    folder.rename(folder.with_name("mlruns.away"))
    folder.write_text("not a folder any more")
    return folder


def bring_store_back(folder: Path) -> None:
    folder.unlink()
    folder.with_name("mlruns.away").rename(folder)


def start(callback, trials) -> None:
    for trial in trials:
        callback.on_trial_start(0, trials, trial)


def report(callback, trials, epochs) -> None:
    """Each trial reports ``epochs`` (val_f1 = epoch / 10)."""
    for epoch in epochs:
        for trial in trials:
            trial.last_result = epoch_result(epoch, 0.1 * epoch)
            callback.on_trial_result(0, trials, trial, trial.last_result)


def complete(callback, trials) -> None:
    for trial in trials:
        callback.on_trial_complete(0, trials, trial)


def standins(callback, *ids) -> list[StandInTrial]:
    trials = [StandInTrial(t, {"lr": 1e-3, "backbone": "resnet10t"}) for t in ids]
    for trial in trials:
        write_run_folder(run_dir(callback, trial.trial_id), epochs=3, finished=True)
    return trials


def logged(tracking: SearchTracking, parent: str) -> dict[str, tuple[str, list]]:
    """trial id -> (status, val_f1 history) as MLflow has them."""
    client = MlflowClient(tracking.tracking_uri)
    return {
        run.data.tags["foldtune.trial_id"]: (run.info.status, history(client, run.info.run_id, "val_f1"))
        for run in tracking.child_runs(parent)
    }


def test_records_wait_in_order_while_the_store_is_away_and_are_sent_when_it_is_back(
    tmp_path, tracking_uri, capsys, quick_retries
):
    callback, tracking, parent = make_callback(tmp_path, tracking_uri)
    trials = standins(callback, "t1", "t2")
    start(callback, trials)
    report(callback, trials, epochs=[1])
    folder = take_store_away(tracking_uri)
    away_from = time.time() * 1000
    report(callback, trials, epochs=[2, 3])  # the trials go on; so does their record
    outbox = Outbox(tmp_path / "runs" / "t" / OUTBOX_FILE)
    assert [(r["trial_id"], r["epoch"]) for r in outbox._read()[0]] == [
        ("t1", 2), ("t2", 2), ("t1", 3), ("t2", 3)
    ]  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: MLflow store {tracking_uri} does not answer (")
    assert "the search goes on" in err[0] and str(outbox.path) in err[0]

    bring_store_back(folder)
    complete(callback, trials)  # the next record finds the store answering: what waits goes first
    assert not outbox.waiting()
    assert "answers again: 4 waiting record(s) sent" in capsys.readouterr().out
    runs = logged(tracking, parent)
    assert runs == {t: ("FINISHED", [(1, 0.1), (2, 0.2), (3, 0.3)]) for t in ("t1", "t2")}
    client = MlflowClient(tracking_uri)
    run_id = tracking.find_child(parent, "t1")
    late = [m for m in client.get_metric_history(run_id, "val_f1") if m.step == 2]
    assert late[0].timestamp <= time.time() * 1000 and late[0].timestamp >= away_from - 1  # when measured
    assert callback.log.finish() == 0 and capsys.readouterr().err == ""


def test_what_still_waits_at_the_end_is_one_line_and_sync_mlflow_sends_it(
    tmp_path, tracking_uri, capsys, quick_retries
):
    """The store is away until after the search: its end says what waits and how to send it; the command
    fails in one line while the store is away, then sends everything once; sending the same records again
    (a crash before the outbox was rewritten) writes nothing twice."""
    callback, tracking, parent = make_callback(tmp_path, tracking_uri)
    trials = standins(callback, "t1", "t2")
    folder = take_store_away(tracking_uri)
    start(callback, trials)
    report(callback, trials, epochs=[1, 2, 3])
    complete(callback, trials)
    callback.log.runs_closed()
    capsys.readouterr()
    assert callback.log.finish() == 11  # 2 starts, 6 results, 2 completions, the closing of the rest
    (end,) = capsys.readouterr().err.splitlines()
    assert f"{tracking_uri} does not answer since " in end and "11 record(s) wait in" in end
    assert "`foldtune sync-mlflow t` sends them" in end

    storage = str(tmp_path / "runs")
    record = {"tracking_uri": tracking_uri, "experiment_name": tracking.experiment_name}
    (tmp_path / "runs" / "t" / "tracking.json").write_text(json.dumps(record))  # as the search wrote it
    assert main(["sync-mlflow", "t", "--storage", storage]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"MLflow store {tracking_uri} does not answer: 11 record(s) of search 't'")
    bring_store_back(folder)
    kept = (tmp_path / "runs" / "t" / OUTBOX_FILE).read_bytes()
    assert main(["sync-mlflow", "t", "--storage", storage]) == 0
    assert "11 waiting MLflow record(s) sent" in capsys.readouterr().out
    expected = {t: ("FINISHED", [(1, 0.1), (2, 0.2), (3, 0.3)]) for t in ("t1", "t2")}
    assert logged(tracking, parent) == expected
    assert main(["sync-mlflow", "t", "--storage", storage]) == 0
    assert "no MLflow record waits" in capsys.readouterr().out

    (tmp_path / "runs" / "t" / OUTBOX_FILE).write_bytes(kept)  # as if killed after sending, before rewriting
    assert main(["sync-mlflow", "t", "--storage", storage]) == 0
    assert logged(tracking, parent) == expected  # no epoch twice, the same statuses
    client = MlflowClient(tracking_uri)
    params = client.get_run(tracking.find_child(parent, "t1")).data.params
    assert params["lr"] == "0.001" and params["backbone"] == "resnet10t"


def test_a_refused_record_is_said_once_and_never_holds_up_the_rest(
    tmp_path, tracking_uri, capsys, monkeypatch, quick_retries
):
    """The store answers but refuses one trial's metrics (MLflow's 400): nothing waits, the other trial is
    logged in full, and the search's end says in one line what was refused."""
    callback, tracking, parent = make_callback(tmp_path, tracking_uri)
    trials = standins(callback, "t5", "t6")
    real = tracking.log_metrics
    refused_run = {}

    def refusing(run_id, metrics, step=0, time_ms=None):
        if run_id == refused_run.setdefault("id", tracking.find_child(parent, "t5")):
            raise MlflowException("metric value refused", INVALID_PARAMETER_VALUE)
        return real(run_id, metrics, step=step, time_ms=time_ms)

    start(callback, trials)
    monkeypatch.setattr(tracking, "log_metrics", refusing)
    report(callback, trials, epochs=[1, 2, 3])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: MLflow refused the trial_result record of t5:")
    assert not (tmp_path / "runs" / "t" / OUTBOX_FILE).exists()
    assert logged(tracking, parent)["t6"] == ("RUNNING", [(1, 0.1), (2, 0.2), (3, 0.3)])
    assert callback.log.finish() == 0
    (end,) = capsys.readouterr().err.splitlines()
    assert end.startswith("warning: MLflow refused some records of the search: trial_result of 1;")


class DroppingServer:
    """A TCP port that accepts and drops every connection (a tracking server gone bad), counting them."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.socket.settimeout(0.2)
        self.connections = 0
        self.stopped = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def _serve(self) -> None:
        while not self.stopped:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.stopped = True
        self.thread.join(timeout=5)
        self.socket.close()


def test_a_server_gone_bad_costs_one_attempt_per_retry_period_not_minutes_per_call(tmp_path, monkeypatch):
    """MLflow's defaults retry each call 7 times with backoff (minutes while a server drops connections);
    the search's writes try once, and while the store does not answer, later records go straight to the
    outbox: 20 records cost one write attempt and one health check, not 20 x 8 connections."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    server = DroppingServer()
    try:
        tracking = SearchTracking(server.uri, "gone-bad")
        log = SearchLog(tracking, "parent-run", tmp_path / "runs" / "s")
        assert not store_answers(server.uri)
        server.connections = 0
        for epoch in range(1, 21):
            log.record("trial_result", trial_id="t1", epoch=epoch, metrics={"val_f1": epoch / 100})
        assert server.connections <= 3, server.connections  # the write (one try) and the health check
        assert Outbox(tmp_path / "runs" / "s" / OUTBOX_FILE).count() == 20
    finally:
        server.close()


def test_a_store_that_stays_away_is_asked_less_and_less_often_and_at_once_when_it_is_back(
    tmp_path, monkeypatch
):
    """A hung server costs the driver up to ``PROBE_TIMEOUT_S`` per ask: asked after 30 s, then 60, 120,
    240, then every 300 s while it stays away (a clock the test moves; a record every 10 s for an hour);
    once it answers and what waited is sent, a later outage starts again at 30 s."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    clock = {"now": 1000.0}
    monkeypatch.setattr(search_log.time, "monotonic", lambda: clock["now"])
    asks: list[float] = []
    answers = {"now": False}

    def store_answers(uri, timeout_s=5):
        assert timeout_s == search_log.PROBE_TIMEOUT_S
        asks.append(clock["now"] - 1000.0)
        return answers["now"]

    monkeypatch.setattr(search_log, "store_answers", store_answers)
    server = DroppingServer()
    try:
        log = SearchLog(SearchTracking(server.uri, "hung"), "parent-run", tmp_path / "runs" / "s", tell=False)
        for tick in range(360):
            clock["now"] = 1000.0 + 10 * tick
            log.record("trial_result", trial_id="t1", epoch=tick + 1, metrics={"val_f1": 0.5})
        first_write_ask = asks.pop(0)  # the failed first write asks once whether the store answers at all
        assert first_write_ask == 0
        assert asks == [30, 90, 210, 450, 750, 1050, 1350, 1650, 1950, 2250, 2550, 2850, 3150, 3450], asks
        assert log._retry_after == search_log.RETRY_AFTER_MAX_S
    finally:
        server.close()
    sent: list[dict] = []
    monkeypatch.setitem(search_log.WRITERS, "trial_result", lambda log, record: sent.append(record))
    answers["now"] = True
    clock["now"] += 300
    assert log.send_waiting() and len(sent) == 360
    assert log._retry_after == search_log.RETRY_AFTER_S


def test_a_line_cut_short_by_a_crash_is_skipped_and_the_rest_is_kept(tmp_path):
    outbox = Outbox(tmp_path / OUTBOX_FILE)
    for number in range(3):
        outbox.append({"kind": "trial_result", "number": number})
    with open(outbox.path, "a") as handle:
        handle.write('{"kind": "trial_res')  # the driver died while writing this line
    seen = []
    assert outbox.drain(lambda record: seen.append(record["number"]) or record["number"] < 2) == (2, 1, 1)
    assert seen == [0, 1, 2] and [r["number"] for r in outbox._read()[0]] == [2]
    assert outbox.drain(lambda record: True) == (1, 0, 0) and not outbox.path.exists()


def test_a_search_started_before_records_resumes_with_its_pickled_callbacks(tmp_path, tracking_uri):
    """Tune keeps callbacks with the experiment: one pickled by the previous version (tracking,
    parent_run_id, trials_dir) becomes a callback with a search log on the same run and folder."""
    from orchestrator.search.closing import SettleLeftovers
    from orchestrator.tracking.trials import MlflowTrialCallback

    tracking = SearchTracking(tracking_uri, "old")
    parent = tracking.start_parent(tmp_path / "runs" / "old")
    callback = MlflowTrialCallback.__new__(MlflowTrialCallback)
    callback.__setstate__(
        {
            "tracking": tracking,
            "parent_run_id": parent,
            "trials_dir": tmp_path / "runs" / "old" / "trials",
            "config_for": lambda params: None,
            "early_stops": (),
            "_runs": {},
            "_logged_epoch": {},
        }
    )
    assert callback.log.parent_run_id == parent and callback.log.search_dir == tmp_path / "runs" / "old"
    settle = SettleLeftovers.__new__(SettleLeftovers)
    settle.__setstate__(
        {"search_dir": tmp_path / "runs" / "old", "study_name": "old", "tracking": tracking,
         "parent_run_id": parent, "_settled": False}
    )  # fmt: skip
    assert settle.log.parent_run_id == parent
    callback.log.record("trial_result", trial_id="t1", epoch=1, metrics={"val_f1": 0.5})
    assert logged(tracking, parent)["t1"][1] == [(1, 0.5)]
