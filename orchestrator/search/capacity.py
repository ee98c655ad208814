"""What a Ray cluster can run: how many trials at once (``max_concurrent: auto``) and which space a machine
gets (``--space auto``). Pure functions of the cluster's nodes, read once from Ray, so they are tested with
declared resources (``ray.init(num_gpus=8)``) and no hardware.

Why: a space written for one node leaves GPUs idle on another (``max_concurrent: 4`` with ``gpu: 0.5`` is
two of eight GPUs), and ``make search`` on a GPU node must not run the CPU preset. Ray places fractional
GPUs per GPU (two 0.5-GPU trials share one GPU id; a 0.3-GPU trial fits three times, not 3.33), and every
trial also needs its CPUs on the same node, so the count is per node, the smaller of the two limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.space import SearchSpace

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
AUTO = "auto"
GPU_SPACE, CPU_SPACE = "default.yaml", "cpu.yaml"
_EPS = 1e-9


@dataclass(frozen=True)
class Node:
    """One live Ray node's schedulable resources."""

    cpus: float
    gpus: float


def cluster_nodes() -> list[Node]:
    """The live nodes of the Ray cluster this process is connected to."""
    import ray

    return [
        Node(float(node["Resources"].get("CPU", 0)), float(node["Resources"].get("GPU", 0)))
        for node in ray.nodes()
        if node.get("Alive")
    ]


def trials_per_node(node: Node, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials of these resources Ray can place on ``node`` at once."""
    by_cpu = math.floor(node.cpus / cpus_per_trial + _EPS) if cpus_per_trial > 0 else math.inf
    if gpus_per_trial <= 0:
        by_gpu = math.inf
    elif gpus_per_trial < 1:  # packed per GPU: each GPU holds floor(1 / share) trials
        by_gpu = math.floor(1 / gpus_per_trial + _EPS) * math.floor(node.gpus + _EPS)
    else:
        by_gpu = math.floor(node.gpus / gpus_per_trial + _EPS)
    fits = min(by_cpu, by_gpu)
    return 0 if fits == math.inf else int(fits)


@dataclass(frozen=True)
class Capacity:
    """Trials at once on a cluster, and what limits it (for the line the search prints)."""

    trials: int
    by_gpu: int | None  # what the GPUs alone would hold (None: trials take no GPU)
    by_cpu: int
    gpus: float
    cpus: float

    def describe(self, cpus_per_trial: float, gpus_per_trial: float) -> str:
        each = (
            f"{_number(gpus_per_trial)} GPU + {_number(cpus_per_trial)} CPU"
            if gpus_per_trial
            else (f"{_number(cpus_per_trial)} CPU")
        )
        line = f"{self.trials} trials at once at {each} each"
        if self.by_gpu is not None and self.by_cpu < self.by_gpu:
            line += (
                f" (the CPUs limit it: the GPUs would hold {self.by_gpu}; lower resources.cpu to use them)"
            )
        return line


def capacity(nodes: list[Node], cpus_per_trial: float, gpus_per_trial: float) -> Capacity:
    """``max_concurrent: auto``: the trials the cluster's nodes hold at once at these resources."""
    trials = sum(trials_per_node(node, cpus_per_trial, gpus_per_trial) for node in nodes)
    by_cpu = sum(trials_per_node(node, cpus_per_trial, 0) for node in nodes)
    by_gpu = sum(trials_per_node(node, 0, gpus_per_trial) for node in nodes) if gpus_per_trial > 0 else None
    return Capacity(
        trials, by_gpu, by_cpu, sum(node.gpus for node in nodes), sum(node.cpus for node in nodes)
    )


def auto_space_file(gpus: float) -> tuple[Path, str]:
    """``--space auto``: ``default.yaml`` when the cluster has GPUs, else ``cpu.yaml`` (in the checkout's
    ``search_spaces/``); and why, in words."""
    name = GPU_SPACE if gpus > 0 else CPU_SPACE
    why = f"{_number(gpus)} GPU{'s' if gpus != 1 else ''}" if gpus > 0 else "no GPU"
    return SPACES_DIR / name, why


@dataclass(frozen=True)
class LoaderMemory:
    """The shared memory the loader workers of the trials on one node fill at once."""

    trials: int
    workers: int  # per trial (one fold's loader runs at a time)
    batch_size: int
    image_size: tuple[int, int]
    need: int  # bytes, all trials together

    def describe(self) -> str:
        height, width = self.image_size
        return (
            f"{self.trials} trial(s) × {self.workers} loader worker(s) of batch {self.batch_size} at "
            f"{height}x{width} need {self.need / 2**30:.1f} GiB"
        )


def loader_memory(space: SearchSpace, trials: int, on_gpu: bool) -> LoaderMemory:
    """What ``trials`` trials of ``space`` on one node put in ``/dev/shm`` (``trainers.device``'s sizing)."""
    import torch

    from trainers.device import loader_workers, shared_memory_need

    cfg = space.config_for({name: param.values[0] for name, param in space.search.items()})
    device = torch.device("cuda" if on_gpu else "cpu")
    on_device = cfg.augment_on == "device" or (cfg.augment_on == "auto" and on_gpu)
    workers = loader_workers(cfg.num_workers, on_device, device, max(1, int(space.cpus_per_trial)))
    size = (int(cfg.image_size[0]), int(cfg.image_size[1]))
    need = trials * shared_memory_need(workers, cfg.batch_size, size)
    return LoaderMemory(trials, workers, int(cfg.batch_size), size, need)


def _number(value: float) -> str:
    return f"{value:g}"
