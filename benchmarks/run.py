"""The driver behind ``python -m benchmarks``: run the chosen sections, write the JSON, print the table."""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.ceiling import bench_ceiling
from benchmarks.checkpoint_io import bench_checkpoint
from benchmarks.data import choose_persons, read_table, resolve_data_root, subset_data_root
from benchmarks.gpu import bench_gpu
from benchmarks.input import bench_input
from benchmarks.memory import bench_memory
from benchmarks.report import format_report, json_safe, target_checks
from benchmarks.search import SearchBench, bench_asha, bench_overhead
from benchmarks.settings import (
    BENCH_FORMAT,
    COMMAND,
    DEFAULT_SECTIONS,
    BenchSettings,
    available_cpus,
    build_parser,
    load_average,
    settings_from_args,
)
from orchestrator.cli import report_user_error
from trainers.io import write_text_atomic

DATA_FREE = ("checkpoint",)  # sections that need no images (no data root is resolved for them alone)


def run_bench(
    settings: BenchSettings,
    sections: Sequence[str] = DEFAULT_SECTIONS,
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
            "cpus": available_cpus(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_start": load_average(),
        },
        "settings": asdict(settings),
        "sections": {},
    }
    try:
        root = full = table = persons = None
        if any(section not in DATA_FREE for section in sections):
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
                elif section == "ceiling":
                    outcome = bench_ceiling(table, settings, work_dir, log)
                elif section == "checkpoint":
                    outcome = bench_checkpoint(settings, work_dir, log)
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
    results["host"]["load_average_end"] = load_average()
    results["seconds"] = time.perf_counter() - started
    results["targets"] = target_checks(results["sections"])
    return results


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when every section ran, 1 when one failed (its error is in the JSON), 2 on a user error."""
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        results = run_bench(settings, args.only, args.data, args.work_dir, args.demo_persons)
    except KeyboardInterrupt:
        print("interrupted: no results written", file=sys.stderr)
        return 130
    except Exception as error:  # a BenchError (a FoldtuneError) is one `error:` line; a bug keeps its trace
        return report_user_error(error)
    results["command"] = " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)])
    write_text_atomic(json.dumps(json_safe(results), indent=2) + "\n", args.out)
    print(format_report(results))
    print(f"results: {args.out}")
    failed = [name for name, section in results["sections"].items() if "error" in section]
    return 1 if failed else 0
