"""Section ``ceiling``: how fast can fit's training loop feed a GPU, measured per CPU core with a model that
costs nothing, against what the GPU trains per trial?

The loop is the real one: ``trainers.fit.train_one_epoch`` over a ``trainers.loader.FoldLoader`` epoch (built
once, ``.epoch(e)`` per epoch, as fit does), then the epoch's writes fit does (the fold's best checkpoint via
``save_fold_checkpoint`` and ``trainers.resume.save_resume_state``; both every measured epoch, the worst
case). The model is a null one, global average pool + ``Linear(3, 18)``, put into a ``FoldState`` by
fit's own ``build_fold`` (its focal loss, AdamW, warmup-cosine schedule and scaler), at the default GPU
space's image size and batch size.

Per core: one torch thread, one OpenCV thread and ``num_workers=0``, so the loader's work and the step run
one after the other on one core: the figure is images per CPU-second of the whole pipeline. Both placements
of the augmentation are measured, each two ways:

- ``loader``: albumentations per image in the loader. CPU side = the loader alone (slice the cached uint8
  batch + augment); total = the whole loop on this CPU (+ normalise, null step, writes).
- ``device``: ``DeviceAugment`` inside the step. CPU side = the loader alone (slicing only); total = the
  whole loop here, where "the device" is this CPU (on a GPU that augmentation runs on the GPU, so for this
  placement the CPU side is the ceiling that matters; the host-to-device copy of the pinned uint8 batch,
  ~7 MB at 224x168x64, is not measured here: ``python -m benchmarks.gpu_device`` runs the real thing).

The ratio: per core x the space's ``resources.cpu`` (the trial's loader workers spread the loader's work
over its CPUs; assumes ideal scaling and leaves out the main process's own CPU time for the real model's
kernel launches) / the published GPU training rate of each default backbone for ``resources.gpu`` of a GPU,
scaled from 224x224 to the space's size by pixel count (``benchmarks.reference``). Target: >= 3.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn

from benchmarks.data import build_cache_timed
from benchmarks.input import TimedBatches, drain, timed_rate
from benchmarks.reference import (
    PUBLISHED_SOURCE,
    PUBLISHED_TRAIN_RATES,
    default_space,
    gpu_rate_per_trial,
    published_note,
)
from benchmarks.settings import BenchSettings, summarize_runs
from trainers import cache as image_cache
from trainers.checkpoint import fold_checkpoint_path, save_fold_checkpoint
from trainers.config import TrainConfig
from trainers.device_augment import DeviceAugment
from trainers.fit import input_stats, train_one_epoch
from trainers.fold_state import FoldState, build_fold, seed_everything
from trainers.labels import NUM_CLASSES
from trainers.loader import FoldLoader, epoch_seed
from trainers.resume import Progress, save_resume_state

TARGET_RATIO = 3.0
PLACEMENTS = ("loader", "device")
FIGURES = tuple(f"{p}_{kind}" for p in PLACEMENTS for kind in ("cpu_side", "total"))


class NullNet(nn.Module):
    """The cheapest model with fit's input and output: global average pool + Linear(3, 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def null_fold(cfg: TrainConfig, rows: np.ndarray, labels: np.ndarray, device: torch.device) -> FoldState:
    """A FoldState around ``NullNet``, built by ``trainers.fold_state.build_fold`` itself (loss, AdamW,
    schedule and scaler exactly as fit builds them)."""
    seed_everything(cfg.seed)
    return build_fold(cfg, 0, rows, labels, device, model=NullNet())


class CeilingRig:
    """The null fold, one FoldLoader per augmentation placement, and the epoch's writes."""

    def __init__(
        self, cfg: TrainConfig, cache_path: Path, rows: np.ndarray, labels: np.ndarray, run_dir: Path
    ):
        self.cfg, self.run_dir = cfg, run_dir
        self.device = torch.device("cpu")
        self.fold = null_fold(cfg, rows, labels, self.device)
        self.mean, self.std = input_stats(None)
        self.augment = DeviceAugment(cfg.augment, cfg.seed)
        self.loaders = {
            placement: FoldLoader(
                cache_path, rows, labels, cfg, 0, self.device, augment_on_loader=placement == "loader"
            )
            for placement in PLACEMENTS
        }
        for placement in PLACEMENTS:  # untimed: the first reads of the cache, one step each
            self.total(placement, 0)

    def cpu_side(self, placement: str, epoch: int, min_seconds: float = 0.5) -> float:
        """The loader alone: images/s of what the CPU does before the batch goes to the device. The epoch is
        read again until ``min_seconds`` have passed (slicing alone takes milliseconds an epoch)."""
        images, started = 0, time.perf_counter()
        while True:
            images += drain(self.loaders[placement].epoch(epoch))
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                return images / elapsed

    def write_epoch(self, epoch: int) -> None:
        """The writes fit does after an epoch in which the fold improved: best checkpoint, resume state."""
        path = fold_checkpoint_path(self.run_dir, 0)
        save_fold_checkpoint(path, self.fold.model, self.cfg, self.mean, self.std, 0, epoch, 0.5)
        save_resume_state(self.run_dir / "last.pt", [self.fold], self.cfg, Progress(last_epoch=epoch))

    def total(self, placement: str, epoch: int) -> tuple[float, float]:
        """fit's epoch (training step over the loader's epoch, then the writes): images/s, write seconds."""
        augment = self.augment if placement == "device" else None
        if augment is not None:
            augment.reseed(epoch_seed(self.cfg, 0, epoch))
        writes: list[float] = []

        def run() -> int:
            timed = TimedBatches(self.loaders[placement].epoch(epoch))
            channels_last = False  # CUDA only in fit
            train_one_epoch(
                self.fold, self.cfg, timed, self.device, self.mean, self.std, channels_last, augment
            )
            started = time.perf_counter()
            self.write_epoch(epoch)
            writes.append(time.perf_counter() - started)
            return timed.images

        return timed_rate(self.device, run), writes[-1]


