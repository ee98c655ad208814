"""Faults on the search side, each on the real path: nothing is lost, and the user reads one clear line.

Each test breaks one thing while a real search runs (the real driver, Ray Tune, ASHA, Optuna and MLflow,
with a stand-in trial from tests/test_search.py where training itself is not the point) and checks what
survives: the trials' results, the Optuna study, the MLflow runs (none left RUNNING) and the one line the
user is shown. Two faults of this matrix are tested in tests/test_search.py: a worker node lost
mid-search (``test_search_survives_losing_a_node``) and the driver SIGKILLed mid-trial and resumed with
real training (``test_resume_after_the_driver_is_killed``). Trainer-side faults are tests/test_faults.py.

| fault                                | test                                                            |
|--------------------------------------|-----------------------------------------------------------------|
| trial process dies mid-epoch         | test_a_trial_process_that_dies_fails_that_trial_alone           |
| exception inside tuner.fit           | test_an_exception_inside_tune_closes_every_run_and_resumes      |
| SIGTERM to the driver                | test_sigterm_ends_the_search_interrupted_with_one_line          |
| SIGKILL to the driver, then --resume | test_a_resume_after_sigkill_settles_what_was_left (slow)        |
| every trial fails                    | test_every_trial_failing_is_exit_1_with_the_first_error         |
| MLflow store unreachable at start    | test_an_unreachable_tracking_store_fails_before_ray_starts      |
| MLflow store lost mid-search         | test_losing_the_tracking_store_mid_search_loses_no_result       |
| optuna.db created by two processes   | test_opening_the_study_while_another_process_creates_it         |
| driver killed during the ensemble    | test_a_killed_ensemble_never_leaves_a_partial_submission (slow) |
| worker node lost                     | test_search.py::test_search_survives_losing_a_node (slow)       |
| driver SIGKILLed, real training      | test_search.py::test_resume_after_the_driver_is_killed          |
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import psutil
import pytest
import ray
from mlflow import MlflowClient
from ray import cloudpickle
from ray.tune import Callback
from test_search import (
    GOOD,
    STRONG,
    WEAK,
    by_ray_id,
    child_runs,
    load_study,
    snapshot_statuses,
    standin_space,
    standin_trial,
    write_space,
)

import orchestrator.search
import orchestrator.search.driver as driver
import orchestrator.tracking.search_log as search_log
from benchmarks.mlflow_outage import Server
from orchestrator.cli import main
from orchestrator.search import run_search
from orchestrator.search.constants import ASHA_STATE, EXPERIMENT_DIRNAME
from orchestrator.tracking import SearchTracking

# the tiny demo data has strata smaller than k: the split warns (FoldWarning), which is not what is tested
pytestmark = pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")

RUNNING = optuna.trial.TrialState.RUNNING
BEST = {"lr": 0.95}  # a stand-in trial better than STRONG


def search_kwargs(tmp_path: Path, tracking_uri: str) -> dict:
    return {
        "storage": tmp_path / "runs",
        "tracking_uri": tracking_uri,
        "cache_dir": tmp_path / "cache",
        "progress": False,
    }


def assert_nothing_running(search_dir: Path, tracking_uri: str) -> None:
    """No Optuna trial and no MLflow run of the search is left RUNNING."""
    running = [t.number for t in load_study(search_dir).trials if t.state == RUNNING]
    assert running == [], f"Optuna trials left RUNNING: {running}"
    parent, children = child_runs(tracking_uri)
    assert parent.info.status != "RUNNING"
    assert [i for i, r in children.items() if r.info.status == "RUNNING"] == []


def sigkill_driver(process: subprocess.Popen) -> None:
    """SIGKILL the driver (no handler of its runs), then end what its local Ray leaves behind."""
    ray_processes = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    end_driver_processes(ray_processes)


def end_driver_processes(processes: list[psutil.Process]) -> None:
    """A killed driver's local Ray: its reaper takes the cluster down, idle agents linger; end those."""
    _, lingering = psutil.wait_procs(processes, timeout=20)
    for process in lingering:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(lingering, timeout=20)


