"""The GPU path's decisions, proven on the CPU: AMP dtype from a mocked capability, one loader per fold for
the whole run (persistent workers, same batches as a fresh loader per epoch), the resume-state interval and
location, resume states without frozen weights, and device augmentation inside a real run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainers.fit as fit_module
from trainers import cache as image_cache
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.device import amp_dtype
from trainers.fit import RESUME_STATE, augment_on_device, fit
from trainers.folds import make_folds
from trainers.loader import FoldLoader, SeededShuffle, epoch_seed, train_loader
from trainers.losses import balanced_sample_weights

TINY = dict(
    backbone="resnet10t",
    image_size=(32, 24),
    epochs=3,
    batch_size=16,
    k=2,
    lr=3e-3,
    patience=0,
    seed=7,
    num_workers=0,
)
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def data(tmp_path_factory, dataset_builder):
    root = tmp_path_factory.mktemp("gpupath")
    dataset_builder(root, n_persons=10)
    table = read_train(root).table
    return table, make_folds(table, k=2, seed=0)


@pytest.fixture(scope="module")
def cached(data, tmp_path_factory):
    table, _ = data
    path = image_cache.prepare_cache(TrainConfig(**TINY), table, tmp_path_factory.mktemp("cache"))
    return path, image_cache.open_cache(path).rows(sorted(table["image_path"])), table


@pytest.mark.parametrize(
    ("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)], ids=["ampere", "v100-t4"]
)
def test_amp_dtype_uses_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, native_bf16, expected):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native_bf16 or including_emulation  # V100/T4: True only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert amp_dtype(CUDA, amp=True) == expected
    assert asked == [False]  # emulated bf16 (slower than fp32 there) never counts
    assert amp_dtype(CUDA, amp=False) is None
    assert amp_dtype(torch.device("cpu"), amp=True) is None  # plain fp32 on the CPU


def test_augmentation_placement():
    assert augment_on_device(TrainConfig(augment_on="auto"), CUDA)
    assert not augment_on_device(TrainConfig(augment_on="auto"), torch.device("cpu"))
    assert augment_on_device(TrainConfig(augment_on="device"), torch.device("cpu"))
    assert not augment_on_device(TrainConfig(augment_on="loader"), CUDA)


def _batches(loader) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(images.numpy().copy(), labels.numpy().copy()) for images, labels in loader]


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_one_loader_per_fold_gives_the_batches_a_fresh_loader_per_epoch_gave(cached, workers, weighted):
    path, rows, table = cached
    labels = table.sort_values("image_path")["label"].to_numpy(dtype=np.int64)
    cfg = TrainConfig(**{**TINY, "num_workers": workers, "weighted_sampler": weighted})
    persistent = FoldLoader(path, rows, labels, cfg, fold=1, device=torch.device("cpu"))
    for epoch in (1, 2):
        seed = epoch_seed(cfg, 1, epoch)
        sampler = SeededShuffle(len(rows), seed)
        if weighted:
            weights = torch.as_tensor(balanced_sample_weights(labels), dtype=torch.double)
            sampler = torch.utils.data.WeightedRandomSampler(
                weights, len(weights), generator=torch.Generator().manual_seed(seed)
            )
        fresh = train_loader(path, rows, labels, cfg.augment, cfg.batch_size, seed, workers, sampler=sampler)
        got, want = _batches(persistent.epoch(epoch)), _batches(fresh)
        assert len(got) == len(want) > 1
        for (images, ys), (images_want, ys_want) in zip(got, want, strict=True):
            np.testing.assert_array_equal(ys, ys_want)
            np.testing.assert_array_equal(images, images_want)  # same order and same augmentation draws


def test_the_workers_of_a_fold_loader_start_once_for_the_whole_run(cached):
    path, rows, table = cached
    labels = table.sort_values("image_path")["label"].to_numpy(dtype=np.int64)
    loader = FoldLoader(path, rows, labels, TrainConfig(**{**TINY, "num_workers": 1}), 0, torch.device("cpu"))
    _batches(loader.epoch(1))
    first = loader.loader._iterator
    pids = [worker.pid for worker in first._workers]
    _batches(loader.epoch(2))
    assert loader.loader._iterator is first and [w.pid for w in first._workers] == pids


def test_fit_builds_one_loader_per_fold_not_one_per_epoch(data, tmp_path, monkeypatch):
    table, folds = data
    built = []

    class Counted(FoldLoader):
        def __init__(self, *args, **kwargs):
            built.append(args[4])  # the fold
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(fit_module, "FoldLoader", Counted)
    result = fit(TrainConfig(**TINY), table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert result.epochs_trained == 3 and sorted(built) == [0, 1]  # 2 folds x 3 epochs, 2 loaders


def test_resume_state_every_n_epochs_in_its_own_folder_without_frozen_weights(data, tmp_path):
    table, folds = data
    cfg = TrainConfig(**{**TINY, "resume_every_epochs": 2, "freeze_depth": 1})
    resume_dir = tmp_path / "node-local"
    seen = {}

    def record(report) -> None:
        path = resume_dir / RESUME_STATE
        seen[report.epoch] = torch.load(path, weights_only=True)["epoch"] if path.exists() else None
        if report.epoch == 2:
            state = torch.load(path, weights_only=True)["folds"][0]["model"]
            frozen = [n for n, p in _frozen_model(cfg).named_parameters() if not p.requires_grad]
            assert frozen and not set(frozen) & set(state)  # frozen weights are not written again

    fit(
        cfg,
        table,
        folds,
        tmp_path / "run",
        tmp_path / "cache",
        callback=record,
        log=None,
        resume_dir=resume_dir,
    )
    assert seen == {1: None, 2: 2, 3: 2}  # written after epoch 2 only (every 2 epochs)
    assert not (tmp_path / "run" / RESUME_STATE).exists()  # never in the run folder
    assert not (resume_dir / RESUME_STATE).exists()  # and gone once the run finished


def _frozen_model(cfg: TrainConfig) -> torch.nn.Module:
    from trainers.models import build_model, freeze_stages

    model = build_model(cfg.backbone, image_size=tuple(cfg.image_size))
    freeze_stages(model, cfg.freeze_depth)
    return model


def test_a_run_resumed_from_a_state_without_frozen_weights_matches_an_uninterrupted_one(data, tmp_path):
    table, folds = data
    cfg = TrainConfig(**{**TINY, "freeze_depth": 1})
    whole = fit(cfg, table, folds, tmp_path / "whole", tmp_path / "cache", log=None)

    class Stop(Exception):
        pass

    def stop_after_first(report) -> None:
        if report.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(cfg, table, folds, tmp_path / "cut", tmp_path / "cache", callback=stop_after_first, log=None)
    resumed = fit(cfg, table, folds, tmp_path / "cut", tmp_path / "cache", log=None)
    assert resumed.best_f1 == pytest.approx(whole.best_f1, abs=1e-6)
    with np.load(tmp_path / "whole" / "oof.npz") as a, np.load(tmp_path / "cut" / "oof.npz") as b:
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)


def test_device_augmentation_trains_inside_a_real_run_on_cpu_tensors(data, tmp_path):
    table, folds = data
    cfg = TrainConfig(
        **{**TINY, "epochs": 2, "augment_on": "device", "augment": {"hflip": 0.5, "coarse_dropout": 0.5}}
    )
    result = fit(cfg, table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert result.status == "completed" and np.isfinite(result.oof_f1)
    again = fit(cfg, table, folds, tmp_path / "again", tmp_path / "cache", log=None)
    assert again.best_f1 == result.best_f1  # seeded per fold and epoch: reproducible
