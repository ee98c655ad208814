"""The training input pipeline: seeded, augmented batches straight from the decode-once image cache.

Every image was decoded once into a memory-mapped uint8 array (trainers.cache); a batch is one
fancy-indexed read of that array plus per-image augmentation, so the loader costs far less than the model
step it feeds (BENCHMARKS.md, input). The order is seeded per (run, fold, epoch), so a resumed run sees the
same batches as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from trainers import cache as image_cache
from trainers.config import TrainConfig
from trainers.losses import balanced_sample_weights
from trainers.transforms import augment_batch, train_pipeline


class CachedImages(Dataset):
    """Training images straight from the memory-mapped cache, augmented per image.

    The memory map is opened lazily in each loader worker (pickling a memmap would copy the array).
    """

    def __init__(self, cache_path: Path, rows: np.ndarray, labels: np.ndarray, augment: dict, seed: int):
        self.cache_path, self.rows, self.labels = cache_path, rows, labels
        self.augment, self.seed = augment, seed
        self._images: np.ndarray | None = None
        self._pipeline = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            self._images = image_cache.open_cache(self.cache_path).images
            worker = torch.utils.data.get_worker_info()
            self._pipeline = train_pipeline(self.augment, seed=self.seed + (worker.id if worker else 0))
        indices = np.asarray(indices)
        batch = augment_batch(self._pipeline, self._images[self.rows[indices]])
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


def train_loader(
    cache_path: Path,
    rows: np.ndarray,
    labels: np.ndarray,
    augment: dict,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool | None = None,
) -> DataLoader:
    """Augmented training batches from the memory-mapped cache, in a seeded order (or ``sampler``'s).

    Batches are assembled by ``CachedImages.__getitems__`` (one fancy-indexed read + batched
    augmentation), so collation is the identity. ``drop_last`` defaults to dropping a ragged last batch
    unless the images fit in one.
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
        persistent_workers=False,
    )


def epoch_seed(cfg: TrainConfig, fold: int, epoch: int) -> int:
    """The seed of one fold's batches in one epoch: the same on a resumed run as on an uninterrupted one."""
    return cfg.seed * 100_003 + fold * 1009 + epoch


def fold_loader(
    cache_path: Path,
    rows: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    fold: int,
    epoch: int,
    device: torch.device,
) -> DataLoader:
    """The loader ``fit`` trains fold ``fold`` with in ``epoch``: seeded order, or class-balanced draws
    with ``weighted_sampler``."""
    seed = epoch_seed(cfg, fold, epoch)
    sampler = None
    if cfg.weighted_sampler:
        weights = torch.as_tensor(balanced_sample_weights(labels), dtype=torch.double)
        sampler = WeightedRandomSampler(weights, len(weights), generator=torch.Generator().manual_seed(seed))
    return train_loader(
        cache_path,
        rows,
        labels,
        cfg.augment,
        cfg.batch_size,
        seed,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        sampler=sampler,
    )