def wait_for(condition, timeout_s: float, what: str, process: subprocess.Popen | None = None, log=None):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if process is not None:
            assert process.poll() is None, (
                log.read_text()[-3000:] if log else ""
            ) + f"\nexited before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.1)


# --- trials --------------------------------------------------------------------------------------------


def test_a_trial_process_that_dies_fails_that_trial_alone(tmp_path, demo_root, tracking_uri, local_ray):
    """The weak trial's process exits mid-trial (``os._exit(1)`` after its first epoch, like a segfault or
    the OOM killer): that trial fails with the error recorded, the other two finish, MLflow has it FAILED."""
    summary = run_search(
        demo_root,
        standin_space(tmp_path / "tiny.yaml", trials=3, scheduler="none", epochs=2),
        trial_fn=standin_trial(crash_lr=WEAK["lr"]),
        **search_kwargs(tmp_path, tracking_uri),
    )
    search_dir = tmp_path / "runs" / "tiny"
    study = by_ray_id(load_study(search_dir))
    crashed = next(i for i, t in study.items() if t.params["lr"] == WEAK["lr"])
    board = summary.leaderboard.set_index("trial_id")
    assert summary.finished and summary.problem() is None and len(board) == 3
    assert board.loc[crashed, "state"] == "failed" and board.loc[crashed, "epochs"] == 1
    assert "died" in board.loc[crashed, "error"].lower(), board.loc[crashed, "error"]
    assert (board.drop(crashed)["state"] == "completed").all()
    assert study[crashed].state == optuna.trial.TrialState.FAIL
    _, children = child_runs(tracking_uri)
    assert children[crashed].info.status == "FAILED" and children[crashed].data.tags["foldtune.error"]
    assert all(r.info.status == "FINISHED" for i, r in children.items() if i != crashed)
    assert_nothing_running(search_dir, tracking_uri)


class FailOnSecondResult(Callback):
    """A fault inside Tune's loop: a driver-side callback raising while a trial is running. Tune keeps its
    callbacks with the experiment; the kept copy is disarmed, so a resume runs without the fault."""

    def __init__(self):
        self.results = 0

    def __getstate__(self) -> dict:
        return {"results": 2}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.results += 1
        if self.results == 2:
            raise RuntimeError("injected fault inside tuner.fit")


def test_an_exception_inside_tune_closes_every_run_and_resumes(
    tmp_path, demo_root, tracking_uri, local_ray, monkeypatch
):
    """An exception out of ``tuner.fit`` mid-trial: the error reaches the caller; the parent run is FAILED
    with it, the running trial's child run KILLED (interrupted), its Optuna trial FAIL (interrupted), so
    nothing is RUNNING. A resume continues the trial from its checkpoint and re-attaches it in Optuna."""
    space_file = standin_space(tmp_path / "tiny.yaml", scheduler="none")
    real_callbacks = driver._callbacks
    monkeypatch.setattr(driver, "_callbacks", lambda *a: [*real_callbacks(*a), FailOnSecondResult()])
    with pytest.raises(Exception, match="injected fault inside tuner.fit"):
        run_search(demo_root, space_file, trial_fn=standin_trial(), **search_kwargs(tmp_path, tracking_uri))
    monkeypatch.setattr(driver, "_callbacks", real_callbacks)
    search_dir = tmp_path / "runs" / "tiny"
    assert_nothing_running(search_dir, tracking_uri)
    parent, children = child_runs(tracking_uri)
    assert parent.info.status == "FAILED"
    assert "injected fault inside tuner.fit" in parent.data.tags["foldtune.error"]
    (interrupted,) = children
    assert children[interrupted].info.status == "KILLED"
    assert children[interrupted].data.tags["foldtune.interrupted"] == "true"
    closed = by_ray_id(load_study(search_dir))[interrupted]
    assert closed.state == optuna.trial.TrialState.FAIL and closed.user_attrs["interrupted"] is True

    summary = run_search(
        demo_root,
        None,
        name="tiny",
        resume=True,
        trial_fn=standin_trial(),
        **search_kwargs(tmp_path, tracking_uri),
    )
    assert summary.finished and summary.problem() is None
    assert set(summary.leaderboard["state"]) == {"completed"}
    epochs_run = (search_dir / "trials" / interrupted / "epochs.log").read_text().split()
    # continued from its last checkpoint (epoch 1: the fault came before epoch 2's was saved), not restarted
    assert epochs_run == ["1", "2", "2", "3", "4"]
    assert_nothing_running(search_dir, tracking_uri)
    parent, children = child_runs(tracking_uri)
    assert parent.info.status == "FINISHED" and set(children) == set(summary.leaderboard["trial_id"])
    assert "foldtune.error" not in parent.data.tags and parent.data.tags["foldtune.resumed"] == "true"
    assert children[interrupted].info.status == "FINISHED"
    assert "foldtune.interrupted" not in children[interrupted].data.tags
    trials = load_study(search_dir).trials  # the interrupted record stays FAIL; its copy is told the end
    resumed = [t for t in trials if t.user_attrs.get("resumed_from") == closed.number]
    assert len(resumed) == 1 and resumed[0].state == optuna.trial.TrialState.COMPLETE
    assert resumed[0].params == closed.params and resumed[0].user_attrs["ray_trial_id"] == interrupted


