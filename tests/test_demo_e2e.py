"""The whole product as a person uses it: `python -m orchestrator.demo`, then the MLflow UI over its store.

Slow (a real Ray search in a subprocess, then the UI server): run with `make test-slow`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.tracking import start_ui

REPO = Path(__file__).resolve().parent.parent


def _api(port: int, path: str, payload: dict | None = None) -> dict:
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}"
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_demo_end_to_end_and_the_ui_shows_it(tmp_path):
    tracking_uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    (tmp_path / "mlruns").mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "FOLDTUNE_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "orchestrator.demo",
        "--data",
        str(tmp_path / "data"),
        "--persons",
        "16",
        "--space",
        str(REPO / "search_spaces" / "smoke.yaml"),
        "--storage",
        str(tmp_path / "runs"),
        "--trials",
        "2",
    ]
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    out = finished.stdout
    assert "ensemble OOF macro F1" in out and "submission:" in out and "make ui" in out
    submission = pd.read_csv(tmp_path / "runs" / "demo" / "submission.csv", dtype=str)
    info = pd.read_csv(tmp_path / "data" / "eval" / "info.csv", dtype=str)
    assert submission["ImageID"].tolist() == info["ImageID"].tolist()
    assert submission["ans"].astype(int).between(0, 17).all()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = start_ui(tracking_uri, port=port)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                experiment = _api(port, "experiments/get-by-name?experiment_name=demo")["experiment"]
                break
            except OSError:
                assert process.poll() is None, "mlflow ui exited"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 180 s"
                time.sleep(0.5)
        runs = _api(
            port, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
        )
        runs = runs["runs"]
        tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
        parents = [run for run, tag in zip(runs, tags, strict=True) if "mlflow.parentRunId" not in tag]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        children = [
            (run, tag)
            for run, tag in zip(runs, tags, strict=True)
            if tag.get("mlflow.parentRunId") == parent_id
        ]
        ensembles = [run for run, tag in children if tag.get("mlflow.runName") == "ensemble"]
        trials = [run for run, tag in children if tag.get("mlflow.runName") != "ensemble"]
        assert len(ensembles) == 1 and len(trials) == 2
        for trial in trials:
            metrics = {m["key"] for m in trial["data"].get("metrics", [])}
            assert {"val_f1", "fold0/val_f1", "fold1/val_f1"} <= metrics
            history = _api(port, f"metrics/get-history?run_id={trial['info']['run_id']}&metric_key=val_f1")
            assert [m["step"] for m in history["metrics"]][0] == 1
        ensemble_metrics = {m["key"] for m in ensembles[0]["data"].get("metrics", [])}
        assert any("f1" in key for key in ensemble_metrics)
    finally:
        process.terminate()
        process.wait(timeout=60)
