"""The MLflow UI as a person sees it after a real search: `foldtune ui` over the search's store, pages
rendered by headless Chromium (driven through its DevTools protocol), which must open on the training runs
(not MLflow 3's GenAI pages) in foldtune's view: the trials sorted by best F1 with their searched
parameters, and a chart of validation F1 per epoch. Slow; skipped without Chromium (Debian's `chromium`
package: `apt-get install chromium`). The screenshots are kept in `tests/artifacts/` (git-ignored) for a
person to look at; README's are copies of them."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.search import run_search
from orchestrator.tracking.provenance import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
from orchestrator.tracking.store import SearchTracking
from orchestrator.tracking.ui import start_ui, stop_ui
from orchestrator.tracking.ui_view import VIEW_TAG, search_links, view_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
SEARCHED = ["backbone", "lr", "focal_gamma", "freeze_depth"]

CLOSE_PANELS = """
for (const id of ['mlflow.assistant.chat_panel.close', 'mlflow.experiment_page.shared_view.dismiss']) {
  const button = document.querySelector(`[data-component-id='${id}']`);
  if (button) button.click();
}"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)"),
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "exited before it answered"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer within {timeout_s} s")


async def _render(origin: str, pages: list[tuple[str, Path]], settle_s: float = 10.0) -> list[str]:
    """Open each page in headless Chromium and save a 1600×900 screenshot; returns each page's text.

    MLflow 3.17 opens its Assistant panel on a browser's first visit and shows a banner over a shared view;
    both are closed (as a person would) before the picture is taken."""
    import aiohttp

    port = _free_port()
    profile = tempfile.mkdtemp(prefix="foldtune-chromium-")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
    flags += ["--disable-background-networking", "--disable-component-update", f"--user-data-dir={profile}"]
    browser = subprocess.Popen(
        [CHROMIUM, *flags, f"--remote-debugging-port={port}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    texts = []
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/json/version", browser)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5))
        page = next(t for t in targets if t["type"] == "page")
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as socket_,
        ):
            calls = iter(range(1, 1_000_000))

            async def call(method: str, **params):
                number = next(calls)
                await socket_.send_json({"id": number, "method": method, "params": params})
                async for message in socket_:
                    answer = json.loads(message.data)
                    if answer.get("id") == number:
                        assert "error" not in answer, answer
                        return answer["result"]
                raise AssertionError(f"Chromium closed the connection during {method}")

            async def evaluate(expression: str):
                return (await call("Runtime.evaluate", expression=expression, returnByValue=True))["result"]

            await call("Page.enable")
            await call(
                "Emulation.setDeviceMetricsOverride",
                width=1600,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            for url, out in pages:
                await call("Page.navigate", url=url)
                await asyncio.sleep(settle_s)
                await evaluate(CLOSE_PANELS)
                await asyncio.sleep(1.5)
                shot = await call("Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(shot["data"]))
                texts.append((await evaluate("document.body.innerText"))["value"])
    finally:
        browser.kill()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return texts


@pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")  # strata of the tiny data < k
def test_the_ui_opens_a_real_search_on_its_trials_and_their_f1_per_epoch(tmp_path, local_ray):
    from orchestrator.demo.data import write_demo_data

    data = tmp_path / "data"
    write_demo_data(data, persons=24, eval_persons=2, image_size=(48, 64))
    space = tmp_path / "ui-demo.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": "ui-demo",
                "trials": 4,
                "fixed": {"epochs": 4, "k": 2, "image_size": [32, 24], "batch_size": 16, "pretrained": False},
                "search": {
                    "backbone": {"choice": ["resnet10t", "lcnet_050"]},
                    "lr": {"loguniform": [1e-3, 3e-2]},
                    "focal_gamma": {"uniform": [0.0, 3.0]},
                    "freeze_depth": {"int": [0, 1]},
                },
                "resources": {"cpu": 1, "gpu": 0},
                "max_concurrent": 2,
                "scheduler": "none",
                "sampler": {"seed": 3, "n_startup_trials": 2},
                "keep_top": 2,
                "max_failures": 0,
            }
        )
    )
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    summary = run_search(
        data, space, storage=tmp_path / "runs", tracking_uri=store, cache_dir=tmp_path / "c", progress=False
    )
    assert summary.finished and len(summary.leaderboard) == 4
    tracking = SearchTracking(store, "ui-demo")
    experiment = tracking.client.get_experiment(tracking.experiment_id)
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND  # what MLflow 3's UI reads
    assert VIEW_TAG in experiment.tags

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_ui(store, port=port)
    ARTIFACTS.mkdir(exist_ok=True)
    runs_png, chart_png = ARTIFACTS / "mlflow_search_runs.png", ARTIFACTS / "mlflow_search_f1_per_epoch.png"
    try:
        _wait_until_up(f"{base}/health", process)
        assert search_links(store, base) == [("ui-demo", view_url(base, tracking.experiment_id))]
        runs_text, chart_text = asyncio.run(
            _render(
                base,
                [
                    (view_url(base, tracking.experiment_id), runs_png),
                    (view_url(base, tracking.experiment_id, chart=True), chart_png),
                ],
            )
        )
    finally:
        stop_ui(process)
    (ARTIFACTS / "mlflow_search_runs.txt").write_text(runs_text)
    (ARTIFACTS / "mlflow_search_f1_per_epoch.txt").write_text(chart_text)
    words = re.sub(r"\s+", " ", runs_text)
    assert "Runs" in words and "Observability" not in words  # model-training pages, not GenAI's
    assert "Sort: best_f1" in words and "5 matching runs" in words
    for column in ["best_f1", "val_f1", *SEARCHED]:
        assert column in words, column  # the view's columns, no column picking
    ranked = [t for t in summary.leaderboard["trial_id"]]
    positions = [runs_text.index(trial) for trial in ranked]
    assert positions == sorted(positions)  # trials listed by best F1, as the leaderboard ranks them
    assert "foldtune search ui-demo" in words  # the search's description (leaderboard) on top
    charts = re.sub(r"\s+", " ", chart_text)
    assert "foldtune: validation F1 per epoch" in charts and "Step" in charts
    assert charts.index("foldtune: validation F1 per epoch") < charts.index("Model metrics")  # ours first
    for png in (runs_png, chart_png):
        assert png.stat().st_size > 50_000