# --- the driver ending -------------------------------------------------------------------------------------

SUBPROCESS_DRIVER = """
import functools, sys
from ray import cloudpickle
import orchestrator.search
from orchestrator.cli import main

trial_fn_file, cache, *argv = sys.argv[1:]
with open(trial_fn_file, "rb") as handle:
    trial_fn = cloudpickle.load(handle)
orchestrator.search.run_search = functools.partial(
    orchestrator.search.run_search, trial_fn=trial_fn, cache_dir=cache, progress=False
)
sys.exit(main(argv))
"""


def start_driver(
    tmp_path: Path, trial_fn, argv: list[str], script: str = SUBPROCESS_DRIVER
) -> tuple[subprocess.Popen, Path, Path]:
    """``foldtune search ARGV`` in a subprocess whose trials run ``trial_fn``; (process, stdout, stderr).
    ``script``: the driver's program (given the pickled trial function, the cache folder and ARGV)."""
    trial_fn_file = tmp_path / "trial_fn.pkl"
    trial_fn_file.write_bytes(cloudpickle.dumps(trial_fn))
    out, err = tmp_path / "driver.out", tmp_path / "driver.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its own handles
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(trial_fn_file), str(tmp_path / "cache"), *argv],
            stdout=stdout,
            stderr=stderr,
            cwd=tmp_path,
        )
    return process, out, err


def search_argv(demo_root: Path, space_file: Path, tmp_path: Path, tracking_uri: str) -> list[str]:
    return [
        "search",
        "--data",
        str(demo_root),
        "--space",
        str(space_file),
        "--storage",
        str(tmp_path / "runs"),
        "--tracking-uri",
        tracking_uri,
    ]


def reported_epochs(search_dir: Path) -> dict[str, int]:
    """Epochs each trial has reported to the driver, by the Optuna study (the searcher heard them)."""
    if not (search_dir / "optuna.db").exists():
        return {}
    try:
        trials = load_study(search_dir).trials
    except Exception:  # the study is being created
        return {}
    return {t.user_attrs.get("ray_trial_id"): len(t.intermediate_values) for t in trials}


