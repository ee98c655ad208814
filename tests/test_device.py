"""The first GPU run's traps, proven on this CPU machine with fakes: a torch build the driver cannot run, a
GPU that would be idle, loader workers and shared memory, the GPU speed settings, fp16 loss scaling, a resume
across GPU kinds, and out-of-memory anywhere in a run. Scheduling (Ray's declared GPUs) is in
``tests/test_gpu_scheduling.py``, host syncs in ``tests/test_host_sync.py``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

import trainers.fit as fit_module
import trainers.fold_state as fold_state_module
from orchestrator.cli import main
from trainers import device as device_module
from trainers.checkpoint import read_checkpoint
from trainers.config import ConfigError, TrainConfig
from trainers.data import read_train
from trainers.device import (
    CudaStatus,
    DeviceError,
    Gpu,
    apply_backend_settings,
    check_shared_memory,
    loader_workers,
    nvidia_smi,
    pick_device,
    shared_memory_need,
)
from trainers.fit import EpochLoss, TrainingError, fit, input_stats, train_one_epoch
from trainers.fold_state import build_fold, make_optimizer, seed_everything
from trainers.folds import make_folds
from trainers.loader import FoldLoader
from trainers.resume import RESUME_STATE

# the tiny data has strata smaller than k: the split warns (FoldWarning), which is not what is tested
pytestmark = pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TINY = dict(
    backbone="resnet10t", image_size=(32, 24), epochs=2, batch_size=16, k=2, lr=3e-3, patience=0, seed=5
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, dataset_builder):
    root = tmp_path_factory.mktemp("devicedata")
    dataset_builder(root, n_persons=8)
    table = read_train(root).table
    return table, make_folds(table, k=2, seed=0), root


def status(driver: str | None, cuda: str | None = "13.0", usable: bool = False, gpus: int = 8) -> CudaStatus:
    listed = tuple(Gpu("NVIDIA A100-SXM4-80GB", 81920) for _ in range(gpus)) if driver else ()
    return CudaStatus("2.14.1+cu130" if cuda else "2.14.1+cpu", cuda, usable, driver, listed)


# --- 1. never silently on the CPU: the torch build against the driver ---------------------------------------


@pytest.mark.parametrize(
    ("driver", "cuda", "says"),
    [
        (
            "550.54.15",
            "13.0",
            "needs NVIDIA driver >= 580.65.06 but the driver is 550.54.15 (8 × NVIDIA A100",
        ),
        ("575.51.03", "13.0", "make clean && make .venv TORCH=cu128"),
        ("535.104.05", "13.0", "make clean && make .venv TORCH=cu126"),
        ("470.82.01", "13.0", "upgrade the NVIDIA driver to >= 525.60.13 (or make .venv TORCH=cpu)"),
        ("590.44.01", None, "a CPU-only build) cannot use the GPU (the driver is 590.44.01"),
        (None, "13.0", "finds no NVIDIA driver (nvidia-smi is not on PATH)"),
    ],
)
def test_an_unusable_cuda_is_one_line_naming_the_build_the_driver_and_the_fix(driver, cuda, says):
    line = status(driver, cuda).problem()
    assert says in line and "\n" not in line
    assert line.startswith("torch 2.14.1+")
    if driver and cuda == "13.0" and driver.startswith("550"):
        assert line.endswith("install the build for this driver: make clean && make .venv TORCH=cu126")
    assert status("590.44.01", "13.0", usable=True).problem() is None


def test_nvidia_smi_is_read_for_the_driver_and_gpus(fake_nvidia_smi, monkeypatch):
    fake_nvidia_smi(driver="550.54.15", gpus=2)
    driver, gpus = nvidia_smi()
    assert driver == "550.54.15" and gpus == (Gpu("NVIDIA A100-SXM4-80GB", 81920),) * 2
    monkeypatch.setenv("PATH", "/nonexistent")
    assert nvidia_smi() == (None, ())


def test_a_trial_holding_a_gpu_that_torch_cannot_use_fails_at_once(
    fake_nvidia_smi, cuda13_torch, monkeypatch
):
    fake_nvidia_smi(driver="550.54.15")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError) as refused:
        pick_device("auto", holds_gpu=True)
    line = str(refused.value)
    assert (
        line.startswith("this trial holds a GPU but torch ") and "550.54.15" in line and "TORCH=cu126" in line
    )
    with pytest.raises(DeviceError, match="device 'cuda' was asked for but torch"):
        pick_device("cuda")


def test_auto_follows_the_gpu_the_run_holds_not_what_torch_says(fake_nvidia_smi, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", holds_gpu=False) == CPU  # a 0-GPU trial never lands on a GPU
    assert pick_device("auto", holds_gpu=True) == CUDA
    assert pick_device("auto") == CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == CPU  # no driver here: the CPU is the machine, not a fall-back
    fake_nvidia_smi(driver="550.54.15", gpus=2)
    with pytest.raises(DeviceError, match=r"the driver lists 2 × NVIDIA .* set device: cpu"):
        pick_device("auto")  # foldtune train on a GPU node with the wrong torch: never quietly the CPU
    assert pick_device("cpu") == CPU  # asked for: fine


def test_foldtune_train_on_a_gpu_node_with_the_wrong_torch_is_one_error_line(
    data, tmp_path, fake_nvidia_smi, cuda13_torch, capsys
):
    _, _, root = data
    fake_nvidia_smi(driver="550.54.15", gpus=1)
    config = tmp_path / "tiny.yaml"
    config.write_text("backbone: resnet10t\nk: 2\nepochs: 1\nimage_size: [32, 24]\n")
    code = main(["train", "--data", str(root), "--config", str(config), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "550.54.15" in err and "TORCH=cu126" in err and "device: cpu" in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )


# --- 6. loader workers sized for where augmentation runs; /dev/shm checked ----------------------------------


def test_auto_loader_workers_follow_where_augmentation_runs():
    assert (
        loader_workers("auto", augment_on_device=True, device=CUDA, threads=4) == 1
    )  # only slices the cache
    assert loader_workers("auto", augment_on_device=False, device=CUDA, threads=4) == 4  # albumentations
    assert (
        loader_workers("auto", augment_on_device=False, device=CPU, threads=4) == 0
    )  # shares the step's core
    assert loader_workers(3, augment_on_device=True, device=CUDA, threads=4) == 3
    assert TrainConfig(num_workers="auto").num_workers == "auto"
    with pytest.raises(ConfigError, match="num_workers"):
        TrainConfig(num_workers="many")


def test_the_default_space_starts_one_worker_per_fold_on_a_gpu(tmp_path):
    """default.yaml trained 5 folds x 4 persistent workers = 20 loader processes per trial; now 1 per fold."""
    from benchmarks.gpu_device_rig import write_synthetic_cache
    from orchestrator.space import load_space
    from trainers.cache import open_cache

    space = load_space("search_spaces/default.yaml")
    cfg = space.config_for({name: param.values[0] for name, param in space.search.items()})
    assert cfg.num_workers == "auto" and cfg.augment_on == "auto"
    path = write_synthetic_cache(tmp_path, 8, (32, 24), seed=0)
    rows, labels = np.arange(8), np.zeros(8, dtype=np.int64)
    with torch.device("cpu"):
        loader = FoldLoader(path, rows, labels, cfg, 0, CUDA, augment_on_loader=False)
    assert loader.workers == 1 and loader.loader.num_workers == 1
    assert open_cache(path).images.shape[0] == 8


def test_shared_memory_too_small_for_the_loaders_is_one_line_with_the_fix(tmp_path, monkeypatch):
    need = 2 * shared_memory_need(4, 64, (224, 168))  # two trials of default.yaml's old 4 workers
    assert need == 2 * 4 * 2 * 64 * (224 * 168 * 3 + 8)  # four workers, two batches each
    with pytest.raises(DeviceError) as refused:
        check_shared_memory(need, "4 loader workers", free=64 * 2**20)  # Docker's default /dev/shm
    line = str(refused.value)
    assert "/dev/shm has 64 MiB free" in line and "--shm-size" in line and "num_workers" in line
    check_shared_memory(need, "4 loader workers", free=need)  # enough: nothing said
    # the loader refuses before any worker starts
    from benchmarks.gpu_device_rig import write_synthetic_cache

    monkeypatch.setattr(device_module, "shared_memory_free", lambda path="/dev/shm": 2**16)
    path = write_synthetic_cache(tmp_path, 8, (32, 24), seed=0)
    cfg = TrainConfig(**{**TINY, "num_workers": 2})
    with pytest.raises(DeviceError, match="2 loader worker"):
        FoldLoader(path, np.arange(8), np.zeros(8, dtype=np.int64), cfg, 0, CPU)


# --- 6. GPU speed settings, each a config field -------------------------------------------------------------


def test_gpu_speed_settings_apply_on_cuda_only():
    saved = torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.benchmark = False
        torch.set_float32_matmul_precision("highest")
        assert apply_backend_settings(True, True, CPU) == {}
        assert torch.backends.cudnn.benchmark is False and torch.get_float32_matmul_precision() == "highest"
        cfg = TrainConfig()
        assert cfg.cudnn_benchmark and cfg.tf32 and cfg.fused_adamw and not cfg.compile  # the defaults
        apply_backend_settings(cfg.cudnn_benchmark, cfg.tf32, CUDA)
        assert torch.backends.cudnn.benchmark is True and torch.get_float32_matmul_precision() == "high"
        apply_backend_settings(False, False, CUDA)
        assert torch.backends.cudnn.benchmark is False and torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_adamw_is_fused_on_cuda_unless_turned_off():
    model = torch.nn.Linear(4, 2)
    assert make_optimizer(model, TrainConfig(), CUDA).defaults["fused"] is True
    assert not make_optimizer(model, TrainConfig(), CPU).defaults.get("fused")
    assert not make_optimizer(model, TrainConfig(fused_adamw=False), CUDA).defaults.get("fused")


def test_compile_trains_through_the_compiled_model_and_checkpoints_the_plain_one(data, tmp_path, monkeypatch):
    table, folds, _ = data
    calls = {"compiled": 0, "forward": 0}

    def fake_compile(model, **kwargs):
        calls["compiled"] += 1

        class Compiled(torch.nn.Module):  # what torch.compile returns: a wrapper sharing the weights
            def __init__(self):
                super().__init__()
                self._orig_mod = model

            def forward(self, x):
                calls["forward"] += 1
                return self._orig_mod(x)

        return Compiled()

    monkeypatch.setattr(torch, "compile", fake_compile)
    result = fit(
        TrainConfig(**{**TINY, "compile": True}), table, folds, tmp_path / "run", tmp_path / "c", log=None
    )
    assert result.status == "completed" and calls["compiled"] == 2 and calls["forward"] > 0
    state = read_checkpoint(tmp_path / "run" / "checkpoints" / "fold0.pt")["state_dict"]
    assert not any(key.startswith("_orig_mod") for key in state)  # loadable into a plain model
    calls["forward"] = 0
    fit(TrainConfig(**TINY), table, folds, tmp_path / "plain", tmp_path / "c", log=None)
    assert calls["forward"] == 0 and calls["compiled"] == 2  # off by default


# --- 7. fp16 loss scaling: a skipped step is not divergence -------------------------------------------------


class InfOnSteps(torch.nn.Module):
    """The fold's loss, made inf on the chosen steps (an fp16 overflow)."""

    def __init__(self, criterion, steps: set[int]):
        super().__init__()
        self.criterion, self.steps, self.step = criterion, steps, 0

    def forward(self, output, target):
        self.step += 1
        loss = self.criterion(output, target)
        return loss * float("inf") if self.step in self.steps else loss


