"""The fault matrix, trainer side: each fault ends in one clear line and loses nothing already won.

Search-side faults (a trial process crashing, a worker node lost, the driver killed, the MLflow store
unreachable) are in tests/test_faults_search.py and tests/test_search.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os

import numpy as np
import pytest
import torch

import trainers.fit as fit_module
from orchestrator.cli import main
from trainers.checkpoint import CheckpointError, load_checkpoint, read_checkpoint
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.fit import TrainingError, fit
from trainers.folds import make_folds
from trainers.io import DiskFullError, atomic_torch_save
from trainers.resume import RESUME_STATE

TINY = dict(
    backbone="resnet10t",
    image_size=(32, 24),
    epochs=2,
    batch_size=16,
    k=2,
    lr=3e-3,
    patience=0,
    seed=5,
    num_workers=0,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory, dataset_builder):
    root = tmp_path_factory.mktemp("faultdata")
    dataset_builder(root, n_persons=8)
    table = read_train(root).table
    return table, make_folds(table, k=2, seed=0), root


def _fail_in_epoch(monkeypatch, epoch: int, error: BaseException) -> None:
    """Make the training step raise ``error`` once epoch ``epoch`` starts (fold 0)."""
    real = fit_module.train_one_epoch
    calls = {"n": 0}

    def step(fold, cfg, batches, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > (epoch - 1) * cfg.k:
            raise error
        return real(fold, cfg, batches, *args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", step)


def test_cuda_out_of_memory_is_one_line_naming_what_to_lower_and_keeps_epoch_one(data, tmp_path, monkeypatch):
    table, folds, _ = data
    _fail_in_epoch(monkeypatch, 2, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(TrainingError) as caught:
        fit(TrainConfig(**TINY), table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    message = str(caught.value)
    assert "\n" not in message and "batch_size 16" in message and "e.g. 8" in message and "32x24" in message
    for fold in range(2):  # epoch 1's best checkpoints survive and load
        assert load_checkpoint(tmp_path / "run" / "checkpoints" / f"fold{fold}.pt").meta["epoch"] == 1
    assert torch.load(tmp_path / "run" / RESUME_STATE, weights_only=True)["epoch"] == 1  # resumable
    monkeypatch.undo()
    resumed = fit(TrainConfig(**TINY), table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert resumed.status == "completed" and resumed.epochs_trained == 2


def test_nan_loss_ends_the_run_as_diverged_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    table, folds, _ = data
    real = fit_module.train_one_epoch
    calls = {"n": 0}

    def nan_in_epoch_two(fold, cfg, batches, *args, **kwargs):
        calls["n"] += 1
        loss = real(fold, cfg, batches, *args, **kwargs)
        return dataclasses.replace(loss, mean=float("nan"), nonfinite=1) if calls["n"] > cfg.k else loss

    monkeypatch.setattr(fit_module, "train_one_epoch", nan_in_epoch_two)
    result = fit(TrainConfig(**TINY), table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert result.status == "diverged" and "lower lr (now 0.003)" in result.message
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "fold0.pt")["epoch"] == 1


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "fold0.pt"
    atomic_torch_save({"weights": torch.ones(3)}, path)
    before = path.read_bytes()
    real_save = torch.save

    def save_until_full(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(DiskFullError) as caught:
        atomic_torch_save({"weights": torch.zeros(3)}, path)
    assert "no space left" in str(caught.value) and "previous version is kept" in str(caught.value)
    assert path.read_bytes() == before  # the old checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["fold0.pt"]  # no temporary file left behind


def test_disk_full_during_training_is_one_error_line_and_nothing_written_before_is_lost(
    data, tmp_path, monkeypatch, capsys
):
    table, folds, root = data
    config = tmp_path / "tiny.yaml"
    config.write_text("backbone: resnet10t\nk: 2\nepochs: 2\nimage_size: [32, 24]\nbatch_size: 16\nseed: 5\n")
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        str(root),
        "--config",
        str(config),
        "--out",
        str(run),
        "--cache-dir",
        str(tmp_path),
    ]
    real_fsync = os.fsync
    writes = {"resume states": 0}

    def fill_up_at_the_second_resume_state(fd):  # a full disk shows at write or at fsync
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):  # atomic_open's temporary resume state
            writes["resume states"] += 1
            if writes["resume states"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fill_up_at_the_second_resume_state)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: no space left") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert torch.load(run / RESUME_STATE, weights_only=True)["epoch"] == 1  # the previous state, whole
    assert read_checkpoint(run / "checkpoints" / "fold0.pt")["config"]["epochs"] == 2  # the best, whole


def test_a_truncated_checkpoint_is_named(data, tmp_path):
    table, folds, _ = data
    fit(TrainConfig(**{**TINY, "epochs": 1}), table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    path = tmp_path / "run" / "checkpoints" / "fold1.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"{path}.*corrupt"):
        load_checkpoint(path)


def test_a_foreign_checkpoint_is_named(tmp_path):
    foreign = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, foreign)  # some other tool's checkpoint
    with pytest.raises(CheckpointError, match=rf"{foreign} is not a foldtune checkpoint"):
        load_checkpoint(foreign)
    numbers = tmp_path / "numbers.pt"
    torch.save(np.arange(3).tolist(), numbers)
    with pytest.raises(CheckpointError, match="not a foldtune checkpoint"):
        read_checkpoint(numbers)