def test_sigterm_ends_the_search_interrupted_with_one_line(tmp_path, demo_root, tracking_uri):
    """SIGTERM to ``foldtune search`` mid-trial takes Ctrl+C's path: Tune stops and saves, the running
    trial's child run and the parent are KILLED, its Optuna trial FAIL (interrupted), the exit code is 1
    and stderr ends with the one line that says how far it got and how to continue."""
    space_file = standin_space(tmp_path / "tiny.yaml", scheduler="none")
    hold = tmp_path / "never"  # the first trial waits after epoch 1 until SIGTERM ends it
    driver_process, out, err = start_driver(
        tmp_path,
        standin_trial(hold_file=str(hold)),
        search_argv(demo_root, space_file, tmp_path, tracking_uri),
    )
    search_dir = tmp_path / "runs" / "tiny"
    try:
        wait_for(lambda: 1 in reported_epochs(search_dir).values(), 300, "first epoch", driver_process, err)
        driver_process.send_signal(signal.SIGTERM)
        code = driver_process.wait(timeout=180)
    finally:
        if driver_process.poll() is None:
            driver_process.kill()
    stderr = err.read_text()
    line = "search 'tiny' interrupted: 0 of 2 trials finished; continue with --resume"
    assert code == 1, stderr[-3000:]
    assert [x for x in stderr.splitlines() if x.startswith("search ")] == [line]
    assert "Traceback" not in stderr and "Tuner.restore" not in stderr  # foldtune's advice, not Tune's
    assert_nothing_running(search_dir, tracking_uri)
    parent, children = child_runs(tracking_uri)
    assert parent.info.status == "KILLED" and parent.data.tags["foldtune.finished"] == "false"
    (interrupted,) = children
    assert children[interrupted].data.tags["foldtune.interrupted"] == "true"
    assert by_ray_id(load_study(search_dir))[interrupted].user_attrs["interrupted"] is True


@pytest.mark.slow
def test_a_resume_after_sigkill_settles_what_was_left(tmp_path, demo_root, tracking_uri):
    """SIGKILL (no handler runs) once ASHA stopped the weak trial and a third trial is mid-way. The killed
    driver leaves RUNNING records, here also an Optuna trial and child run of a trial its last snapshot
    lost. The resume closes those first (FAIL / KILLED), keeps and finishes the trial Ray continues,
    still knows the stopped trial (the scheduler's record is read back), and leaves nothing RUNNING."""
    # the third trial is the best (never stopped); TPE would pick one ASHA may stop after the resume
    space_file = standin_space(tmp_path / "tiny.yaml", trials=3, points_to_evaluate=[STRONG, WEAK, BEST])
    hold = tmp_path / "never"
    driver_process, _, err = start_driver(
        tmp_path,
        standin_trial(hold_file=str(hold), hold_from=3),  # the third trial waits after its epoch 1
        search_argv(demo_root, space_file, tmp_path, tracking_uri),
    )
    search_dir = tmp_path / "runs" / "tiny"

    def third_midway() -> bool:
        done = [s for s in snapshot_statuses(search_dir / EXPERIMENT_DIRNAME).values() if s == "TERMINATED"]
        return len(done) == 2 and sorted(reported_epochs(search_dir).values()) == [1, 1, 4]

    try:
        wait_for(third_midway, 300, "two ended trials and a third mid-way", driver_process, err)
        time.sleep(2.5)  # one more experiment snapshot (every 2 s) with the third trial's epoch in it
        sigkill_driver(driver_process)
    finally:
        if driver_process.poll() is None:
            driver_process.kill()

    study = load_study(search_dir)
    ids = {t.params["lr"]: t.user_attrs["ray_trial_id"] for t in study.trials}
    strong, weak = ids[STRONG["lr"]], ids[WEAK["lr"]]
    (midway,) = set(ids.values()) - {strong, weak}
    assert [t.state for t in study.trials].count(RUNNING) == 1  # the third: the killed driver closed nothing
    # what a driver killed between creating a trial and snapshotting it leaves: records of a lost trial
    lost = study.ask()
    lost.set_user_attr("ray_trial_id", "lost_00009")
    parent, _ = child_runs(tracking_uri)
    tracking = SearchTracking(tracking_uri, "tiny")
    lost_run, _ = tracking.start_child(parent.info.run_id, "lost_00009", {})

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_search(
            demo_root,
            space_file,
            resume=True,
            trial_fn=standin_trial(),
            **search_kwargs(tmp_path, tracking_uri),
        )
    finally:
        ray.shutdown()
    board = summary.leaderboard.set_index("trial_id")
    assert summary.finished and summary.problem() is None
    assert board.loc[weak, "state"] == "stopped_early"  # the record survived the killed driver
    assert board.loc[strong, "state"] == board.loc[midway, "state"] == "completed"
    assert (search_dir / "trials" / midway / "epochs.log").read_text().split() == ["1", "2", "3", "4"]
    after = by_ray_id(load_study(search_dir))
    assert after[weak].state == optuna.trial.TrialState.PRUNED
    assert after[strong].state == after[midway].state == optuna.trial.TrialState.COMPLETE
    assert after["lost_00009"].state == optuna.trial.TrialState.FAIL
    assert after["lost_00009"].user_attrs["interrupted"] is True
    assert_nothing_running(search_dir, tracking_uri)
    parent, children = child_runs(tracking_uri)
    assert parent.info.status == "FINISHED"
    assert children["lost_00009"].info.run_id == lost_run and children["lost_00009"].info.status == "KILLED"
    assert (
        children[weak].info.status == "KILLED"
        and children[weak].data.tags["foldtune.stopped_early"] == "true"
    )
    assert children[midway].info.status == children[strong].info.status == "FINISHED"
    assert json.loads((search_dir / ASHA_STATE).read_text())["stopped_early"] == [weak]


