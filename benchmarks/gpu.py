"""Section ``gpu``: AMP + channels_last vs fp32 vs compute-only on one device, and two training processes
sharing one GPU vs one; skipped with a note when no CUDA device is visible.

Every figure is an :class:`benchmarks.input.InputRig` measurement: ``trainers.fit.train_one_epoch`` fed by
batches in memory (compute only) or by fit's own loader (``FoldLoader``) on the cache, with augmentation
where fit puts it (on CUDA: on the device). ``python -m benchmarks.gpu_device`` is the fuller GPU bench.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.data import build_cache_timed
from benchmarks.input import InputRig
from benchmarks.memory import collect_reports
from benchmarks.settings import WORKER_TIMEOUT_S, BenchError, BenchSettings, ratio, summarize_runs
from trainers.config import TrainConfig
from trainers.fit import augment_on_device


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
        reports = collect_reports(results, workers)
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
    waits: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(settings.repeats):
        for name, rig in rigs.items():
            runs[f"{name}_compute_only"].append(rig.compute_only())
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
            "augment_on": "device" if augment_on_device(configs["amp_channels_last"], device) else "loader",
        },
        "cache_build_seconds": build_seconds,
        "images_per_second": {name: summarize_runs(values) for name, values in runs.items()},
        # share of the cached epoch the GPU loop waited for its loader (the GPU idles meanwhile)
        "cached_input_wait_share": {name: summarize_runs(values) for name, values in waits.items()},
        "amp_speedup": summarize_runs(
            [ratio(b, a) for a, b in zip(runs["fp32_cached"], runs["amp_channels_last_cached"], strict=True)]
        ),
        "cached_vs_compute": summarize_runs(
            [
                ratio(b, a)
                for a, b in zip(
                    runs["amp_channels_last_compute_only"], runs["amp_channels_last_cached"], strict=True
                )
            ]
        ),
        "sharing": sharing,
        "two_processes_vs_one": ratio(two, one),
    }
