"""MLflow tracking from the driver: parent/child runs, per-epoch metrics, statuses, resume without duplicates.

The callback is driven here with stand-in trial objects (what Ray passes: id, config, last result, error)
against a real SQLite MLflow store; test_search.py drives it through real Ray searches.
"""

from __future__ import annotations

import json
import pickle
import socket
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient
from ray.exceptions import RayTaskError

from orchestrator.errors import OrchestratorError
from orchestrator.space import parse_space
from orchestrator.tracking import (
    MlflowTrialCallback,
    SearchLog,
    SearchTracking,
    artifact_root,
    resolve_tracking_uri,
    start_ui,
)

SPACE = parse_space(
    {
        "name": "t",
        "fixed": {"epochs": 3, "k": 2, "image_size": [32, 24]},
        "search": {"lr": {"loguniform": [1e-4, 1e-2]}, "backbone": {"choice": ["resnet10t", "lcnet_050"]}},
    }
)


class StandInTrial:
    """The parts of ``ray.tune.experiment.Trial`` the callback reads."""

    class Metadata:
        num_failures = 0

    def __init__(self, trial_id: str, config: dict, error_file: str | None = None, error=None):
        self.trial_id = trial_id
        self.config = config
        self.last_result: dict = {}
        self.run_metadata = self.Metadata()
        self.error_file = error_file
        self._error = error

    def get_pickled_error(self):
        return self._error


def epoch_result(epoch: int, f1: float) -> dict:
    """A trial's report as fit's EpochReport.flat() plus what Ray adds to every result."""
    return {
        "val_f1": f1,
        "val_loss": 2.0 - f1,
        "train_loss": float("nan"),  # never logged: MLflow gets finite values only
        "fold0/val_f1": f1 - 0.01,
        "fold1/val_f1": f1 + 0.01,
        "epoch": epoch,
        "best_f1": f1,
        "best_epoch": epoch,
        "epochs_planned": 3,
        "training_iteration": epoch,
        "time_this_iter_s": 1.5,
        "trial_id": "ignored",
        "config": {"lr": 1e-3},
        "done": False,
    }


def write_run_folder(run_dir: Path, epochs: int, finished: bool) -> None:
    """What fit leaves in a run folder (metrics CSV per epoch; result and plots when finished)."""
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "plots").mkdir()
    (run_dir / "checkpoints").mkdir()
    (run_dir / "config.yaml").write_text("lr: 0.001\n")
    (run_dir / "folds.csv").write_text("rel_path,person_id,fold\na.jpg,000001,0\n")
    rows = []
    for epoch in range(1, epochs + 1):
        for fold in ("0", "1", "mean"):
            rows.append({"epoch": epoch, "fold": fold, "val_f1": 0.1 * epoch, "val_loss": 1.0 / epoch})
    pd.DataFrame(rows).to_csv(run_dir / "metrics" / "epochs.csv", index=False)
    if finished:
        (run_dir / "plots" / "confusion.png").write_bytes(b"\x89PNG fake bytes are fine for MLflow")
        result = {"status": "completed", "message": "trained 3 epochs", "best_f1": 0.3, "best_epoch": 3}
        result.update(epochs_trained=3, oof_f1=0.28, oof_f1_tta=0.29)
        (run_dir / "result.json").write_text(json.dumps(result))


def make_callback(
    tmp_path: Path, tracking_uri: str, early_stops=()
) -> tuple[MlflowTrialCallback, SearchTracking, str]:
    tracking = SearchTracking(tracking_uri, "search-t")
    parent = tracking.start_parent(tmp_path / "runs" / "t")
    trials_dir = tmp_path / "runs" / "t" / "trials"
    log = SearchLog(tracking, parent, trials_dir.parent)
    return MlflowTrialCallback(log, SPACE.config_for, early_stops), tracking, parent


def run_dir(callback: MlflowTrialCallback, trial_id: str) -> Path:
    return callback.log.trials.run_dir(trial_id)


def children(tracking: SearchTracking, parent: str) -> dict[str, object]:
    return {run.data.tags["foldtune.trial_id"]: run for run in tracking.child_runs(parent)}


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key))


