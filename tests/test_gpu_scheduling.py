"""GPU scheduling without a GPU: a local Ray that declares two GPUs runs the real driver on this CPU machine.

Ray hands out declared GPUs whether or not the hardware is there: each trial process gets its GPU ids and a
``CUDA_VISIBLE_DEVICES`` naming them. So the search's packing (``resources.gpu`` 0.5: two trials per GPU,
``max_concurrent`` of them at once) is checked with a recording stand-in trial (``run_search(trial_fn=)``)
that never touches CUDA, and the driver is checked to never touch CUDA itself. CUDA asked for where there is
none fails at once: before any trial when the cluster has no GPU, as the trial's error when the cluster
declares GPUs the machine does not have. The per-trial GPU memory cap is checked with a stand-in
``torch.cuda``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient

import orchestrator.search.trial as trial_module
from orchestrator.errors import OrchestratorError
from orchestrator.search import run_search
from orchestrator.search.trial import TrialContext, limit_gpu_memory, run_trial
from orchestrator.space import parse_space

# the tiny demo data has strata smaller than k: the split warns (FoldWarning), which is not what is tested
pytestmark = pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")

TOGETHER = 4  # trials that fit at once: 2 GPUs / 0.5, and max_concurrent 4
SEARCH_TIMEOUT_S = 240  # far above a normal run; only a hang reaches it


def gpu_space(path: Path, trials: int, max_concurrent: int, **fixed) -> Path:
    raw = {
        "name": "gpus",
        "trials": trials,
        "fixed": {
            "epochs": 1,
            "k": 2,
            "image_size": [32, 24],
            "batch_size": 16,
            "pretrained": False,
            **fixed,
        },
        "search": {"lr": {"loguniform": [1e-4, 1e-1]}},
        "resources": {"cpu": 1, "gpu": 0.5},
        "max_concurrent": max_concurrent,
        "scheduler": "none",
        "sampler": {"seed": 3, "n_startup_trials": 2},
        "keep_top": 1,
        "max_failures": 0,
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def fake_gpu_ray():
    """Two GPUs and four CPUs declared on a machine with no GPU (and maybe fewer cores)."""
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def no_gpu_ray():
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def recording_trial(record_dir: Path, together: int, wait_s: float = 90.0, hold_s: float = 2.0):
    """A stand-in for ``run_trial`` that records where Ray put it, then reports one finished epoch.

    It waits (at most ``wait_s``) until ``together`` trials have started, then holds ``hold_s``: trials
    that Ray runs at once overlap; trials it runs one after another wait in vain and do not. A closure, so
    Ray ships it by value to the trial processes (the test module is not importable there).
    """

    def recording_trial(params, context) -> None:
        trial_id = ray.tune.get_context().get_trial_id()
        started = time.time()
        (record_dir / f"{trial_id}.started").touch()
        deadline = time.monotonic() + wait_s
        while len(list(record_dir.glob("*.started"))) < together and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(hold_s)
        f1 = float(params["lr"])  # any number the searcher can rank
        run_dir = Path(context.trials_dir) / trial_id
        run_dir.mkdir(parents=True, exist_ok=True)
        fit_result = {"status": "completed", "best_f1": f1, "best_epoch": 1, "epochs_trained": 1}
        (run_dir / "result.json").write_text(json.dumps(fit_result))
        record = {
            "trial_id": trial_id,
            "pid": os.getpid(),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "start": started,
            "end": time.time(),
        }
        (record_dir / f"{trial_id}.json").write_text(json.dumps(record))
        ray.tune.report({"val_f1": f1, "epoch": 1, "epochs_planned": 1, "best_f1": f1, "best_epoch": 1})

    return recording_trial


def run_with_deadline(**kwargs):
    """``run_search`` in a thread: a hang fails the test after SEARCH_TIMEOUT_S instead of blocking it."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["summary"] = run_search(**kwargs)
        except BaseException as error:  # handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(SEARCH_TIMEOUT_S)
    assert not thread.is_alive(), f"the search did not end within {SEARCH_TIMEOUT_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]


def test_half_gpu_trials_pack_two_per_gpu_and_the_driver_never_touches_cuda(
    tmp_path, demo_root, tracking_uri, fake_gpu_ray, monkeypatch
):
    assert ray.cluster_resources().get("GPU") == 2
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    cuda_calls = []

    def recorded(name):
        real = getattr(torch.cuda, name)

        def wrapper(*args, **kwargs):
            cuda_calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    for name in ("is_available", "device_count", "init"):  # the driver asks CUDA nothing
        monkeypatch.setattr(torch.cuda, name, recorded(name))
    summary = run_with_deadline(
        data_root=demo_root,
        space_path=gpu_space(tmp_path / "gpus.yaml", trials=TOGETHER, max_concurrent=TOGETHER),
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=False,
        trial_fn=recording_trial(record_dir, TOGETHER),
    )
    assert summary.finished and len(summary.leaderboard) == TOGETHER
    assert set(summary.leaderboard["state"]) == {"completed"}, summary.leaderboard
    records = [json.loads(p.read_text()) for p in sorted(record_dir.glob("*.json"))]
    assert sorted(r["trial_id"] for r in records) == sorted(summary.leaderboard["trial_id"])

    # all four at once: every trial started before any ended, in four processes
    assert max(r["start"] for r in records) < min(r["end"] for r in records), records
    assert len({r["pid"] for r in records}) == TOGETHER
    # each sees exactly one GPU, as its CUDA_VISIBLE_DEVICES; two trials share each of the two GPUs
    for record in records:
        assert len(record["gpu_ids"]) == 1, record
        assert record["cuda_visible_devices"] == record["gpu_ids"][0], record
    per_gpu = pd.Series([r["gpu_ids"][0] for r in records]).value_counts().to_dict()
    assert per_gpu == {"0": 2, "1": 2}

    assert cuda_calls == [] and not torch.cuda.is_initialized()


