"""GPU scheduling without a GPU: a local Ray that declares GPUs runs the real driver on this CPU machine.

Ray hands out declared GPUs whether or not the hardware is there: each trial process gets its GPU ids and a
``CUDA_VISIBLE_DEVICES`` naming them. So the search's packing (``resources.gpu`` 0.5: two trials per GPU,
``max_concurrent: auto`` of them at once: 4 on 2 GPUs, 16 on 8, fewer when the CPUs run out) is checked
with a recording stand-in trial (``run_search(trial_fn=)``) that never touches CUDA, and the driver is
checked to never touch CUDA itself. ``--space auto`` picks the GPU space on a cluster with GPUs. A trial
holding a GPU that torch cannot use (a CUDA 13 torch on a fake driver 550) fails at once with the fix; a
0-GPU trial on a GPU node sees no GPU. The per-trial GPU memory cap is checked with a stand-in
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

TOGETHER = 4  # trials that fit at once: 2 GPUs / 0.5 (max_concurrent auto)
SEARCH_TIMEOUT_S = 240  # far above a normal run; only a hang reaches it


def gpu_space(
    path: Path, trials: int, max_concurrent: int | str, name: str = "gpus", gpu: float = 0.5, **fixed
) -> Path:
    raw = {
        "name": name,
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
        "resources": {"cpu": 1, "gpu": gpu},
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
def declared_ray():
    """``declared_ray(cpus, gpus)``: a local Ray declaring them, shut down after the test."""

    def start(cpus: int, gpus: int) -> None:
        ray.init(num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)

    yield start
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
        space_path=gpu_space(tmp_path / "gpus.yaml", trials=TOGETHER, max_concurrent="auto"),
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


@pytest.mark.skipif(
    not str(torch.version.cuda or "").startswith("13."),
    reason=f"the trap is a CUDA 13 torch on a CUDA 12 driver; this torch is {torch.__version__} (the trial "
    "processes cannot be given a stand-in build)",
)
def test_a_trial_holding_a_gpu_its_torch_cannot_use_fails_at_once_naming_the_fix(
    tmp_path, demo_root, tracking_uri, fake_nvidia_smi, declared_ray
):
    """The real ``run_trial`` with ``device: auto``: Ray gives it a (declared) GPU, the node's driver is 550
    (a fake ``nvidia-smi``), torch here is a CUDA 13 build without a GPU: one line with the fix, no CPU
    run."""
    fake_nvidia_smi(driver="550.54.15", gpus=2)  # on PATH before Ray starts: its workers inherit it
    declared_ray(4, 2)
    summary = run_with_deadline(
        data_root=demo_root,
        space_path=gpu_space(tmp_path / "gpus.yaml", trials=1, max_concurrent=1),
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert summary.finished and len(summary.leaderboard) == 1
    row = summary.leaderboard.iloc[0]
    assert row["state"] == "failed" and row["epochs"] == 0
    error = row["error"]
    assert error.startswith(f"DeviceError: this trial holds a GPU but torch {torch.__version__}"), error
    assert "driver is 550.54.15" in error and "make clean && make .venv TORCH=cu126" in error
    assert "\n" not in error
    trial_dir = summary.search_dir / "trials" / row["trial_id"]
    assert not (trial_dir / "checkpoints").exists() or not list((trial_dir / "checkpoints").iterdir())
    saved = json.loads((summary.search_dir / "summary.json").read_text())
    assert saved["trials"][0]["status"] == "failed" and "DeviceError" in saved["trials"][0]["error"]
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("gpus").experiment_id])
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId"))
    assert child.info.status == "FAILED" and "TORCH=cu126" in child.data.tags["foldtune.error"]


def device_recording_trial(record_dir: Path):
    """The real ``run_trial`` (a tiny fit), then a record of what the trial process saw of the GPUs."""

    def device_recording_trial(params, context) -> None:
        from orchestrator.search.trial import run_trial

        run_trial(params, context)
        trial_id = ray.tune.get_context().get_trial_id()
        record = {
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_json": json.loads((Path(context.trials_dir) / trial_id / "device.json").read_text()),
        }
        (record_dir / f"{trial_id}.json").write_text(json.dumps(record))

    return device_recording_trial


def test_a_trial_without_a_gpu_sees_none_on_a_gpu_node(
    tmp_path, demo_root, tracking_uri, declared_ray, monkeypatch
):
    """``gpu: 0`` on a node whose environment names its GPUs: Ray 2.60 leaves CUDA_VISIBLE_DEVICES as it is
    for a 0-GPU task, so without care the trial would see both GPUs and train on GPU 0 with no memory cap."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # as the node's environment has it
    declared_ray(2, 2)
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    summary = run_with_deadline(
        data_root=demo_root,
        space_path=gpu_space(tmp_path / "cpu.yaml", trials=1, max_concurrent=1, gpu=0),
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=False,
        trial_fn=device_recording_trial(record_dir),
    )
    assert set(summary.leaderboard["state"]) == {"completed"}, summary.leaderboard
    (record,) = [json.loads(p.read_text()) for p in record_dir.glob("*.json")]
    assert record["gpu_ids"] == [] and record["cuda_visible_devices"] == ""
    assert record["device_json"]["device"] == "cpu" and record["device_json"]["cuda_visible_devices"] == ""


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
    monkeypatch.setattr(trial_module, "ray", SimpleNamespace(get_gpu_ids=lambda: ["0"]))  # holds a GPU
    monkeypatch.setattr(trial_module, "record_device", lambda *args: events.append("device"))
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
    assert events == (["device", ("cap", 0.5), "fit"] if capped else ["device", "fit"])