# --- exit codes --------------------------------------------------------------------------------------------


def test_opening_the_study_while_another_process_creates_it(tmp_path, monkeypatch):
    """The driver opening a new optuna.db while another process (a script, a notebook, a test polling)
    creates it loses the schema-version insert (``UNIQUE constraint failed: alembic_version``): it opens
    again and finds the complete schema instead of ending the search; a persistent error still raises."""
    import sqlalchemy.exc

    from orchestrator.search.optuna_adapter import study_storage

    real = optuna.storages.RDBStorage
    lost_races = []
    lost = sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {}, Exception("UNIQUE constraint"))

    def racing(url, *args, **kwargs):  # another process creates the schema first; this one loses once
        if len(lost_races) < 1:
            real(url).remove_session()
            lost_races.append(url)
            raise lost
        return real(url, *args, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    storage = study_storage(tmp_path)
    monkeypatch.undo()  # optuna itself checks isinstance(storage, RDBStorage)
    assert len(lost_races) == 1
    study = optuna.create_study(study_name="tiny", storage=storage)
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    reread = optuna.load_study(study_name="tiny", storage=real(f"sqlite:///{tmp_path / 'optuna.db'}"))
    assert reread.best_value == 0.5

    def always_failing(url, *args, **kwargs):
        raise lost

    monkeypatch.setattr(optuna.storages, "RDBStorage", always_failing)
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        study_storage(tmp_path / "other")


def test_every_trial_failing_is_exit_1_with_the_first_error(
    tmp_path, demo_root, tracking_uri, local_ray, monkeypatch, capsys
):
    """A real search whose every trial raises: ``foldtune search`` exits 1 with one line naming the first
    error; the summary records every trial failed, and the search as finished (nothing to resume)."""
    monkeypatch.setattr(
        orchestrator.search,
        "run_search",
        functools.partial(run_search, trial_fn=standin_trial(raise_all=True), cache_dir=tmp_path / "cache"),
    )
    space_file = standin_space(tmp_path / "tiny.yaml", scheduler="none")
    code = main(search_argv(demo_root, space_file, tmp_path, tracking_uri))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("search ")]
    assert code == 1 and len(lines) == 1, err
    assert lines[0].startswith("search 'tiny': every trial failed: first error (")
    assert "RuntimeError: stand-in trial failed on purpose" in lines[0]
    saved = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert saved["finished"] is True and [t["status"] for t in saved["trials"]] == ["failed", "failed"]
    assert saved["best_trial_id"] is None
    assert_nothing_running(tmp_path / "runs" / "tiny", tracking_uri)