def test_tracking_uris_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    assert resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path}/rel/x.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("store.db") == f"sqlite:///{tmp_path}/store.db"
    assert resolve_tracking_uri("some/folder") == f"sqlite:///{tmp_path}/some/folder/mlflow.db"
    assert resolve_tracking_uri("http://mlflow.local:5000") == "http://mlflow.local:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/env.db"
    assert (
        artifact_root(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
        == (tmp_path / "mlruns" / "artifacts").as_uri()
    )
    assert artifact_root("http://mlflow.local:5000") is None
    with pytest.raises(OrchestratorError, match=r"file:///x.*MLFLOW_ALLOW_FILE_STORE.*sqlite:///"):
        resolve_tracking_uri("file:///x")


def test_parent_run_is_reused_for_its_search_folder(tmp_path, tracking_uri):
    tracking = SearchTracking(tracking_uri, "search-a")
    parent = tracking.start_parent(tmp_path / "runs" / "a", tags={"foldtune.search": "a"})
    tracking.finish(parent, "KILLED")  # a search interrupted before
    again = SearchTracking(tracking_uri, "search-a").start_parent(tmp_path / "runs" / "a")
    other = tracking.start_parent(tmp_path / "runs" / "b")
    client = MlflowClient(tracking_uri)
    assert again == parent != other
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags["foldtune.resumed"] == "true"
    experiment = client.get_experiment_by_name("search-a")
    assert experiment.artifact_location == f"{artifact_root(tracking_uri)}/search-a"
    child, created = tracking.start_child(parent, "t1", {})
    assert created and tracking.start_child(parent, "t1", {}) == (child, False)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_trial_lifecycle_is_logged_as_a_nested_child_run(tmp_path, tracking_uri):
    callback, tracking, parent = make_callback(tmp_path, tracking_uri)
    trial = StandInTrial("t1", {"lr": 2e-3, "backbone": "lcnet_050"})
    write_run_folder(run_dir(callback, "t1"), epochs=3, finished=True)
    callback.on_trial_start(0, [trial], trial)
    for epoch in (1, 2, 3):
        trial.last_result = epoch_result(epoch, 0.1 * epoch)
        callback.on_trial_result(0, [trial], trial, trial.last_result)
    trial.last_result["done"] = True
    callback.on_trial_complete(0, [trial], trial)

    client = MlflowClient(tracking_uri)
    run = children(tracking, parent)["t1"]
    assert run.info.status == "FINISHED"
    assert history(client, run.info.run_id, "val_f1") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert history(client, run.info.run_id, "fold1/val_f1") == [(1, 0.11), (2, 0.21), (3, 0.31)]
    metrics = run.data.metrics
    assert not {"train_loss", "time_this_iter_s", "training_iteration", "epochs_planned", "epoch"} & set(
        metrics
    )
    assert (
        metrics["final/oof_f1"] == 0.28 and metrics["final/best_f1"] == 0.3 and metrics["final/epochs"] == 3
    )
    params = run.data.params
    assert params["lr"] == "0.002" and params["backbone"] == "lcnet_050" and params["k"] == "2"
    assert params["image_size"] == "[32, 24]" and len(params) == len(SPACE.config_for(trial.config).to_dict())
    tags = run.data.tags
    assert tags["foldtune.stopped_early"] == "false" and tags["foldtune.fit_status"] == "completed"
    assert tags["foldtune.run_dir"] == str(run_dir(callback, "t1"))
    assert tags["foldtune.checkpoints"] == str(run_dir(callback, "t1") / "checkpoints")
    logged = {
        a.path
        for folder in ("run", "run/metrics", "run/plots")
        for a in client.list_artifacts(run.info.run_id, folder)
    }
    assert {"run/folds.csv", "run/config.yaml", "run/result.json", "run/metrics/epochs.csv"} <= logged
    assert "run/plots/confusion.png" in logged


def test_scheduler_stopped_trial_is_killed_with_a_tag(tmp_path, tracking_uri):
    """Which trials were stopped comes from the scheduler's record, not from a mark in the result."""
    callback, tracking, parent = make_callback(tmp_path, tracking_uri, early_stops={"t2"})
    trial = StandInTrial("t2", {"lr": 1e-4, "backbone": "resnet10t"})
    write_run_folder(run_dir(callback, "t2"), epochs=1, finished=False)
    trial.last_result = {**epoch_result(1, 0.05), "done": True}
    callback.on_trial_result(0, [trial], trial, trial.last_result)  # no on_trial_start: attached on demand
    callback.on_trial_complete(0, [trial], trial)
    run = children(tracking, parent)["t2"]
    assert run.info.status == "KILLED"
    assert (
        run.data.tags["foldtune.stopped_early"] == "true"
        and run.data.tags["foldtune.status"] == "stopped_early"
    )
    assert run.data.metrics["final/best_f1"] == 0.05 and run.data.metrics["final/epochs"] == 1


def test_failed_trial_carries_its_error(tmp_path, tracking_uri):
    callback, tracking, parent = make_callback(tmp_path, tracking_uri)
    error_file = tmp_path / "error.txt"
    error_file.write_text(
        "Failure # 1\nTraceback (most recent call last):\n  ...\nTrialFailed: loss became nan\n"
    )
    cause = RuntimeError("training loss became nan at epoch 1 in fold 0: lower lr (now 1e+06)")
    error = RayTaskError("run_trial", "Traceback ...", cause)
    trial = StandInTrial("t3", {"lr": 1e-2, "backbone": "resnet10t"}, error_file=str(error_file), error=error)
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_error(0, [trial], trial)
    run = children(tracking, parent)["t3"]
    assert run.info.status == "FAILED"
    assert run.data.tags["foldtune.error"] == f"RuntimeError: {cause}"
    assert run.data.tags["foldtune.status"] == "failed"
    client = MlflowClient(tracking_uri)
    text = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path / "dl"))).read_text()
    assert "TrialFailed: loss became nan" in text