# --- every GPU busy: max_concurrent auto and --space auto ---------------------------------------------------


def _records(record_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(record_dir.glob("*.json"))]


def test_eight_gpus_run_sixteen_half_gpu_trials_at_once_two_per_gpu(
    tmp_path, demo_root, tracking_uri, declared_ray, capsys
):
    """default.yaml's old ``max_concurrent: 4`` kept 6 of 8 GPUs idle; ``auto`` fills them all."""
    declared_ray(16, 8)
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    summary = run_with_deadline(
        data_root=demo_root,
        space_path=gpu_space(tmp_path / "gpus.yaml", trials=16, max_concurrent="auto"),
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=True,
        trial_fn=recording_trial(record_dir, together=16, hold_s=1.0),
    )
    assert (
        "space gpus: 16 trials at once at 0.5 GPU + 1 CPU each (max_concurrent auto)"
        in capsys.readouterr().out
    )
    assert set(summary.leaderboard["state"]) == {"completed"}
    records = _records(record_dir)
    assert len(records) == 16 and max(r["start"] for r in records) < min(r["end"] for r in records)
    per_gpu = pd.Series([r["gpu_ids"][0] for r in records]).value_counts().to_dict()
    assert per_gpu == {str(gpu): 2 for gpu in range(8)}


def test_the_cpus_limit_auto_concurrency_and_the_search_says_so(
    tmp_path, demo_root, tracking_uri, declared_ray, capsys
):
    declared_ray(3, 2)  # 2 GPUs hold 4 half-GPU trials, 3 CPUs only 3 one-CPU trials
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    run_with_deadline(
        data_root=demo_root,
        space_path=gpu_space(tmp_path / "gpus.yaml", trials=1, max_concurrent="auto"),
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=True,
        trial_fn=recording_trial(record_dir, together=1, hold_s=0.0),
    )
    out = capsys.readouterr().out
    assert "3 trials at once at 0.5 GPU + 1 CPU each (the CPUs limit it: the GPUs would hold 4" in out
    client = MlflowClient(tracking_uri)
    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("gpus").experiment_id])
        if not r.data.tags.get("mlflow.parentRunId")
    )
    assert parent.data.params["max_concurrent"] == "3"


