"""A full disk during a search stops it cleanly with one line, and ``--resume`` loses nothing
(``orchestrator.search.disk_full``).

ENOSPC is injected at each writer of a search: a trial's own writes (the stand-in trial raises it, as
``trainers.io`` does when a checkpoint does not fit), Optuna's ``optuna.db``, Tune's experiment snapshot
and the search folder's leaderboard. Each time the search ends with ``DiskFull`` (the one line the CLI
prints, exit 1), nothing is left RUNNING, and the resumed search finishes every trial without training a
finished epoch again.
"""

from __future__ import annotations

import errno
import json
import sqlite3
from pathlib import Path

import optuna
import pandas as pd
import pytest
import sqlalchemy.exc
from test_faults_search import assert_nothing_running, search_kwargs
from test_search import standin_space, standin_trial

import orchestrator.search.summary as summary_module
from orchestrator.search import run_search
from orchestrator.search.disk_full import DiskFull, full_disk_path, stopped_line
from trainers.io import DiskFullError, write_text_atomic


def full_disk_trial(full_flag: str | None = None):
    """The stand-in trial of tests/test_search.py (val_f1 = lr each epoch, a marker checkpoint, continued
    from it when resumed); with ``full_flag``, the first trial to reach epoch 2 finds the disk full there."""
    return standin_trial(full_flag=full_flag)


def test_a_full_disk_is_recognised_in_every_form_a_search_meets():
    assert full_disk_path(OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/last.pt")) == (
        "/data/runs/x/last.pt"
    )
    assert full_disk_path(OSError(errno.EDQUOT, "Disk quota exceeded")) == ""
    written = DiskFullError(
        "no space left on the disk of /data/runs/x/trials/t1 while writing last.pt (the previous version is "
        "kept); free space there (or move the folder) and run the same command again to continue"
    )
    assert full_disk_path(written) == "/data/runs/x/trials/t1"
    sqlite_full = sqlalchemy.exc.OperationalError(
        "UPDATE trials", {}, sqlite3.OperationalError("database or disk is full")
    )
    assert full_disk_path(sqlite_full) == ""
    try:  # wrapped, as Ray wraps a trial's error
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/tmp/x")
        except OSError as inner:
            raise RuntimeError("The Ray Tune run failed") from inner
    except RuntimeError as outer:
        assert full_disk_path(outer) == "/tmp/x"
    assert full_disk_path(RuntimeError("[Errno 28] No space left on device: '/nfs/runs/a/b.csv'")) == (
        "/nfs/runs/a/b.csv"
    )
    assert full_disk_path(OSError(errno.EACCES, "Permission denied", "/x")) is None
    assert full_disk_path(RuntimeError("loss is nan")) is None


def test_the_line_names_the_folder_what_is_free_and_about_what_the_trials_left_need(tmp_path):
    search_dir = tmp_path / "runs" / "s"
    for trial, size in (("t1", 3000), ("t2", 5000)):
        write_text_atomic("x" * size, search_dir / "trials" / trial / "checkpoints" / "fold0.pt")
    line = stopped_line("s", str(search_dir / "trials" / "t2" / "last.pt"), search_dir, planned=6, finished=2)
    assert line.startswith(
        f"search 's' stopped: no space left on the disk of {search_dir / 'trials' / 't2'} ("
    )
    assert " free there; about 19.5 KiB more for the 4 trial(s) left)" in line or "4 trial(s) left" in line
    assert line.endswith("continue with --resume (nothing finished is lost)") and "\n" not in line


def run_until_full(tmp_path, demo_root, trial_fn) -> DiskFull:
    with pytest.raises(DiskFull) as stopped:
        run_search(
            demo_root,
            standin_space(tmp_path / "tiny.yaml", trials=3),
            trial_fn=trial_fn,
            **search_kwargs(tmp_path, tracking_uri_of(tmp_path)),
        )
    return stopped.value