# --- the tracking store ---------------------------------------------------------------------------------


def test_an_unreachable_tracking_store_fails_before_ray_starts(tmp_path, demo_root, capsys):
    """A tracking URI no store can be opened at: one ``error:`` line naming it, exit 2, before Ray starts
    and before the search folder records anything (a corrected command starts cleanly)."""
    assert not ray.is_initialized()
    bad = "sqlite:////proc/nope/mlflow.db"
    space_file = standin_space(tmp_path / "tiny.yaml")
    code = main(search_argv(demo_root, space_file, tmp_path, bad))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert (
        err.startswith(f"error: MLflow tracking store {bad} cannot be opened (") and "--tracking-uri" in err
    )
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_losing_the_tracking_store_mid_search_loses_no_result(
    tmp_path, demo_root, tracking_uri, local_ray, capsys
):
    """The store's folder disappears after the first trial's first epoch was logged (a lost mount) and
    stays away: the trials go on, the search finishes with every result in its folder, the user gets one
    warning when it happens and one at the end naming `foldtune sync-mlflow`, not one per epoch. The
    records wait in the search folder; once the store is back, `foldtune sync-mlflow tiny` writes them all:
    every child run FINISHED with every epoch, the parent FINISHED with the search's results."""
    store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
    hold = tmp_path / "store-gone"
    search_dir = tmp_path / "runs" / "tiny"

    def break_store_after_first_epoch() -> None:
        def logged() -> bool:
            with contextlib.suppress(Exception):
                _, children = child_runs(tracking_uri)
                return any("val_f1" in r.data.metrics for r in children.values())
            return False

        wait_for(logged, 300, "first epoch in MLflow")
        store_dir.rename(store_dir.with_name("mlruns.gone"))
        store_dir.write_text("not a folder any more")
        hold.touch()

    breaker = threading.Thread(target=break_store_after_first_epoch, daemon=True)
    breaker.start()
    summary = run_search(
        demo_root,
        standin_space(tmp_path / "tiny.yaml", trials=3),
        trial_fn=standin_trial(hold_file=str(hold)),
        **search_kwargs(tmp_path, tracking_uri),
    )
    breaker.join(timeout=5)
    err = capsys.readouterr().err
    assert summary.finished and summary.problem() is None and len(summary.leaderboard) == 3
    assert set(summary.leaderboard["state"]) <= {"completed", "stopped_early"}
    for trial_id in summary.leaderboard["trial_id"]:
        assert (search_dir / "trials" / trial_id / "epochs.log").exists()
    assert (search_dir / "leaderboard.csv").exists() and (search_dir / "summary.json").exists()
    warnings = [line for line in err.splitlines() if line.startswith("warning: MLflow")]
    assert len(warnings) == 2, err  # when it went away; what waits at the end
    assert "the search goes on" in warnings[0]
    outbox = search_dir / "mlflow_outbox.jsonl"
    assert "record(s) wait in" in warnings[1] and str(outbox) in warnings[1]
    assert "`foldtune sync-mlflow tiny`" in warnings[1]
    kinds = [json.loads(line)["kind"] for line in outbox.read_text().splitlines()]
    assert {"trial_result", "trial_completed", "search_results"} <= set(kinds)

    assert main(["sync-mlflow", "tiny", "--storage", str(tmp_path / "runs")]) == 1  # still away: said
    assert "does not answer" in capsys.readouterr().err and outbox.exists()

    store_dir.unlink()
    store_dir.with_name("mlruns.gone").rename(store_dir)
    assert main(["sync-mlflow", "tiny", "--storage", str(tmp_path / "runs")]) == 0
    assert not (search_dir / "mlflow_outbox.jsonl").exists() or not outbox.read_text().strip()
    parent, children = child_runs(tracking_uri)
    assert sorted(children) == sorted(summary.leaderboard["trial_id"])
    client = MlflowClient(tracking_uri)
    board = summary.leaderboard.set_index("trial_id")
    for trial_id, run in children.items():
        assert run.info.status in ("FINISHED", "KILLED"), (trial_id, run.info.status)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_f1")]
        assert steps == list(range(1, int(board.loc[trial_id, "epochs"]) + 1)), (trial_id, steps)
    assert parent.info.status == "FINISHED"
    assert (
        parent.data.tags["foldtune.best_trial"] == summary.best_trial_id
        and "best_val_f1" in parent.data.metrics
    )
    assert main(["sync-mlflow", "tiny", "--storage", str(tmp_path / "runs")]) == 0  # nothing left: fine


