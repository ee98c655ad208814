"""Section ``input``: is the training step ever left waiting for its batches?

Every training figure here is ``trainers.fit.train_one_epoch`` (the step ``fit`` runs) fed by a different
iterable of batches: (a) batches already in memory, (b) fit's own loader (``trainers.loader.FoldLoader``,
built once per fold for the whole run and asked for ``.epoch(e)`` each epoch, as fit does) on the decode-once
cache, (c) a seed-style loader that decodes every JPEG every epoch. Each feed is wrapped in
:class:`TimedBatches`, which counts the images trained and times how long the step waited for each batch.

Augmentation runs where fit would run it (``trainers.fit.augment_on_device``): on the loader on the CPU, on
the device (``trainers.device_augment.DeviceAugment``, applied inside the step) on CUDA unless the config
says otherwise.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from benchmarks.data import build_cache_timed
from benchmarks.settings import BenchSettings, ratio, summarize_runs
from trainers import cache as image_cache
from trainers.config import TrainConfig
from trainers.device_augment import DeviceAugment
from trainers.fit import augment_on_device, input_stats, train_one_epoch
from trainers.fold_state import FoldState, build_fold, seed_everything
from trainers.loader import FoldLoader, SeededShuffle, epoch_seed
from trainers.transforms import train_pipeline


class TimedBatches:
    """An iterable of (images, labels) batches that records how long each one took to arrive.

    ``waits`` gets the seconds spent in the wrapped iterable's ``next()`` for every batch (the first one's
    includes ``iter()``, i.e. loader worker start-up), and the final, empty ``next()``. ``images`` counts
    the images of the batches the consumer finished: a batch counts once the next one is asked for, so a
    step that stops early (a diverged loss) does not count the batch it gave up on.
    """

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]):
        self.batches = batches
        self.waits: list[float] = []
        self.images = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        started = time.perf_counter()
        iterator = iter(self.batches)
        pending = 0
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                self.waits.append(time.perf_counter() - started)
                self.images += pending
                return
            self.waits.append(time.perf_counter() - started)
            self.images += pending
            pending = len(batch[1])
            yield batch
            started = time.perf_counter()


class SeedStyleImages(Dataset):
    """What the seed scripts did: decode the full JPEG with PIL every time, resize, then augment."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, size: tuple[int, int], augment, seed: int):
        self.paths, self.labels, self.size = list(paths), labels, size
        self.augment, self.seed = augment, seed
        self._pipeline = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self._pipeline is None:
            worker = torch.utils.data.get_worker_info()
            self._pipeline = train_pipeline(self.augment, seed=self.seed + (worker.id if worker else 0))
        height, width = self.size
        with Image.open(self.paths[index]) as image:
            pixels = np.array(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))
        augmented = self._pipeline(image=np.ascontiguousarray(pixels))["image"]
        return torch.from_numpy(np.ascontiguousarray(augmented)), int(self.labels[index])


def seed_style_loader(
    cfg: TrainConfig, paths: Sequence[str], labels: np.ndarray, device: torch.device, seed: int
) -> DataLoader:
    """The seed scripts' loader: per-image decode, default collate; same batches, workers and order."""
    dataset = SeedStyleImages(paths, labels, tuple(cfg.image_size), cfg.augment, seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=SeededShuffle(len(dataset), seed),
        num_workers=cfg.num_workers,
        drop_last=len(dataset) > cfg.batch_size,
        pin_memory=device.type == "cuda",
    )


def make_fold(cfg: TrainConfig, rows: np.ndarray, labels: np.ndarray, device: torch.device) -> FoldState:
    """One fold's training state, built by fit's own ``build_fold`` (random init: no weights needed)."""
    seed_everything(cfg.seed)
    return build_fold(cfg, 0, rows, labels, device)