@pytest.mark.parametrize(("gpus", "chosen"), [(2, "default"), (0, "cpu")])
def test_space_auto_is_the_gpu_space_on_a_cluster_with_gpus(
    tmp_path, demo_root, tracking_uri, declared_ray, monkeypatch, capsys, gpus, chosen
):
    """``make search`` (SPACE=auto) on a GPU node runs default.yaml, not the CPU preset; the first line
    says which and why. The spaces folder is a stand-in with tiny spaces of the same names."""
    import orchestrator.search.capacity as capacity_module

    spaces = tmp_path / "spaces"
    spaces.mkdir()
    gpu_space(spaces / "default.yaml", trials=2, max_concurrent="auto", name="default")
    gpu_space(spaces / "cpu.yaml", trials=2, max_concurrent="auto", name="cpu", gpu=0)
    monkeypatch.setattr(capacity_module, "SPACES_DIR", spaces)
    declared_ray(4, gpus)
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    summary = run_with_deadline(
        data_root=demo_root,
        space_path="auto",
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=True,
        trial_fn=recording_trial(record_dir, together=1, hold_s=0.0),
    )
    assert summary.search_dir.name == chosen
    first = next(line for line in capsys.readouterr().out.splitlines() if "trials at once" in line)
    if gpus:
        assert first == "2 GPUs: default.yaml: 4 trials at once at 0.5 GPU + 1 CPU each (max_concurrent auto)"
        assert {r["gpu_ids"][0] for r in _records(record_dir)} <= {"0", "1"}
    else:
        assert first == "no GPU: cpu.yaml: 4 trials at once at 1 CPU each (max_concurrent auto)"


def test_the_shipped_spaces_and_make_search_default_to_the_machine(tmp_path):
    from orchestrator.search.capacity import SPACES_DIR, Node, auto_space_file, capacity
    from orchestrator.space import load_space

    default = load_space(SPACES_DIR / "default.yaml")
    assert default.max_concurrent == "auto" and default.gpus_per_trial == 0.5
    eight = capacity([Node(cpus=96, gpus=8)], default.cpus_per_trial, default.gpus_per_trial)
    assert eight.trials == 16 and capacity([Node(96, 2)], 4, 0.5).trials == 4
    assert capacity([Node(32, 8)], 4, 0.5).trials == 8  # 32 CPUs / 4 per trial
    assert capacity([Node(96, 8), Node(16, 0)], 4, 0.5).trials == 16  # a CPU-only node takes no GPU trial
    assert capacity([Node(8, 1)], 1, 0.3).trials == 3  # three 0.3-GPU trials per GPU, not 3.33
    assert auto_space_file(8)[0].name == "default.yaml" and auto_space_file(0)[0].name == "cpu.yaml"
    import subprocess

    dry = subprocess.run(["make", "-n", "search"], capture_output=True, text=True, check=True).stdout
    assert "--space auto" in dry


@pytest.mark.parametrize(
    ("fixed", "gpu", "says"),
    [
        ({"device": "cpu"}, 0.5, "trains on device 'cpu' but reserves 0.5 GPU per trial"),
        ({"device": "cuda"}, 0, "asks for device 'cuda' but gives trials no GPU"),
    ],
)
def test_a_device_that_contradicts_the_gpu_share_is_refused_before_any_trial(
    tmp_path, demo_root, tracking_uri, fake_gpu_ray, fixed, gpu, says
):
    with pytest.raises(OrchestratorError, match=says):
        run_with_deadline(
            data_root=demo_root,
            space_path=gpu_space(tmp_path / "gpus.yaml", trials=1, max_concurrent=1, gpu=gpu, **fixed),
            storage=tmp_path / "runs",
            tracking_uri=tracking_uri,
            cache_dir=tmp_path / "cache",
            progress=False,
        )
    assert not (tmp_path / "runs" / "gpus" / "trials").exists()


def test_make_venv_installs_the_torch_build_asked_for(tmp_path):
    """`make .venv TORCH=cu126` takes torch and torchvision from PyTorch's index for that build, at the
    versions constraints.txt pins, before everything else; without TORCH the package index's; and a .venv of
    another build is one line asking for `make clean` first (dry runs: nothing is installed here)."""
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[1]
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(root / name, tmp_path / name)

    def dry(*variables: str) -> str:
        done = subprocess.run(
            ["make", "-n", ".venv", *variables], cwd=tmp_path, capture_output=True, text=True
        )
        return done.stdout + done.stderr

    built = dry("TORCH=cu126")
    assert "--index-url https://download.pytorch.org/whl/cu126 torch torchvision" in built
    assert built.index("whl/cu126") < built.index("-e '.[dev,weights]'")
    assert "download.pytorch.org" not in dry()
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()
    (tmp_path / ".venv" / ".torch").write_text("default\n")
    done = subprocess.run(["make", ".venv", "TORCH=cu128"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode != 0
    assert "error: .venv holds the torch build 'default', not 'cu128': run make clean" in done.stderr
    constraints = (root / "constraints.txt").read_text().splitlines()
    assert not [line for line in constraints if line.startswith(("nvidia-", "cuda-", "triton"))]
