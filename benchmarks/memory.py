"""Section ``memory``: two processes stream the whole memory-mapped cache at once, as two trials of a search
would; their RSS and PSS against the cache size show whether its pages are shared or copied."""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.data import build_cache_timed
from benchmarks.input import drain
from benchmarks.settings import WORKER_TIMEOUT_S, BenchError, BenchSettings, ratio
from trainers import cache as image_cache
from trainers.loader import train_loader


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


def collect_reports(results, workers: Sequence, timeout_s: float = WORKER_TIMEOUT_S) -> list[dict]:
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
        loader = train_loader(
            Path(cache_path), rows, np.zeros(len(rows), np.int64), {}, batch_size, seed, drop_last=False
        )
        started = time.perf_counter()
        images = drain(loader)
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
        reports = {report["pid"]: report for report in collect_reports(results, workers)}
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
        "cache_pss_sum_over_cache_bytes": ratio(total["cache_pss_bytes"], cache_bytes),
        "cache_rss_sum_over_cache_bytes": ratio(total["cache_rss_bytes"], cache_bytes),
        "pss_sum_over_cache_bytes": ratio(total["pss_bytes"], cache_bytes),
    }