def timed_rate(device: torch.device, action: Callable[[], int]) -> float:
    """Images per second of ``action``, which returns how many images it processed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    images = action()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - started)


def drain(loader: Iterable) -> int:
    """Read every batch of ``loader``; the number of images."""
    count = 0
    for images, _ in loader:
        count += len(images)
    return count


@dataclass
class InputRig:
    """What the input measurements share: one config, one fold state, one cache and the same images.

    fit's loaders (``FoldLoader``) are built once per image count and worker count, outside every timed
    region, and their first epoch is read untimed: worker start-up happens once per run in fit too.
    """

    cfg: TrainConfig
    device: torch.device
    cache_path: Path
    rows: np.ndarray  # cache rows of the measured images (a seeded order, repeated when data is short)
    labels: np.ndarray
    paths: list[str]  # the same images' files, for the seed-style loader
    fold: FoldState
    memory_batches: list = field(default_factory=list)
    loaders: dict[tuple[int, int], FoldLoader] = field(default_factory=dict)
    augment: DeviceAugment | None = None  # device augmentation, when fit would augment on the device

    @classmethod
    def build(
        cls,
        cfg: TrainConfig,
        device: torch.device,
        cache_path: Path,
        paths: Sequence[str],
        labels: Sequence[int],
        n_images: int,
        seed: int,
    ) -> InputRig:
        cache = image_cache.open_cache(cache_path)
        order = np.random.default_rng(seed).permutation(len(paths))
        order = np.resize(order, max(n_images, 1))  # repeat the order when the data set is smaller
        chosen_paths = [str(paths[i]) for i in order]
        chosen_labels = np.asarray(labels, dtype=np.int64)[order]
        rows = cache.rows(chosen_paths)
        fold = make_fold(cfg, rows, chosen_labels, device)
        augment = DeviceAugment(cfg.augment, cfg.seed) if augment_on_device(cfg, device) else None
        return cls(cfg, device, cache_path, rows, chosen_labels, chosen_paths, fold, augment=augment)

    def _first(self, n_images: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return self.rows[:n_images], self.labels[:n_images], self.paths[:n_images]

    def train(self, batches: Iterable, epoch: int = 0) -> TimedBatches:
        """One ``train_one_epoch`` over ``batches``, as fit calls it (random init: ImageNet mean/std)."""
        timed = TimedBatches(batches)
        mean, std = input_stats(None)
        channels_last = self.cfg.channels_last and self.device.type == "cuda"
        if self.augment is not None:  # fit reseeds its device augmentation per fold and epoch
            self.augment.reseed(epoch_seed(self.cfg, self.fold.index, epoch))
        train_one_epoch(self.fold, self.cfg, timed, self.device, mean, std, channels_last, self.augment)
        return timed

    def loader(self, cfg: TrainConfig, n_images: int) -> FoldLoader:
        """fit's loader of this fold over the first ``n_images`` measured images, built once (untimed)."""
        key = (n_images, cfg.num_workers)
        if key not in self.loaders:
            rows, labels, _ = self._first(n_images)
            loader = FoldLoader(
                self.cache_path,
                rows,
                labels,
                cfg,
                self.fold.index,
                self.device,
                augment_on_loader=self.augment is None,
            )
            drain(loader.epoch(0))  # start the (persistent) workers and read the pages once
            self.loaders[key] = loader
        return self.loaders[key]

    def warm_up(self, train_batches: int) -> None:
        """Run the first (slow) steps untimed and keep real batches in memory for (a): augmented when the
        loader augments, as cached when the device does (the step then augments them, as in fit)."""
        loader = self.loader(replace(self.cfg, num_workers=0), train_batches * self.cfg.batch_size)
        pin = self.device.type == "cuda"  # as the loader's pin_memory would
        self.memory_batches = [
            (images.pin_memory() if pin else images, targets) for images, targets in loader.epoch(0)
        ]
        self.train(self.memory_batches[:3])

    def compute_only(self) -> float:
        """(a) the training step alone on batches already in memory: what no loader can beat."""
        return timed_rate(self.device, lambda: self.train(self.memory_batches).images)

    def cached_epoch(self, train_batches: int, epoch: int) -> tuple[float, float]:
        """(b) fit's epoch: its loader's ``epoch(epoch)`` on the cache, feeding its step.

        Returns images/s and the share of the epoch the loop spent waiting for its loader: a figure taken
        inside one run, so unlike (b)/(a) it does not move with the load of other processes.
        """
        loader = self.loader(self.cfg, train_batches * self.cfg.batch_size)
        fed: list[TimedBatches] = []

        def run() -> int:
            fed.append(self.train(loader.epoch(epoch), epoch))
            return fed[-1].images

        started = time.perf_counter()
        rate = timed_rate(self.device, run)
        seconds = time.perf_counter() - started
        return rate, sum(fed[-1].waits) / seconds

    def seed_style_train(self, train_batches: int, epoch: int) -> float:
        """(c) the same training step fed by the seed-style loader (built per epoch, as the seed did)."""
        _, labels, paths = self._first(train_batches * self.cfg.batch_size)
        loader = seed_style_loader(self.cfg, paths, labels, self.device, epoch)
        return timed_rate(self.device, lambda: self.train(loader, epoch).images)

    def cached_loader_only(self, loader_batches: int, epoch: int) -> float:
        """(b)'s loader alone: images/s the decode-once cache (+ loader augmentation) can deliver."""
        loader = self.loader(self.cfg, loader_batches * self.cfg.batch_size)
        return timed_rate(torch.device("cpu"), lambda: drain(loader.epoch(epoch)))

    def seed_loader_only(self, loader_batches: int, epoch: int) -> float:
        """(c)'s loader alone: images/s of decoding every JPEG every epoch + the same augmentations."""
        _, labels, paths = self._first(loader_batches * self.cfg.batch_size)
        loader = seed_style_loader(self.cfg, paths, labels, self.device, epoch)
        return timed_rate(torch.device("cpu"), lambda: drain(loader))