@pytest.mark.slow
def test_a_real_mlflow_server_stopped_and_restarted_mid_search_ends_with_every_run_and_epoch(
    tmp_path, demo_root, local_ray, monkeypatch, capsys
):
    """The search's tracking server is killed after the first epoch reached it and comes back a while later,
    while trials go on. The trials never wait: the records of the outage wait in the search folder and the
    driver sends them, in order, once the server answers again. At the end nothing is RUNNING and nothing
    is missing: every child run with every epoch, the parent with the search's results, no outbox left."""
    monkeypatch.setattr(search_log, "RETRY_AFTER_S", 0.5)
    monkeypatch.setattr(search_log, "RETRY_AFTER_MAX_S", 1.0)
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server")
    back = tmp_path / "server-back"
    search_dir = tmp_path / "runs" / "tiny"
    outbox = search_dir / "mlflow_outbox.jsonl"

    def waiting_results() -> int:
        with contextlib.suppress(OSError):
            return outbox.read_text().count('"kind": "trial_result"')
        return 0

    def outage() -> None:
        def logged() -> bool:
            with contextlib.suppress(Exception):
                _, children = child_runs(server.uri)
                return any("val_f1" in r.data.metrics for r in children.values())
            return False

        wait_for(logged, 300, "first epoch in MLflow")
        server.stop()
        wait_for(lambda: waiting_results() >= 2, 300, "results waiting in the outbox")
        server.start()
        back.touch()  # later trials start now, so that some of the search runs with the server back

    server.start()
    try:
        breaker = threading.Thread(target=outage, daemon=True)
        breaker.start()
        summary = run_search(
            demo_root,
            standin_space(tmp_path / "tiny.yaml", epochs=4, trials=4),
            trial_fn=standin_trial(epoch_s=1.5, hold_file=str(back), hold_from=2),
            **search_kwargs(tmp_path, server.uri),
        )
        breaker.join(timeout=5)
        out, err = capsys.readouterr()
        assert summary.finished and summary.problem() is None and len(summary.leaderboard) == 4
        warnings = [line for line in err.splitlines() if line.startswith("warning: MLflow")]
        assert len(warnings) == 1 and "does not answer" in warnings[0] and "the search goes on" in warnings[0]
        assert f"MLflow store {server.uri} answers again:" in out
        assert not outbox.exists() or not outbox.read_text().strip()

        parent, children = child_runs(server.uri)
        client = MlflowClient(server.uri)
        board = summary.leaderboard.set_index("trial_id")
        assert sorted(children) == sorted(board.index)
        assert (board["state"] == "completed").any()
        for trial_id, run in children.items():
            assert run.info.status in ("FINISHED", "KILLED"), (trial_id, run.info.status)
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_f1")]
            assert steps == list(range(1, int(board.loc[trial_id, "epochs"]) + 1)), (trial_id, steps)
            if (search_dir / "trials" / trial_id / "result.json").exists():  # not when ASHA stopped it
                artifacts = [f.path for f in client.list_artifacts(run.info.run_id, "run")]
                assert "run/result.json" in artifacts, (trial_id, artifacts)
        assert (
            parent.info.status == "FINISHED"
            and parent.data.tags["foldtune.best_trial"] == summary.best_trial_id
        )
        assert_nothing_running(search_dir, server.uri)
    finally:
        server.stop()


