"""The training input pipeline: seeded batches straight from the decode-once image cache.

Every image was decoded once into a memory-mapped uint8 array (trainers.cache); a batch is one
fancy-indexed read of that array plus, with ``augment_on: loader``, per-image augmentation on the CPU, so
the loader costs far less than the model step it feeds (BENCHMARKS.md, input). With ``augment_on: device``
the batch leaves the loader as it is in the cache and ``trainers.device_augment`` augments it on the GPU.

One loader per fold for the whole run (``FoldLoader``): its worker processes start once, not once per
epoch (on a GPU every start-up is idle time). The order and the augmentation are still seeded per (run,
fold, epoch): the sampler hands each index out with its epoch's seed, and a worker re-seeds its pipeline
when the seed changes, so a resumed run sees the same batches as an uninterrupted one, and a run with
persistent workers the same batches as one with a fresh loader per epoch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers import cache as image_cache
from trainers.config import TrainConfig
from trainers.device import check_shared_memory, loader_workers, shared_memory_need
from trainers.losses import balanced_sample_weights
from trainers.transforms import augment_batch, train_pipeline


class CachedImages(Dataset):
    """Training images straight from the memory-mapped cache, augmented per image unless ``augment`` is
    None (device augmentation). Items are ``(seed, index)`` pairs (see ``EpochSampler``); a plain index
    uses the dataset's own ``seed``.

    The memory map is opened lazily in each loader worker (pickling a memmap would copy the array).
    """

    def __init__(
        self, cache_path: Path, rows: np.ndarray, labels: np.ndarray, augment: dict | None, seed: int = 0
    ):
        self.cache_path, self.rows, self.labels = cache_path, rows, labels
        self.augment, self.seed = augment, seed
        self._images: np.ndarray | None = None
        self._pipeline = None
        self._pipeline_seed: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            self._images = image_cache.open_cache(self.cache_path).images
        if items and isinstance(items[0], tuple):
            seed, indices = items[0][0], np.asarray([index for _, index in items])
        else:
            seed, indices = self.seed, np.asarray(items)
        batch = self._images[self.rows[indices]]
        if self.augment is not None:
            if seed != self._pipeline_seed:  # a new epoch: the pipeline a fresh loader would have built
                worker = torch.utils.data.get_worker_info()
                self._pipeline = train_pipeline(self.augment, seed=seed + (worker.id if worker else 0))
                self._pipeline_seed = seed
            batch = augment_batch(self._pipeline, batch)
        else:
            batch = np.ascontiguousarray(batch)
        return torch.from_numpy(batch), torch.from_numpy(self.labels[indices])

    def __getitem__(self, index: int):  # DataLoader uses __getitems__; this keeps Dataset complete
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def _identity_collate(batch):
    return batch


class SeededShuffle(Sampler[int]):
    """A permutation seeded per (run, fold, epoch), so a resumed run sees the same batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.n


class EpochSampler(Sampler[tuple[int, int]]):
    """A fold's order for the epoch set by ``set_epoch_seed``: a seeded permutation, or class-balanced draws
    with replacement (``weights``, as ``WeightedRandomSampler`` draws them). Yields ``(seed, index)`` so the
    dataset knows which epoch a batch belongs to, also in a persistent worker."""

    def __init__(self, n: int, weights: torch.Tensor | None = None, seed: int = 0):
        self.n, self.weights, self.seed = n, weights, seed

    def set_epoch_seed(self, seed: int) -> None:
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        if self.weights is None:
            order = torch.randperm(self.n, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.n, True, generator=generator)
        return iter([(self.seed, index) for index in order.tolist()])

    def __len__(self) -> int:
        return self.n


def train_loader(
    cache_path: Path,
    rows: np.ndarray,
    labels: np.ndarray,
    augment: dict | None,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool | None = None,
    persistent_workers: bool = False,
) -> DataLoader:
    """Training batches from the memory-mapped cache, in a seeded order (or ``sampler``'s).

    Batches are assembled by ``CachedImages.__getitems__`` (one fancy-indexed read + batched
    augmentation), so collation is the identity. ``drop_last`` defaults to dropping a ragged last batch
    unless the images fit in one. ``augment`` None leaves the images as cached (device augmentation).
    """
    dataset = CachedImages(cache_path, rows, labels, augment, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler if sampler is not None else SeededShuffle(len(dataset), seed),
        num_workers=num_workers,
        collate_fn=_identity_collate,
        drop_last=len(dataset) > batch_size if drop_last is None else drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )


def epoch_seed(cfg: TrainConfig, fold: int, epoch: int) -> int:
    """The seed of one fold's batches in one epoch: the same on a resumed run as on an uninterrupted one."""
    return cfg.seed * 100_003 + fold * 1009 + epoch


class FoldLoader:
    """The one loader a fold trains with for the whole run: ``epoch(n)`` gives epoch n's batches.

    Workers persist across epochs; each epoch is seeded by ``epoch_seed``. ``augment_on_loader`` False
    leaves augmentation to the device (the batches are the cached uint8 images, pinned on CUDA). The
    number of workers is ``cfg.num_workers`` (``auto``: ``trainers.device.loader_workers``), refused with
    one line when ``/dev/shm`` cannot hold the batches they prepare.
    """

    def __init__(
        self,
        cache_path: Path,
        rows: np.ndarray,
        labels: np.ndarray,
        cfg: TrainConfig,
        fold: int,
        device: torch.device,
        augment_on_loader: bool = True,
    ):
        self.cfg, self.fold = cfg, fold
        weights = None
        if cfg.weighted_sampler:
            weights = torch.as_tensor(balanced_sample_weights(labels), dtype=torch.double)
        self.sampler = EpochSampler(len(rows), weights)
        self.workers = loader_workers(cfg.num_workers, not augment_on_loader, device, torch.get_num_threads())
        height, width = cfg.image_size
        check_shared_memory(
            shared_memory_need(self.workers, cfg.batch_size, (height, width)),
            f"{self.workers} loader worker(s) per fold at batch_size {cfg.batch_size} and {height}x{width}",
        )
        self.loader = train_loader(
            cache_path,
            rows,
            labels,
            cfg.augment if augment_on_loader else None,
            cfg.batch_size,
            seed=0,
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            sampler=self.sampler,
            persistent_workers=True,
        )

    def epoch(self, epoch: int) -> DataLoader:
        self.sampler.set_epoch_seed(epoch_seed(self.cfg, self.fold, epoch))
        return self.loader