def test_cuda_on_a_cluster_without_gpus_is_refused_before_any_trial(
    tmp_path, demo_root, tracking_uri, no_gpu_ray
):
    space_file = gpu_space(tmp_path / "gpus.yaml", trials=2, max_concurrent=1, device="cuda")
    with pytest.raises(OrchestratorError) as refused:
        run_with_deadline(
            data_root=demo_root,
            space_path=space_file,
            storage=tmp_path / "runs",
            tracking_uri=tracking_uri,
            cache_dir=tmp_path / "cache",
            progress=False,
        )
    message = str(refused.value)
    assert "device 'cuda'" in message and "no GPU" in message and "\n" not in message
    search_dir = tmp_path / "runs" / "gpus"
    assert not (search_dir / "trials").exists() and not (search_dir / "tune").exists()  # no trial began


def test_cuda_on_declared_gpus_the_machine_lacks_fails_the_trial_at_once(
    tmp_path, demo_root, tracking_uri, fake_gpu_ray
):
    """The real ``run_trial``: Ray gives it a (declared) GPU, torch finds none, fit stops with DeviceError."""
    summary = run_with_deadline(
        data_root=demo_root,
        space_path=gpu_space(tmp_path / "gpus.yaml", trials=1, max_concurrent=1, device="cuda"),
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert summary.finished and len(summary.leaderboard) == 1
    row = summary.leaderboard.iloc[0]
    assert row["state"] == "failed" and row["epochs"] == 0
    assert row["error"].startswith("DeviceError: ") and "no CUDA GPU is visible" in row["error"]
    saved = json.loads((summary.search_dir / "summary.json").read_text())
    assert saved["trials"][0]["status"] == "failed" and "DeviceError" in saved["trials"][0]["error"]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("gpus").experiment_id])
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId"))
    assert child.info.status == "FAILED" and "no CUDA GPU is visible" in child.data.tags["foldtune.error"]


# --- the per-trial GPU memory cap ---------------------------------------------------------------------------


class FakeCuda:
    """What ``limit_gpu_memory`` uses of ``torch.cuda``, recording the caps it sets."""

    def __init__(self, available: bool = True):
        self.available = available
        self.caps: list[tuple[float, int]] = []

    def is_available(self) -> bool:
        return self.available

    def set_per_process_memory_fraction(self, fraction: float, device: int) -> None:
        self.caps.append((fraction, device))


@pytest.mark.parametrize(
    ("gpus", "available", "caps"),
    [
        (0.5, True, [(0.5, 0)]),  # two trials per GPU: half of device 0, the one Ray made visible
        (0.25, True, [(0.25, 0)]),
        (1, True, []),  # a whole GPU: no cap
        (2, True, []),
        (0, True, []),  # a CPU trial
        (0.5, False, []),  # no CUDA here: nothing to cap (a device: cuda trial fails in fit instead)
    ],
)
def test_a_fractional_gpu_share_caps_the_trial_memory(gpus, available, caps):
    cuda = FakeCuda(available)
    assert limit_gpu_memory(gpus, cuda=cuda) is bool(caps)
    assert cuda.caps == caps


@pytest.mark.parametrize(("device", "capped"), [("auto", True), ("cuda", True), ("cpu", False)])
def test_run_trial_caps_gpu_memory_before_fitting(tmp_path, monkeypatch, device, capped):
    """``run_trial`` asks for the cap with the space's GPU share before fit starts; a CPU trial never."""
    import trainers.fit

    events = []
    space = parse_space(
        {
            "name": "cap",
            "trials": 1,
            "fixed": {"epochs": 1, "device": device},
            "search": {"lr": {"loguniform": [1e-4, 1e-1]}},
            "resources": {"cpu": 1, "gpu": 0.5},
        }
    )
    context = TrialContext(
        space=space,
        table=pd.DataFrame(),
        folds=pd.DataFrame(),
        cache_dir=str(tmp_path / "cache"),
        trials_dir=str(tmp_path / "trials"),
        weights={},
        log_epochs=False,
    )
    monkeypatch.setattr(trial_module, "limit_gpu_memory", lambda gpus: events.append(("cap", gpus)))
    monkeypatch.setattr(
        trainers.fit, "fit", lambda *a, **k: events.append("fit") or SimpleNamespace(status="ok")
    )
    monkeypatch.setattr(
        trial_module, "tune", SimpleNamespace(get_context=lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    )
    threads = torch.get_num_threads()
    try:
        run_trial({"lr": 1e-3}, context)
    finally:
        torch.set_num_threads(threads)
    assert events == ([("cap", 0.5), "fit"] if capped else ["fit"])