def ceiling_config(settings: BenchSettings, space) -> TrainConfig:
    size = settings.ceiling_size or space.image_size
    return TrainConfig.from_dict(
        {
            "backbone": "null-gap-linear",  # never built: the model is NullNet
            "image_size": size,
            "batch_size": settings.ceiling_batch_size or space.batch_size,
            "augment": dict(space.augment),
            "num_workers": 0,
            "k": space.k,
            "pretrained": False,
            "device": "cpu",
            "seed": settings.seed,
        }
    )


def bench_ceiling(table: pd.DataFrame, settings: BenchSettings, work_dir: Path, log=print) -> dict[str, Any]:
    """Images/s per core of fit's loop with a null model, both placements, against the GPU rate per trial."""
    space = default_space()
    cfg = ceiling_config(settings, space)
    paths = sorted(table["image_path"])
    label_of = dict(zip(table["image_path"], table["label"], strict=True))
    cache_path, build_seconds = build_cache_timed(paths, cfg.image_size, work_dir / "ceiling-cache")
    n_images = settings.ceiling_batches * cfg.batch_size
    order = np.resize(np.random.default_rng(settings.seed).permutation(len(paths)), n_images)
    rows = image_cache.open_cache(cache_path).rows([paths[i] for i in order])
    labels = np.asarray([label_of[paths[i]] for i in order], dtype=np.int64)
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        log(
            f"ceiling: null model, {cfg.image_size[0]}x{cfg.image_size[1]} batch {cfg.batch_size}, "
            f"{n_images} images per measurement, 1 thread, 0 loader workers"
        )
        rig = CeilingRig(cfg, cache_path, rows, labels, work_dir / "ceiling-run")
        runs: dict[str, list[float]] = {name: [] for name in FIGURES}
        writes: list[float] = []
        for repeat in range(settings.repeats):
            epoch = repeat + 1
            for placement in PLACEMENTS:
                runs[f"{placement}_cpu_side"].append(rig.cpu_side(placement, epoch))
                rate, write_seconds = rig.total(placement, epoch)
                runs[f"{placement}_total"].append(rate)
                writes.append(write_seconds)
            log(f"ceiling: repeat {epoch}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in runs.items()))
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    per_core = {name: summarize_runs(values) for name, values in runs.items()}
    ratios = {}
    for backbone in space.backbones:
        if backbone not in PUBLISHED_TRAIN_RATES:
            continue
        gpu = gpu_rate_per_trial(backbone, cfg.image_size, space.gpu_share)
        ratios[backbone] = {
            "gpu_images_per_second_per_trial": gpu,
            **{name: per_core[name]["median"] * space.trial_cpus / gpu for name in FIGURES},
        }
    return {
        "config": {
            "model": "NullNet: global average pool + Linear(3, 18)",
            "image_size": list(cfg.image_size),
            "batch_size": cfg.batch_size,
            "augment": dict(cfg.augment),
            "torch_threads": 1,
            "opencv_threads": 1,
            "num_workers": 0,
            "images_per_measurement": n_images,
            "per_core": "1 torch thread, 1 OpenCV thread, 0 loader workers: loader and step share one core",
            "writes_per_epoch": "best checkpoint + resume state (save_resume_state), every measured epoch",
            "trial_cpus": space.trial_cpus,
            "gpu_share": space.gpu_share,
            "extrapolation": (
                f"per core x {space.trial_cpus:g} CPUs per trial (resources.cpu), ideal scaling over the "
                "trial's loader workers"
            ),
            "space": space.path,
        },
        "cache_build_seconds": build_seconds,
        "images_per_second_per_core": per_core,
        "epoch_write_seconds": summarize_runs(writes),
        "published": {
            "source": dict(PUBLISHED_SOURCE),
            "note": published_note(),
            "train_images_per_second": {
                b: {"rate": r, "batch_size": bs, "image_size": s}
                for b, (r, bs, s) in PUBLISHED_TRAIN_RATES.items()
            },
            "scaling": f"x {space.gpu_share:g} GPU per trial (resources.gpu) x 224*224 / (height*width)",
        },
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
    }