def _scaled_fold(init_scale: float = 2.0**16):
    cfg = TrainConfig(**TINY)
    seed_everything(0)
    fold = build_fold(cfg, 0, np.arange(16), np.arange(16) % 18, CPU)
    fold.scaler = torch.amp.GradScaler(
        "cpu", init_scale=init_scale, enabled=True
    )  # fp16's scaler, on the CPU
    return cfg, fold


def _run(cfg, fold, steps: int) -> EpochLoss:
    rng = np.random.default_rng(0)
    batches = [
        (torch.from_numpy(rng.integers(0, 256, (4, 32, 24, 3), dtype=np.uint8)), torch.arange(4))
        for _ in range(steps)
    ]
    mean, std = input_stats(None)
    return train_one_epoch(fold, cfg, batches, CPU, mean, std, False)


def test_an_overflowed_step_that_grad_scaler_skips_is_counted_not_divergence():
    cfg, fold = _scaled_fold()
    fold.criterion = InfOnSteps(fold.criterion, {2})
    before = {name: p.detach().clone() for name, p in fold.model.named_parameters()}
    loss = _run(cfg, fold, 4)
    assert loss.skipped == 1 and loss.nonfinite == 1 and loss.steps == 4
    assert np.isfinite(loss.mean) and not loss.diverged
    assert loss.scale == 2.0**15  # halved once, by the skip
    assert any(not torch.equal(before[n], p) for n, p in fold.model.named_parameters())  # the others trained

    cfg, fold = _scaled_fold()
    fold.scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 / fp32: nothing skips a bad step
    fold.criterion = InfOnSteps(fold.criterion, {2})
    loss = _run(cfg, fold, 4)
    assert loss.diverged and loss.nonfinite == 3 and "training loss became nan" in loss.why()  # weights nan


