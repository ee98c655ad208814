"""Section ``checkpoint``: bytes and seconds of one epoch's checkpoint writes, for each default backbone.

fit writes two kinds of file. The resume state (``last.pt``): before, every epoch, k folds of the whole
model state + AdamW state; now every ``resume_every_epochs`` epochs (to ``fit(resume_dir=...)``, node-local
in a search), with only ``trainers.fold_state.trainable_state`` of each model (no frozen parameters):
``trainers.resume.save_resume_state``, measured as fit calls it (the old layout is rebuilt here). And
each fold's best checkpoint (``trainers.checkpoint.save_fold_checkpoint``, the whole model) whenever its
validation F1 improves: unchanged, and at worst k files every epoch.

Each model is built with random init (``trainers.fold_state.build_fold``: no download) and takes one AdamW
step on a tiny batch, so its optimizer state exists, as it does after any epoch. ONE fold's files are written
(``trainers.io.atomic_torch_save``, with its fsync) and the per-epoch figures multiply them by k: five folds
of convnext_tiny with Adam moments are ~1.7 GB a write. The one-fold file holds the header (config, history)
once instead of once per k folds: kilobytes, against tens to hundreds of MB of tensors. Files go to a
folder under the bench's work directory, whose file system is recorded (a tmpfs measures memory, not disk).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.reference import default_space
from benchmarks.settings import BenchSettings, summarize_runs
from trainers.checkpoint import save_fold_checkpoint
from trainers.config import TrainConfig
from trainers.fit import input_stats, train_one_epoch
from trainers.fold_state import FoldState, build_fold, seed_everything
from trainers.io import atomic_torch_save
from trainers.resume import Progress, save_resume_state


def old_resume_state(folds: list[FoldState], cfg: TrainConfig, epoch: int) -> dict[str, Any]:
    """The resume state fit wrote before (every epoch): each fold's WHOLE model state, frozen parameters
    included, with its optimizer, schedule and scaler (the new one: ``trainers.resume.save_resume_state``)."""
    return {
        "epoch": epoch,
        "config": cfg.to_dict(),
        "history": [],
        "best_mean_f1": -1.0,
        "best_mean_epoch": 0,
        "folds": [
            {
                "model": f.model.state_dict(),
                "optimizer": f.optimizer.state_dict(),
                "scheduler": f.scheduler.state_dict(),
                "scaler": f.scaler.state_dict(),
                "best_f1": f.best_f1,
                "best_epoch": f.best_epoch,
                "best_probs": torch.from_numpy(f.best_probs) if f.best_probs is not None else None,
            }
            for f in folds
        ],
    }


def timed_write(write: Callable[[Path], object], path: Path) -> tuple[int, float]:
    """Bytes and seconds of one atomic write (temporary file, fsync, rename) to ``path``."""
    started = time.perf_counter()
    write(path)
    seconds = time.perf_counter() - started
    return path.stat().st_size, seconds


def filesystem_of(path: Path) -> str:
    """The file system type holding ``path`` (the longest mount point above it), or "unknown"."""
    path = Path(path).resolve()
    best, kind = "", "unknown"
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1]
        inside = path == Path(mount) or Path(mount) in path.parents
        if inside and len(mount) > len(best):
            best, kind = mount, parts[2]
    return kind


def stepped_fold(cfg: TrainConfig, device: torch.device) -> FoldState:
    """One fold as fit builds it (random init), after one training step on a batch of two images."""
    seed_everything(cfg.seed)
    labels = np.array([0, 1], dtype=np.int64)
    fold = build_fold(cfg, 0, np.arange(2), labels, device)
    height, width = cfg.image_size
    images = torch.randint(0, 256, (2, height, width, 3), dtype=torch.uint8)
    mean, std = input_stats(None)
    train_one_epoch(fold, cfg, [(images, torch.from_numpy(labels))], device, mean, std, False)
    return fold


def _writes(fold: FoldState, cfg: TrainConfig, with_best: bool) -> dict[str, Callable[[Path], object]]:
    """The writes measured, each given its path: the old and new resume state, and the best checkpoint."""
    mean, std = input_stats(None)
    writes = {
        "old": lambda path: atomic_torch_save(old_resume_state([fold], cfg, 1), path),
        "new": lambda path: save_resume_state(path, [fold], cfg, Progress(last_epoch=1)),
    }
    if with_best:
        writes["best"] = lambda path: save_fold_checkpoint(path, fold.model, cfg, mean, std, 0, 1, 0.5)
    return writes


def _per_epoch(bytes_one_fold: int, seconds: dict, k: int, every: int) -> dict[str, float]:
    """One fold's write, times k folds, written once every ``every`` epochs: per epoch."""
    return {"bytes": k * bytes_one_fold / every, "seconds": k * seconds["median"] / every}