def test_resumed_driver_reuses_child_runs_and_fills_missed_epochs(tmp_path, tracking_uri):
    callback, tracking, parent = make_callback(tmp_path, tracking_uri)
    trial = StandInTrial("t4", {"lr": 1e-3, "backbone": "resnet10t"})
    write_run_folder(run_dir(callback, "t4"), epochs=3, finished=False)
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, epoch_result(1, 0.1))
    MlflowClient(tracking_uri).set_terminated(children(tracking, parent)["t4"].info.run_id, "KILLED")

    # the driver is killed; Ray restores the pickled callback, and the trial resumes after epoch 2,
    # which fit finished (epochs.csv has it) but the dead driver never logged
    restored = pickle.loads(pickle.dumps(callback))
    restored.on_trial_start(0, [trial], trial)
    restored.on_trial_result(0, [trial], trial, epoch_result(3, 0.3))
    restored.on_trial_result(0, [trial], trial, epoch_result(3, 0.3))  # a repeated report is not re-logged

    runs = children(tracking, parent)
    assert list(runs) == ["t4"]
    run_id = runs["t4"].info.run_id
    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert history(client, run_id, "val_f1") == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert history(client, run_id, "fold0/val_f1") == [(1, 0.09), (2, 0.2), (3, 0.29)]


def test_an_unreachable_store_is_one_error_naming_it(tmp_path):
    tracking = SearchTracking("sqlite:////proc/nope/mlflow.db", "x")
    with pytest.raises(OrchestratorError) as raised:
        tracking.open()
    message = str(raised.value)
    assert message.startswith("MLflow tracking store sqlite:////proc/nope/mlflow.db cannot be opened (")
    assert "\n" not in message and "--tracking-uri" in message
    SearchTracking(f"sqlite:///{tmp_path}/new/mlflow.db", "x").open()  # a new store is created
    assert (tmp_path / "new" / "mlflow.db").exists()