def tracking_uri_of(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"


def resume_to_the_end(tmp_path, demo_root):
    summary = run_search(
        demo_root,
        standin_space(tmp_path / "tiny.yaml", trials=3),
        trial_fn=full_disk_trial(),
        resume=True,
        **search_kwargs(tmp_path, tracking_uri_of(tmp_path)),
    )
    assert summary.finished and summary.problem() is None and len(summary.leaderboard) == 3
    assert set(summary.leaderboard["state"]) <= {"completed", "stopped_early"}
    return summary


def epochs_trained(search_dir: Path) -> dict[str, list[int]]:
    return {
        log.parent.name: [int(line) for line in log.read_text().split()]
        for log in (search_dir / "trials").glob("*/epochs.log")
    }


@pytest.fixture
def store(tmp_path, tracking_uri):
    """The test's MLflow store (the conftest's copy), where ``tracking_uri_of`` finds it."""
    assert tracking_uri == tracking_uri_of(tmp_path)
    return tracking_uri


def test_a_trial_that_fills_the_disk_stops_the_search_and_resume_continues_it(
    tmp_path, demo_root, store, local_ray
):
    search_dir = tmp_path / "runs" / "tiny"
    stopped = run_until_full(tmp_path, demo_root, full_disk_trial(str(tmp_path / "full-once")))
    line = str(stopped)
    assert line.startswith("search 'tiny' stopped: no space left on the disk of ") and "\n" not in line
    full_trial = next(name for name, epochs in epochs_trained(search_dir).items() if epochs == [1])
    assert f"{search_dir / 'trials' / full_trial} (" in line and line.endswith("(nothing finished is lost)")
    assert_nothing_running(search_dir, store)

    summary = resume_to_the_end(tmp_path, demo_root)
    trained = epochs_trained(search_dir)
    assert trained[full_trial][:4] == [1, 2, 3, 4][: len(trained[full_trial])]  # continued at epoch 2
    assert all(epochs == sorted(set(epochs)) for epochs in trained.values())  # no epoch trained twice
    assert full_trial in set(summary.leaderboard["trial_id"])


def optuna_db_full(monkeypatch):
    """The first trial outcome written to ``optuna.db`` finds its disk full (as SQLite says it)."""
    from optuna.storages import RDBStorage

    real = RDBStorage.set_trial_state_values
    calls = {"n": 0}

    def set_trial_state_values(self, trial_id, state, values=None):
        if state.is_finished():
            calls["n"] += 1
            if calls["n"] == 1:
                raise sqlalchemy.exc.OperationalError(
                    "UPDATE trials", {}, sqlite3.OperationalError("database or disk is full")
                )
        return real(self, trial_id, state, values)

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", set_trial_state_values)


def tune_snapshot_full(monkeypatch):
    from ray.tune.execution.tune_controller import TuneController

    real = TuneController.save_to_dir
    calls = {"n": 0}

    def save_to_dir(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(
                errno.ENOSPC, "No space left on device", str(Path(self.experiment_path) / "state.json")
            )
        return real(self)

    monkeypatch.setattr(TuneController, "save_to_dir", save_to_dir)


def leaderboard_full(monkeypatch):
    real = summary_module.write_csv_atomic

    def write_csv_atomic(table, path, *args, **kwargs):
        if Path(path).name == "leaderboard.csv":
            raise DiskFullError(
                f"no space left on the disk of {Path(path).parent} while writing leaderboard.csv"
            )
        return real(table, path, *args, **kwargs)

    monkeypatch.setattr(summary_module, "write_csv_atomic", write_csv_atomic)


@pytest.mark.parametrize("writer", [optuna_db_full, tune_snapshot_full, leaderboard_full])
def test_a_full_disk_under_the_driver_stops_the_search_and_resume_finishes_it(
    tmp_path, demo_root, store, local_ray, monkeypatch, writer
):
    """Finished trials are never trained again and Optuna ends with one COMPLETE or PRUNED record per
    trial. (A trial running when Tune's snapshot failed goes back to the last snapshot that was written;
    the stand-in keeps its progress only there, where fit's node-local resume state would continue it.)"""
    search_dir = tmp_path / "runs" / "tiny"
    with monkeypatch.context() as patch:
        writer(patch)
        stopped = run_until_full(tmp_path, demo_root, full_disk_trial())
    line = str(stopped)
    assert line.startswith("search 'tiny' stopped: no space left on the disk of ") and "\n" not in line
    assert "--resume" in line
    assert_nothing_running(search_dir, store)
    finished_before = {
        trial: epochs
        for trial, epochs in epochs_trained(search_dir).items()
        if (search_dir / "trials" / trial / "result.json").exists()
    }

    summary = resume_to_the_end(tmp_path, demo_root)
    after = epochs_trained(search_dir)
    assert all(after[trial] == epochs for trial, epochs in finished_before.items()), (finished_before, after)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{search_dir / 'optuna.db'}")
    outcome = {
        t.user_attrs["ray_trial_id"]: t.state.name
        for t in study.trials
        if t.state.name in ("COMPLETE", "PRUNED")
    }
    assert sorted(outcome) == sorted(summary.leaderboard["trial_id"]), [
        (t.number, t.state, t.user_attrs) for t in study.trials
    ]


def trial_whose_resume_state_fills_the_disk(full_flag: str, at_write: int = 2):
    """``run_trial`` itself (a real k-fold fit), in a trial process where the ``at_write``-th write of the
    resume state ``last.pt`` finds the disk full, once (``trainers.io``'s real atomic writer sees ENOSPC
    mid-write, removes its temporary file and raises ``DiskFullError``)."""

    def trial(params, context) -> None:
        import contextlib
        import errno
        from pathlib import Path

        import trainers.io as io
        from orchestrator.search.trial import run_trial

        real_open, writes = io.atomic_open, {"n": 0}

        @contextlib.contextmanager
        def atomic_open(path, mode="wb", encoding=None):
            if Path(path).name == "last.pt" and not Path(full_flag).exists():
                writes["n"] += 1
                if writes["n"] == at_write:
                    Path(full_flag).touch()
                    with real_open(path, mode, encoding):
                        raise OSError(errno.ENOSPC, "No space left on device")
            with real_open(path, mode, encoding) as handle:
                yield handle

        io.atomic_open = atomic_open
        try:
            run_trial(params, context)
        finally:
            io.atomic_open = real_open

    trial.__name__ = "run_trial"
    return trial


@pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")  # strata of the tiny data < k
def test_a_real_trial_whose_resume_state_fills_the_disk_continues_from_the_last_one_written(
    tmp_path, demo_root, store, local_ray
):
    from test_search import write_space

    search_dir = tmp_path / "runs" / "tiny"
    space = write_space(
        tmp_path / "tiny.yaml",
        epochs=3,
        trials=1,
        scheduler="none",
        search={"backbone": {"choice": ["resnet10t"]}, "lr": {"choice": [0.01]}},
    )
    kwargs = {
        **search_kwargs(tmp_path, store),
        "trial_fn": trial_whose_resume_state_fills_the_disk(str(tmp_path / "full")),
    }
    with pytest.raises(DiskFull) as stopped:
        run_search(demo_root, space, **kwargs)
    line = str(stopped.value)
    assert "no space left on the disk of " in line and "--resume" in line and "\n" not in line
    (trial_id,) = [p.name for p in (search_dir / "trials").iterdir()]
    assert not (search_dir / "trials" / trial_id / "result.json").exists()
    assert_nothing_running(search_dir, store)

    summary = run_search(demo_root, space, resume=True, **kwargs)
    assert summary.finished and list(summary.leaderboard["state"]) == ["completed"]
    result = json.loads((search_dir / "trials" / trial_id / "result.json").read_text())
    assert result["status"] == "completed" and result["epochs_trained"] == 3
    progress = pd.read_csv(next((search_dir / "tune").glob(f"*{trial_id}*/progress.csv")))
    assert list(progress["epoch"]) == [1, 2, 3]  # epoch 1 kept, epoch 2 (whose resume state failed) again


def test_foldtune_search_prints_the_line_alone_and_exits_1(tmp_path, monkeypatch, capsys):
    import orchestrator.search
    from orchestrator.cli import main

    line = "search 's' stopped: no space left on the disk of /x (1.0 KiB free there; ...); free space ..."

    def run_search(**kwargs):
        raise DiskFull(line)

    monkeypatch.setattr(orchestrator.search, "run_search", run_search)
    assert main(["search", "--data", str(tmp_path), "--space", "auto"]) == 1
    assert capsys.readouterr().err == line + "\n"