# --- the ensemble ------------------------------------------------------------------------------------------

ENSEMBLE_DRIVER = """
import os, sys, time
from pathlib import Path

pause_at, flag = os.environ.get("PAUSE_AT"), os.environ.get("PAUSE_FLAG")
real_replace, real_fsync = os.replace, os.fsync


def pause():
    Path(flag).touch()
    time.sleep(600)


def replace(src, dst, *args, **kwargs):  # the checked submission renamed into place
    if pause_at == "rename" and Path(dst).name == "submission.csv":
        pause()
    return real_replace(src, dst, *args, **kwargs)


def fsync(fd):  # the pending submission's bytes written, not yet renamed
    if pause_at == "write" and ".submission.csv.pending" in os.readlink(f"/proc/self/fd/{fd}"):
        pause()
    return real_fsync(fd)


os.replace, os.fsync = replace, fsync
from orchestrator.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_ensemble_never_leaves_a_partial_submission(tmp_path, demo_root, tracking_uri):
    """``foldtune ensemble`` on a finished tiny search, SIGKILLed at random moments and while writing the
    submission (paused by the test at the two steps of the write): the submission is always absent or the
    previous one, or the complete new one, byte for byte as an uninterrupted run writes it."""
    space_file = write_space(
        tmp_path / "tiny.yaml", trials=1, epochs=1, scheduler="none", points_to_evaluate=[GOOD]
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_search(demo_root, space_file, **search_kwargs(tmp_path, tracking_uri))
    finally:
        ray.shutdown()
    assert summary.finished and summary.problem() is None
    submission = tmp_path / "runs" / "tiny" / "submission.csv"
    argv = [sys.executable, "-c", ENSEMBLE_DRIVER, "ensemble", "--data", str(demo_root), "--search", "tiny"]
    argv += ["--storage", str(tmp_path / "runs")]

    def ensemble(pause_at: str = "", kill_after_s: float | None = None) -> int | None:
        flag = tmp_path / "paused"
        flag.unlink(missing_ok=True)
        env = {**os.environ, "PAUSE_AT": pause_at, "PAUSE_FLAG": str(flag)}
        with open(tmp_path / "ensemble.log", "w") as log:  # the child keeps its own handle
            process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if pause_at:
                wait_for(flag.exists, 300, f"pause at {pause_at}", process)
            elif kill_after_s is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=kill_after_s)
            else:
                return process.wait(timeout=300)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            return process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()

    started = time.monotonic()
    assert ensemble() == 0
    took = time.monotonic() - started
    complete = submission.read_bytes()
    assert complete.startswith(b"ImageID,ans\n") and complete.count(b"\n") > 1

    rng, outcomes = random.Random(7), []
    previous = b"ImageID,ans\nprevious,0\n"
    for before in (None, previous):  # no submission yet / one from an earlier run
        for kill in ("write", "rename", *(rng.uniform(0.2, 1.0) * took for _ in range(3))):
            if before is None:
                submission.unlink(missing_ok=True)
            else:
                submission.write_bytes(before)
            if isinstance(kill, str):
                code = ensemble(pause_at=kill)
            else:
                code = ensemble(kill_after_s=kill)
            now = submission.read_bytes() if submission.exists() else None
            assert now in (before, complete), f"partial submission after a kill at {kill}: {now!r:.200}"
            outcomes.append((kill, code, "before" if now == before else "complete"))
            if isinstance(kill, str):  # killed while writing, before the rename: the earlier state
                assert code == -signal.SIGKILL and now == before
    print("ensemble kills (when, exit code, submission):", outcomes)
    assert any(code == -signal.SIGKILL for kill, code, _ in outcomes if not isinstance(kill, str))
    submission.unlink()
    assert ensemble() == 0 and submission.read_bytes() == complete  # a rerun after the kills completes
