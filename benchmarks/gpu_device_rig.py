"""One configuration of ``python -m benchmarks.gpu_device``: the plan, the synthetic cache, and a fold built,
warmed up and timed through ``trainers.fit.train_one_epoch`` (see ``benchmarks.gpu_device``).

Imports nothing of ``orchestrator``: only ``trainers`` and its own dependencies."""

from __future__ import annotations

import gc
import itertools
import json
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from trainers import cache as image_cache
    from trainers.config import TrainConfig
    from trainers.device import apply_backend_settings
    from trainers.device_augment import DeviceAugment
    from trainers.fit import input_stats, train_one_epoch
    from trainers.fold_state import build_fold, seed_everything
    from trainers.loader import FoldLoader
except ModuleNotFoundError as missing:  # e.g. the GPU machine's python: torch and timm, no albumentations
    raise ModuleNotFoundError(
        f"{missing}: benchmarks.gpu_device needs trainers' dependencies (albumentations and its albucore, "
        "pydantic, pydantic-core, annotated-types, typing-inspection, stringzilla, simsimd); carry them as "
        "wheels, see BENCHMARKS.md"
    ) from missing

FORMAT = 1
TINY_BACKBONES = ("test_efficientnet", "test_convnext", "test_resnet")  # timm's tiny stand-ins, same families


@dataclass(frozen=True)
class Variant:
    """One configuration of the step: what feeds it, where augmentation runs, precision, memory format, and
    the two GPU speed settings a first run has to measure (``cudnn_benchmark`` on by default, ``compile``
    off by default)."""

    input: str  # "memory" (compute only) or "loader"
    augment_on: str  # "none" (memory), "loader" or "device"
    amp: bool
    channels_last: bool
    cudnn_benchmark: bool = True
    compile: bool = False

    @property
    def name(self) -> str:
        feed = "compute" if self.input == "memory" else f"loader+{self.augment_on}-aug"
        name = f"{feed}/{'amp' if self.amp else 'fp32'}/{'channels_last' if self.channels_last else 'nchw'}"
        return (
            name
            + ("" if self.cudnn_benchmark else "/no-cudnn-benchmark")
            + ("/compile" if self.compile else "")
        )


COMPUTE = Variant("memory", "none", True, True)
LOADER_DEVICE = Variant("loader", "device", True, True)
LOADER_LOADER = Variant("loader", "loader", True, True)
NO_CUDNN_BENCHMARK = replace(COMPUTE, cudnn_benchmark=False)
COMPILED = replace(COMPUTE, compile=True)
# most important first: what the default space trains with, then the precision / memory-format grid, then
# the speed settings (compile last: its first steps compile for a minute or more)
FIRST = (COMPUTE, LOADER_DEVICE, LOADER_LOADER)
THEN = (
    Variant("memory", "none", False, False),
    Variant("memory", "none", False, True),
    replace(COMPUTE, channels_last=False),
    NO_CUDNN_BENCHMARK,
)
LAST = (COMPILED,)
PACKED = LOADER_DEVICE


@dataclass(frozen=True)
class Plan:
    """Everything a run depends on; saved into the JSON."""

    device: str
    backbones: tuple[str, ...]
    image_size: tuple[int, int]
    batch_size: int
    num_workers: int | str
    threads: int
    augment: dict
    warmup_steps: int
    steps: int
    max_config_s: float
    budget_s: float
    packed: bool
    packed_s: float  # the timed window of each packed measurement
    setup_allowance_s: float  # build + warm-up time assumed per configuration when checking the deadline
    cache_images: int
    seed: int = 0
    tiny: bool = False
    compile_allowance_s: float = 120.0  # the same for a compiled configuration (its warm-up compiles)

    def configurations(self) -> list[tuple[str, Variant]]:
        return [(b, v) for group in (FIRST, THEN, LAST) for b in self.backbones for v in group]

    def allowance_s(self, variant: Variant) -> float:
        return self.compile_allowance_s if variant.compile else self.setup_allowance_s

    def train_config(self, backbone: str, variant: Variant) -> TrainConfig:
        return TrainConfig.from_dict(
            {
                "backbone": backbone,
                "pretrained": False,
                "image_size": list(self.image_size),
                "batch_size": self.batch_size,
                "augment": dict(self.augment),
                "num_workers": self.num_workers,
                "augment_on": "loader" if variant.augment_on in ("none", "loader") else "device",
                "amp": variant.amp,
                "channels_last": variant.channels_last,
                "cudnn_benchmark": variant.cudnn_benchmark,
                "compile": variant.compile,
                "device": self.device,
                "epochs": 1,
                "seed": self.seed,
            }
        )

    def packed_reserve_s(self) -> float:
        """What the packed phase is given: process start, then per backbone build, warm-up and window."""
        if not self.packed:
            return 0.0
        return 30.0 + len(self.backbones) * (self.packed_s + self.setup_allowance_s)


# --- the synthetic cache ----------------------------------------------------------------------------------


