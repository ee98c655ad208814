"""``python -m benchmarks.gpu_device`` (``make bench-gpu``): what one GPU trains per second through foldtune's
own training step, per default backbone, as one short device script.

Needs only ``trainers`` with its own dependencies (PyTorch, timm, albumentations, ...): nothing of
``orchestrator``, Ray, Optuna or MLflow is imported, so it runs on a GPU machine that has its own PyTorch and
cannot take the project's virtualenv along (see BENCHMARKS.md for carrying albumentations there).

For each backbone of the default space (``search_spaces/default.yaml``) at its image size and batch size,
every configuration is ``trainers.fit.train_one_epoch`` on a ``trainers.fold_state.build_fold`` fold (random
init, no download):

- compute only: uint8 batches already in (pinned) memory, no augmentation, fp32 or AMP (the dtype
  ``trainers.predict.amp_dtype`` picks: bf16 where native, else fp16 with loss scaling) x channels_last;
- the real loader: a ``trainers.loader.FoldLoader`` over a synthetic cache with the space's workers, at
  AMP + channels_last (the space's), augmenting on the loader (albumentations in the workers) or on the
  device (``trainers.device_augment.DeviceAugment``; the loader only slices, as fit does on CUDA);
- two processes packed on the GPU, each with ``torch.cuda.set_per_process_memory_fraction(0.5)`` (as
  ``resources.gpu: 0.5`` packs two trials), each running the real loader with device augmentation for the
  same wall-clock window: images/s each and in total, against one process alone;
- the GPU speed settings a first run must measure: compute only with ``cudnn_benchmark`` off (on is the
  default) and with ``compile: true`` (off by default until measured; its warm-up compiles; CUDA only).

Time bound: a configuration runs ``--warmup-steps`` untimed steps, then at most ``--steps`` timed steps or
``--max-config-s`` seconds, whichever ends first; configurations run most important first (compute and both
loaders at AMP + channels_last, then the fp32 / NCHW ones) and one that could not end before the grid's
deadline is recorded as skipped; the packed processes get the rest of ``--budget-s`` and are killed at its
end. Defaults (540 s budget) end the script within about 9.5 minutes on an H200.

The images are synthetic: the script writes a uint8 cache in ``trainers.cache``'s format itself. Each
configuration runs in try/except (its error goes into the JSON; the others still run), and the JSON and the
Markdown table in ``--out`` are rewritten after each one, so a run cut short keeps what it measured.
``--tiny`` runs the same code on the CPU with tiny models and sizes in seconds (what the tests run).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_device_report import write_outputs
from benchmarks.gpu_device_rig import (
    FORMAT,
    PACKED,
    TINY_BACKBONES,
    ConfigRun,
    Plan,
    error_record,
    run_config,
    write_synthetic_cache,
)
from benchmarks.reference import default_space
from trainers.device import amp_dtype

DEFAULT_OUT = Path("bench-results") / "gpu"


def make_plan(args: argparse.Namespace) -> Plan:
    if args.tiny:
        plan = Plan(
            device=args.device or "cpu",
            backbones=TINY_BACKBONES,
            image_size=(48, 36),  # 4:3 as 224x168; the smallest the tiny ConvNeXt takes
            batch_size=4,
            num_workers=1,
            threads=1,
            augment={"hflip": 0.5, "shift_scale_rotate": 0.5, "color_jitter": 0.5},
            warmup_steps=1,
            steps=2,
            max_config_s=30.0,
            budget_s=900.0,
            packed=True,
            packed_s=1.0,
            setup_allowance_s=5.0,
            cache_images=16,
            tiny=True,
        )
    else:
        space = default_space()
        plan = Plan(
            device=args.device or "cuda",
            backbones=space.backbones,
            image_size=space.image_size,
            batch_size=space.batch_size,
            num_workers=space.num_workers,
            threads=max(1, int(space.trial_cpus)),
            augment=dict(space.augment),
            warmup_steps=10,
            steps=100,
            max_config_s=15.0,
            budget_s=540.0,
            packed=True,
            packed_s=10.0,
            setup_allowance_s=10.0,
            cache_images=1024,
        )
    overrides = {
        "backbones": tuple(args.backbones.split(",")) if args.backbones else None,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "max_config_s": args.max_config_s,
        "budget_s": args.budget_s,
        "packed": False if args.no_packed else None,
    }
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


# --- two packed processes ---------------------------------------------------------------------------------


def _packed_worker(
    plan_values: dict, index: int, cache_path: str, barrier, results, barrier_s: float
) -> None:
    """One of two training processes sharing the GPU: per backbone, build and warm up, wait for the other,
    then train for the same wall-clock window."""
    try:
        plan = Plan(**plan_values)
        torch.set_num_threads(plan.threads)
        if plan.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(0.5, 0)
        window_steps = 1_000_000  # the window (packed_s) ends the measurement, for both processes alike
        for backbone in plan.backbones:
            run, record = None, {"index": index, "backbone": backbone}
            try:
                run = ConfigRun(plan, backbone, PACKED, Path(cache_path), plan.steps * 20)
            except Exception as error:
                record.update(error_record(error))
            try:
                barrier.wait(barrier_s)
            except threading.BrokenBarrierError:
                record.setdefault("error", "the other process did not reach the start (it failed or hung)")
            if run is not None and "error" not in record:
                try:
                    record.update(run.timed(window_steps, plan.packed_s))
                except Exception as error:
                    record.update(error_record(error))
            if run is not None:
                run.close()
            results.put(record)
    except BaseException as error:  # reported to the parent, which records it
        results.put({"index": index, "fatal": error_record(error)["error"]})


def run_packed(plan: Plan, cache_path: Path, stop_at: float, log) -> dict[str, Any]:
    """Two processes on one device at once, per backbone; killed at ``stop_at`` (time.time())."""
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    barrier, results = context.Barrier(2), context.Queue()
    barrier_s = max(30.0, plan.setup_allowance_s * 6)
    workers = [
        context.Process(
            target=_packed_worker, args=(asdict(plan), i, str(cache_path), barrier, results, barrier_s)
        )
        for i in range(2)
    ]
    for worker in workers:
        worker.start()
    records: list[dict] = []
    expected = 2 * len(plan.backbones)
    try:
        while len(records) < expected and time.time() < stop_at:
            try:
                record = results.get(timeout=1.0)
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers):
                    break
                continue
            records.append(record)
            if "backbone" in record:
                rate = record.get("images_per_second")
                log(
                    f"packed: process {record['index'] + 1} {record['backbone']}: "
                    + (f"{rate:.0f} img/s" if rate else record.get("error", "?"))
                )
    finally:
        for worker in workers:
            worker.join(max(1.0, min(30.0, stop_at - time.time())))
            if worker.is_alive():
                worker.kill()
                worker.join(5)
    fatal = [r["fatal"] for r in records if "fatal" in r]
    out: dict[str, Any] = {"processes": 2, "memory_fraction": 0.5, "window_s": plan.packed_s, "backbones": {}}
    if fatal:
        out["error"] = fatal[0]
    if len(records) < expected and not fatal:
        out["error"] = (
            f"{expected - len(records)} of {expected} measurements missing (time budget or a crash)"
        )
    for backbone in plan.backbones:
        mine = sorted((r for r in records if r.get("backbone") == backbone), key=lambda r: r["index"])
        out["backbones"][backbone] = {"processes": mine}
    return out


# --- the driver -------------------------------------------------------------------------------------------


def host_info(plan: Plan) -> dict[str, Any]:
    device = torch.device(plan.device)
    dtype = amp_dtype(device, True)
    import timm

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp_dtype": str(dtype).replace("torch.", "")
        if dtype is not None
        else "none (fp32: AMP is CUDA only)",
        "cpus": os.cpu_count(),
    }


def run(plan: Plan, out_dir: Path, command: str, log=print) -> dict[str, Any]:
    started_wall, started = time.time(), time.perf_counter()
    torch.set_num_threads(plan.threads)
    results: dict[str, Any] = {
        "format": FORMAT,
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_info(plan),
        "plan": asdict(plan),
        "configs": [],
    }
    grid_deadline = started_wall + plan.budget_s - plan.packed_reserve_s()
    with tempfile.TemporaryDirectory(prefix="foldtune-gpu-bench-") as work:
        cache_path = write_synthetic_cache(Path(work), plan.cache_images, plan.image_size, plan.seed)
        host = results["host"]
        log(f"gpu_device: {host['device_name']}, AMP {host['amp_dtype']}; synthetic cache {cache_path.name}")
        for backbone, variant in plan.configurations():
            record: dict[str, Any] = {"backbone": backbone, "config": variant.name, **asdict(variant)}
            left = grid_deadline - time.time()
            if variant.compile and plan.device != "cuda":
                record["skipped"] = "compile is measured on CUDA only (on the CPU it compiles for minutes)"
            elif left < plan.max_config_s + plan.allowance_s(variant):
                record["skipped"] = f"time budget: {max(0.0, left):.0f} s left for the grid"
            else:
                try:
                    record.update(run_config(plan, backbone, variant, cache_path))
                except Exception as error:  # one failing configuration must not lose the others
                    record.update(error_record(error))
            results["configs"].append(record)
            rate = record.get("images_per_second")
            note = f"{rate:.0f} img/s" if rate is not None else record.get("error") or record.get("skipped")
            log(f"gpu_device: {backbone} {variant.name}: {note}  [{time.perf_counter() - started:.0f} s]")
            write_outputs(results, out_dir)
        if plan.packed:
            try:
                results["packed"] = run_packed(plan, cache_path, started_wall + plan.budget_s, log)
            except Exception as error:
                results["packed"] = error_record(error)
    results["seconds"] = time.perf_counter() - started
    write_outputs(results, out_dir)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_device", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for gpu_device.json and .md")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny models and sizes on the CPU (the tests' run)"
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda (cpu with --tiny)")
    parser.add_argument("--backbones", help="comma list (default: the default space's)")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 100)")
    parser.add_argument("--warmup-steps", type=int, help="untimed steps per configuration (default 10)")
    parser.add_argument("--max-config-s", type=float, help="timed seconds per configuration at most (15)")
    parser.add_argument("--budget-s", type=float, help="the whole run's time budget in seconds (540)")
    parser.add_argument("--no-packed", action="store_true", help="skip the two-process measurement")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = make_plan(args)
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible; run it on a GPU machine, or pass --tiny (CPU)", file=sys.stderr)
        return 2
    command = " ".join(["python -m benchmarks.gpu_device", *(sys.argv[1:] if argv is None else argv)])
    results = run(plan, args.out, command, log=lambda message: print(message, flush=True))
    print((args.out / "gpu_device.md").read_text(), flush=True)
    failed = [c for c in results["configs"] if "error" in c] or ("error" in results.get("packed", {}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