def test_a_collapsed_loss_scale_is_divergence():
    cfg, fold = _scaled_fold(init_scale=2.0**-8)
    fold.criterion = InfOnSteps(fold.criterion, {1, 2, 3})
    loss = _run(cfg, fold, 3)
    assert loss.diverged and loss.skipped == 3 and "fp16 loss scale collapsed" in loss.why()


def test_fit_goes_on_through_skipped_steps_and_reports_them(data, tmp_path, monkeypatch):
    table, folds, _ = data
    real = fit_module.train_one_epoch

    def with_skips(*args, **kwargs):
        loss = real(*args, **kwargs)
        return dataclasses.replace(loss, skipped=2, nonfinite=2, scaling=True, scale=2.0**14)

    monkeypatch.setattr(fit_module, "train_one_epoch", with_skips)
    result = fit(TrainConfig(**TINY), table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert result.status == "completed"
    epochs = pd.read_csv(tmp_path / "run" / "metrics" / "epochs.csv")
    assert set(epochs["train_skipped_steps"]) == {2.0}


# --- 7. a resume across GPU kinds (bf16 state, fp16 scaler) -------------------------------------------------


def test_a_bf16_resume_state_resumes_where_fp16_loss_scaling_runs(data, tmp_path, monkeypatch):
    table, folds, _ = data
    cfg = TrainConfig(**TINY)

    class Stop(Exception):
        pass

    def stop_after_first(report) -> None:
        if report.epoch == 1:
            raise Stop

    with pytest.raises(Stop):  # a run without loss scaling (here the CPU; bf16 on an A100) writes last.pt
        fit(cfg, table, folds, tmp_path / "run", tmp_path / "cache", callback=stop_after_first, log=None)
    assert torch.load(tmp_path / "run" / RESUME_STATE, weights_only=True)["folds"][0]["scaler"] == {}
    # resumed on a V100/T4: fp16 with a GradScaler (on the CPU here)
    monkeypatch.setattr(fold_state_module, "amp_dtype", lambda device, amp=True: torch.float16)
    resumed = fit(cfg, table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert resumed.status == "completed" and resumed.epochs_trained == 2


# --- 7. out of memory anywhere in a run is one line ---------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("_build_folds", "building the fold models"),
        ("write_out_of_fold", "predicting the out-of-fold images"),
    ],
)
def test_out_of_memory_outside_the_training_step_is_one_training_error_line(
    data, tmp_path, monkeypatch, where, says
):
    table, folds, _ = data

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fit_module, where, out_of_memory)
    with pytest.raises(TrainingError) as caught:
        fit(TrainConfig(**TINY), table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    line = str(caught.value)
    assert line.startswith(f"out of GPU memory {says}") and "batch_size (e.g. 8)" in line and "\n" not in line