def bench_input(table: pd.DataFrame, settings: BenchSettings, work_dir: Path, log=print) -> dict[str, Any]:
    """Images/s of (a) compute only, (b) fit's cached loop, (c) seed-style; loaders alone; cache build."""
    cfg = settings.train_config()
    device = torch.device("cpu")
    paths = sorted(table["image_path"])
    label_of = dict(zip(table["image_path"], table["label"], strict=True))
    builds, cache_path = [], None
    for repeat in range(settings.repeats):  # a fresh folder each time: the build itself is measured
        cache_dir = work_dir / "input-cache" / f"build{repeat}"
        if cache_path is not None:
            shutil.rmtree(cache_path.parent, ignore_errors=True)
        cache_path, seconds = build_cache_timed(paths, cfg.image_size, cache_dir)
        builds.append(seconds)
    cache_bytes = cache_path.stat().st_size
    n_images = max(settings.train_batches, settings.loader_batches) * cfg.batch_size
    rig = InputRig.build(
        cfg, device, cache_path, paths, [label_of[p] for p in paths], n_images, settings.seed
    )
    log(
        f"input: {settings.backbone} {cfg.image_size[0]}x{cfg.image_size[1]} batch {cfg.batch_size}, "
        f"{cfg.num_workers} loader workers, {len(paths)} images cached; warming up"
    )
    rig.warm_up(settings.train_batches)
    runs: dict[str, list[float]] = {
        "compute_only": [],
        "cached_train": [],
        "seed_train": [],
        "cached_loader": [],
        "seed_loader": [],
    }
    waits = []
    for repeat in range(settings.repeats):
        epoch = repeat + 1
        runs["compute_only"].append(rig.compute_only())
        rate, wait_share = rig.cached_epoch(settings.train_batches, epoch)
        runs["cached_train"].append(rate)
        waits.append(wait_share)
        runs["seed_train"].append(rig.seed_style_train(settings.train_batches, epoch))
        runs["cached_loader"].append(rig.cached_loader_only(settings.loader_batches, epoch))
        runs["seed_loader"].append(rig.seed_loader_only(settings.loader_batches, epoch))
        log(f"input: repeat {epoch}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in runs.items()))
    paired = list(zip(*runs.values(), strict=True))
    return {
        "config": {
            "backbone": cfg.backbone,
            "image_size": list(cfg.image_size),
            "batch_size": cfg.batch_size,
            "num_workers": cfg.num_workers,
            "augment": dict(cfg.augment),
            "torch_threads": torch.get_num_threads(),
            "train_images_per_measurement": settings.train_batches * cfg.batch_size,
            "loader_images_per_measurement": settings.loader_batches * cfg.batch_size,
        },
        "images_per_second": {name: summarize_runs(values) for name, values in runs.items()},
        # ratios per repeat (paired: measured back to back), then their median
        "cached_vs_compute": summarize_runs([ratio(b, a) for a, b, *_ in paired]),
        "cached_vs_seed_train": summarize_runs([ratio(b, c) for _, b, c, _, _ in paired]),
        "cached_vs_seed_loader": summarize_runs([ratio(bl, cl) for *_, bl, cl in paired]),
        # share of (b)'s epoch spent waiting for its loader; 1 - share is (b)/(a) without the noise of load
        "cached_input_wait_share": summarize_runs(waits),
        "cache": {
            "images": len(paths),
            "image_size": list(cfg.image_size),
            "build_seconds": summarize_runs(builds),
            "build_images_per_second": summarize_runs([len(paths) / s for s in builds]),
            "bytes": cache_bytes,
            "bytes_per_image": cache_bytes / len(paths),
            "source_bytes": int(sum(os.path.getsize(p) for p in paths)),
        },
    }