def bench_checkpoint(settings: BenchSettings, work_dir: Path, log=print) -> dict[str, Any]:
    """Per default backbone and freeze depth: the old and new resume state and the best checkpoint."""
    space = default_space()
    backbones = settings.checkpoint_backbones or space.backbones
    size = settings.checkpoint_size or space.image_size
    depths = settings.checkpoint_depths or space.freeze_depths
    every = sorted({1, space.resume_every_epochs or 1})
    k = space.k
    out_dir = work_dir / "checkpoint-io"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu")
    results: dict[str, Any] = {}
    for backbone in backbones:
        entry: dict[str, Any] = {"depths": {}}
        for depth in depths:
            cfg = TrainConfig.from_dict(
                {
                    "backbone": backbone,
                    "image_size": size,
                    "batch_size": 2,
                    "freeze_depth": depth,
                    "k": k,
                    "pretrained": False,
                    "device": "cpu",
                    "seed": settings.seed,
                }
            )
            log(f"checkpoint: {backbone} freeze_depth {depth}: building, one AdamW step, writing")
            fold = stepped_fold(cfg, device)
            # the best checkpoint is the whole model, the same whatever the freeze depth: written once
            kinds = _writes(fold, cfg, with_best="best_checkpoint" not in entry)
            sizes: dict[str, int] = {}
            seconds: dict[str, list[float]] = {name: [] for name in kinds}
            for _ in range(settings.repeats):  # interleaved, so a burst of load hits every kind alike
                for name, write in kinds.items():
                    sizes[name], elapsed = timed_write(write, out_dir / f"{name}.pt")
                    seconds[name].append(elapsed)
            figures = {
                name: {"bytes": sizes[name], "seconds": summarize_runs(seconds[name])} for name in kinds
            }
            if "best" in figures:
                entry["best_checkpoint"] = figures.pop("best")
            per_epoch = {"old": _per_epoch(sizes["old"], figures["old"]["seconds"], k, 1)}
            for n in every:
                per_epoch[f"new_every_{n}"] = _per_epoch(sizes["new"], figures["new"]["seconds"], k, n)
            entry["depths"][str(depth)] = {
                "params_total": fold.freeze.total_params,
                "params_trainable": fold.freeze.trainable_params,
                **figures,
                "per_epoch": per_epoch,
                "new_over_old_bytes": sizes["new"] / sizes["old"],
            }
            del fold, kinds
            gc.collect()
        best = entry["best_checkpoint"]
        entry["best_per_epoch_worst_case"] = _per_epoch(best["bytes"], best["seconds"], k, 1)
        results[backbone] = entry
        log(f"checkpoint: {backbone}: " + _summary_line(entry))
    for leftover in out_dir.glob("*.pt"):
        leftover.unlink()
    return {
        "config": {
            "k": k,
            "image_size": list(size),
            "freeze_depths": list(depths),
            "resume_every_epochs": every,
            "space_resume_every_epochs": space.resume_every_epochs,
            "directory": str(out_dir),
            "filesystem": filesystem_of(out_dir),
            "measured": "one fold written, per-epoch figures x k folds",
        },
        "backbones": results,
    }


def _summary_line(entry: dict[str, Any]) -> str:
    parts = []
    for depth, figures in entry["depths"].items():
        old, new = figures["per_epoch"]["old"], figures["per_epoch"]["new_every_1"]
        parts.append(
            f"depth {depth}: old {old['bytes'] / 2**20:.0f} MiB {old['seconds']:.2f} s/epoch, "
            f"new {new['bytes'] / 2**20:.0f} MiB {new['seconds']:.2f} s/epoch"
        )
    return "; ".join(parts)