def write_synthetic_cache(folder: Path, n: int, size: tuple[int, int], seed: int) -> Path:
    """A uint8 (N, H, W, 3) cache in trainers.cache's format (.npy + .json index) of smooth random images."""
    height, width = size
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"images-{height}x{width}-synthetic.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, height, width, 3))
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    rows = np.minimum(np.arange(height) * coarse.shape[1] // height, coarse.shape[1] - 1)
    cols = np.minimum(np.arange(width) * coarse.shape[2] // width, coarse.shape[2] - 1)
    for start in range(0, n, 64):  # blocky colour fields plus noise: JPEG-like content, no decoding
        block = coarse[start : start + 64][:, rows][:, :, cols].astype(np.int16)
        block += rng.integers(-12, 13, block.shape, dtype=np.int16)
        array[start : start + 64] = np.clip(block, 0, 255).astype(np.uint8)
    array.flush()
    del array
    index = {"format": image_cache.CACHE_FORMAT, "size": [height, width], "crop": None}
    index["paths"] = [f"synthetic/{i:06d}.jpg" for i in range(n)]
    path.with_suffix(".json").write_text(json.dumps(index))
    image_cache.open_cache(path)  # checks the format as trainers reads it
    return path


# --- one configuration ------------------------------------------------------------------------------------


class Limited:
    """At most ``steps`` batches of ``batches``, and none after ``until`` (perf_counter); times the waits."""

    def __init__(self, batches: Iterable, steps: int, until: float = float("inf")):
        self.batches, self.steps, self.until = batches, steps, until
        self.images, self.count, self.wait = 0, 0, 0.0

    def __iter__(self) -> Iterator:
        iterator = iter(self.batches)
        while self.count < self.steps and time.perf_counter() < self.until:
            started = time.perf_counter()
            try:
                images, labels = next(iterator)
            except StopIteration:
                return
            self.wait += time.perf_counter() - started
            self.count += 1
            self.images += len(labels)
            yield images, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ConfigRun:
    """One configuration built and warmed up (untimed); ``timed()`` measures it."""

    def __init__(self, plan: Plan, backbone: str, variant: Variant, cache_path: Path, window_steps: int):
        self.plan, self.variant = plan, variant
        self.device = torch.device(plan.device)
        self.cfg = plan.train_config(backbone, variant)
        n_rows = plan.batch_size * max(window_steps, plan.warmup_steps, 1)
        rng = np.random.default_rng(plan.seed)
        rows = np.resize(rng.permutation(plan.cache_images), n_rows)
        labels = rng.integers(0, 18, n_rows).astype(np.int64)
        seed_everything(plan.seed)
        apply_backend_settings(self.cfg.cudnn_benchmark, self.cfg.tf32, self.device)  # as fit does
        self.fold = build_fold(self.cfg, 0, rows, labels, self.device)
        self.channels_last = self.cfg.channels_last and self.device.type == "cuda"  # as fit
        self.mean, self.std = input_stats(None)
        self.augment = DeviceAugment(self.cfg.augment, plan.seed) if variant.augment_on == "device" else None
        self.loader, self.batches = None, []
        if variant.input == "memory":
            images, pin = image_cache.open_cache(cache_path).images, self.device.type == "cuda"
            b = plan.batch_size
            for i in range(min(16, max(1, n_rows // b))):
                batch = torch.from_numpy(np.ascontiguousarray(images[rows[i * b : (i + 1) * b]]))
                self.batches.append(
                    (batch.pin_memory() if pin else batch, torch.from_numpy(labels[i * b : (i + 1) * b]))
                )
        else:
            on_loader = variant.augment_on == "loader"
            self.loader = FoldLoader(cache_path, rows, labels, self.cfg, 0, self.device, on_loader)
        self._train(Limited(self._feed(0), plan.warmup_steps))  # first steps, loader workers start
        _sync(self.device)

    def _feed(self, epoch: int) -> Iterable:
        return self.loader.epoch(epoch) if self.loader is not None else itertools.cycle(self.batches)

    def _train(self, batches: Limited) -> float:
        return train_one_epoch(
            self.fold, self.cfg, batches, self.device, self.mean, self.std, self.channels_last, self.augment
        )

    def timed(self, steps: int, seconds: float) -> dict[str, Any]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        _sync(self.device)
        started = time.perf_counter()
        batches = Limited(self._feed(1), steps, started + seconds)
        loss = self._train(batches)  # reads the loss once at the end: waits for the GPU
        _sync(self.device)
        elapsed = time.perf_counter() - started
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {
            "images_per_second": batches.images / elapsed,
            "ms_per_step": 1000 * elapsed / max(1, batches.count),
            "steps": batches.count,
            "seconds": elapsed,
            "input_wait_share": batches.wait / elapsed,
            "train_loss": loss.mean,
            "skipped_steps": loss.skipped,
            "peak_memory_bytes": peak,
        }

    def close(self) -> None:
        self.loader = self.batches = self.fold = None  # the loader's workers end with it
        release(self.device)


def release(device: torch.device) -> None:
    """Free what a finished (or failed) configuration left: its loader workers and its GPU memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_config(plan: Plan, backbone: str, variant: Variant, cache_path: Path) -> dict[str, Any]:
    """Build and warm up one configuration, then time it; everything it held is freed, also on an error."""
    run = None
    try:
        run = ConfigRun(plan, backbone, variant, cache_path, plan.steps)
        return run.timed(plan.steps, plan.max_config_s)
    finally:
        if run is not None:
            run.close()
        else:
            release(torch.device(plan.device))


def error_record(error: BaseException) -> dict[str, str]:
    return {
        "error": f"{type(error).__name__}: {error}"[:500],
        "trace": traceback.format_exc(limit=-4)[-2000:],
    }