def test_closing_children_keeps_the_continued_ones_and_a_reopened_run_is_not_interrupted(
    tmp_path, tracking_uri
):
    tracking = SearchTracking(tracking_uri, "search-c")
    parent = tracking.start_parent(tmp_path / "runs" / "c")
    runs = {t: tracking.start_child(parent, t, {})[0] for t in ("done", "continued", "left", "lost")}
    tracking.finish(runs["done"], "FINISHED")
    assert tracking.close_children(parent, keep={"continued"}, known={"done", "continued", "left"}) == 2
    client = MlflowClient(tracking_uri)
    status = {t: client.get_run(r).info.status for t, r in runs.items()}
    assert status == {"done": "FINISHED", "continued": "RUNNING", "left": "KILLED", "lost": "KILLED"}
    assert client.get_run(runs["left"]).data.tags["foldtune.interrupted"] == "true"
    assert client.get_run(runs["lost"]).data.tags["foldtune.orphaned"] == "true"
    tracking.reopen(runs["left"])  # resumed after all
    reopened = client.get_run(runs["left"])
    assert reopened.info.status == "RUNNING" and "foldtune.interrupted" not in reopened.data.tags


def test_ui_needs_an_existing_store(tmp_path):
    with pytest.raises(OrchestratorError, match=r"no MLflow store at .*missing.db: run a search first"):
        start_ui(f"sqlite:///{tmp_path}/missing.db")


@pytest.mark.slow
def test_ui_serves_the_store_on_localhost(tmp_path, tracking_uri):
    SearchTracking(tracking_uri, "visible").start_parent(tmp_path / "runs" / "v")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = start_ui(tracking_uri, port=port)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                url = (
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=visible"
                )
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = json.loads(response.read())
                break
            except OSError:
                assert process.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 120 s"
                time.sleep(0.5)
        assert body["experiment"]["name"] == "visible"
        assert body["experiment"]["artifact_location"] == f"{artifact_root(tracking_uri)}/visible"
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_search_writes_its_ui_view_and_the_ui_links_to_it(tmp_path, tracking_uri):
    """The view MLflow's UI reads from the experiment tag (tests/test_ui.py renders it): the searched
    parameters and both F1 metrics as columns, sorted by best F1, the F1-per-epoch charts first."""
    import json

    from orchestrator.tracking.ui_view import VIEW_TAG, search_links, view_url, write_search_view

    tracking = SearchTracking(tracking_uri, "viewed")
    write_search_view(tracking, ["backbone", "lr"])
    assert SearchTracking(tracking_uri, "not-a-search").experiment_id  # an experiment without the view
    state = json.loads(tracking.client.get_experiment(tracking.experiment_id).tags[VIEW_TAG])
    columns = ["metrics.`best_f1`", "metrics.`val_f1`", "params.`backbone`", "params.`lr`"]
    assert state["selectedColumns"] == columns
    assert state["orderByKey"] == "metrics.`best_f1`" and state["orderByAsc"] is False
    assert [c["metricKey"] for c in state["compareRunCharts"]] == ["val_f1", "best_f1"]
    assert state["isAccordionReordered"] is True
    link = view_url("http://h:1", tracking.experiment_id)
    assert link == (
        f"http://h:1/#/experiments/{tracking.experiment_id}/runs?workflowType=machine_learning"
        "&viewStateShareKey=foldtune"
    )
    assert search_links(tracking_uri, "http://h:1") == [("viewed", link)]


OPEN_STORE = """
import sys, time
from orchestrator.tracking.store import SearchTracking
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # every process opens at the same moment
SearchTracking(sys.argv[1], "x").open()
"""


def test_searches_started_at_once_on_a_new_sqlite_store_all_open_it(tmp_path):
    """Two searches started together on a fresh SQLite store used to race creating its tables (the
    second: "table runs already exists", and it stopped); the first open now holds a lock beside it."""
    import subprocess
    import sys

    for attempt in range(2):
        uri = f"sqlite:///{tmp_path / f'store{attempt}' / 'mlflow.db'}"
        start = f"{time.time() + 4:.3f}"  # after every interpreter has imported MLflow
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_STORE, uri, start],
                cwd=Path(__file__).resolve().parents[1],
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(3)
        ]
        errors = [p.communicate(timeout=120)[1] for p in processes]
        assert [p.returncode for p in processes] == [0, 0, 0], errors
        assert (tmp_path / f"store{attempt}" / "mlflow.db.lock").is_file()
        assert MlflowClient(uri).search_experiments()  # one store, its tables made once
