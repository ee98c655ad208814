"""How the final phase should use a CPU node's cores: one model with every thread, or one model per trial's
share, as the screen ran.

    python -m benchmarks.final_workers --backbone tf_efficientnet_lite0 --size 96 72   # BENCHMARKS.md

The plan counts a final model's epochs at the cost the screen measured: one trial's threads
(``cpu.yaml`` on 2 cores: two 1-thread trials at once). Three arrangements of the same training step
(random images of the given size, batch 64, AdamW), each timed for ``--seconds`` after a warm-up, in one
run on this machine:

- ``planned``: one model, one thread, alone (what the plan assumed per model);
- ``one model, all threads``: one model with every core's thread (the final phase before: it trains faster
  than planned, ends early, and leaves the rest of the budget unused);
- ``one per core``: one 1-thread model per core at once, in their own processes (the final phase now).

It prints images per second of each and, for ``one model, all threads``, the share of a planned final phase
it would leave idle: 1 - planned / all-threads.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

BATCH = 64


def _rate(backbone: str, size: tuple[int, int], threads: int, seconds: float, core: int | None) -> float:
    """Training images per second of ``backbone`` at ``threads`` threads (pinned to ``core`` if given)."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    import timm
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(backbone, pretrained=False, num_classes=18)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(BATCH, 3, *size)
    labels = torch.randint(0, 18, (BATCH,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(3):  # warm-up: allocator, kernels
        step()
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        done += BATCH
    return done / (time.perf_counter() - started)


def _worker(args: tuple) -> float:
    return _rate(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 72), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds per arrangement")
    args = parser.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))
    size = tuple(args.size)
    context = multiprocessing.get_context("spawn")  # a fresh torch per process: its own thread pool
    with context.Pool(1) as pool:
        planned = pool.apply(_worker, ((args.backbone, size, 1, args.seconds, cores[0]),))
    with context.Pool(1) as pool:
        together = pool.apply(_worker, ((args.backbone, size, len(cores), args.seconds, None),))
    with context.Pool(len(cores)) as pool:
        per_core = pool.map(_worker, [(args.backbone, size, 1, args.seconds, core) for core in cores])
    row = {
        "backbone": args.backbone,
        "size": list(size),
        "cores": len(cores),
        "planned_images_per_s": round(planned, 1),
        "one_model_all_threads_images_per_s": round(together, 1),
        "one_per_core_images_per_s": [round(rate, 1) for rate in per_core],
        "all_threads_speedup": round(together / planned, 2),
        "one_per_core_speedup": round(sum(per_core) / planned, 2),
        "idle_share_with_all_threads": round(1 - planned / together, 2),
    }
    print(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
