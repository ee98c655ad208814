"""The MLflow UI as a person sees it: `foldtune ui` on a small store, the experiment page rendered by headless
Chromium, which must open on the training runs (not MLflow 3's GenAI pages). Slow; skipped without
Chromium (Debian's `chromium` package: `apt-get install chromium`). The screenshot is kept in
`tests/artifacts/mlflow_ui_runs.png` (git-ignored) for a person to look at."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking.provenance import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from orchestrator.tracking.store import SearchTracking
from orchestrator.tracking.ui import experiment_url, start_ui

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(port: int, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the MLflow UI exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the MLflow UI did not answer on port {port} within {timeout_s} s")


def _chromium(url: str, out: Path, *what: str) -> str:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={out.parent / 'chromium-profile'}",
        "--window-size=1400,900",
        "--virtual-time-budget=20000",
    ]
    done = subprocess.run([CHROMIUM, *flags, *what, url], capture_output=True, text=True, timeout=180)
    return done.stdout


def test_the_ui_opens_on_the_training_runs(tmp_path):
    store = tmp_path / "mlruns" / "mlflow.db"
    tracking = SearchTracking(f"sqlite:///{store}", "ui-check")
    experiment_id = tracking.experiment_id
    experiment = tracking.client.get_experiment(experiment_id)
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND  # what MLflow 3's UI reads
    parent = tracking.start_parent(tmp_path / "runs" / "ui-check")
    for trial in ("trial_a1b2", "trial_c3d4"):
        run_id, _ = tracking.start_child(parent, trial, {})
        tracking.log_metrics(run_id, {"val_f1": 0.4}, step=1)
        tracking.finish(run_id, "FINISHED")
    tracking.finish(parent, "FINISHED")

    port = _free_port()
    process = start_ui(f"sqlite:///{store}", port=port)
    try:
        _wait_until_up(port, process)
        url = experiment_url(f"http://127.0.0.1:{port}", experiment_id)
        ARTIFACTS.mkdir(exist_ok=True)
        screenshot = ARTIFACTS / "mlflow_ui_runs.png"
        dom = _chromium(url, tmp_path / "x", "--dump-dom")
        _chromium(url, tmp_path / "x", f"--screenshot={screenshot}")
    finally:
        process.terminate()
        process.wait(timeout=30)
    (ARTIFACTS / "mlflow_ui_runs.html").write_text(dom)
    visible = re.sub(r"<style[^>]*>.*?</style>", " ", dom, flags=re.S)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", visible))
    assert "Runs - Experiment" in text  # the page title: the runs table, not the GenAI "Overview"
    assert "3 matching runs" in text and "ui-check" in text  # the parent run, listed by name (trials nested)
    assert "Run Name" in text and "Observability" not in text  # model-training sidebar, not GenAI's
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
