"""Where a planned search's promotions and final models train: on the cluster's GPUs, one whole GPU each and
as many at once as there are GPUs (Ray tasks); for CPU trials that ran several at once, as many at once as
the trials ran, each with a trial's CPUs (Ray tasks too); otherwise one after another in the driver's own
process with every core the trials had.

Why: after the screen the trials are done and the GPUs free. Trained in the driver, the promotions and
final models would use one GPU of eight (the other seven idle for the whole final phase) or, on a cluster
whose head node has none, the head node's CPU. As Ray tasks they get a GPU each, wherever it is. On CPUs the
plan counts each model's epochs at the cost the screen measured, one trial's threads: one model given the
threads of two trials runs faster than planned, ends early and leaves the rest of the budget idle, while two
models at once, one trial's threads each, train at the measured cost.

``run_jobs`` runs numbered jobs in order, ``Workers.at_once`` at a time. It asks for each job only when a
slot frees (``start(index)``), so the caller plans the job from the time really left then, and hands each
outcome (the result, or a ``JobFailed`` with the line of the ``FoldtuneError`` the job raised) to
``done(index, outcome)`` as it ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.search.capacity import cluster_nodes, trials_per_node
from orchestrator.space import SearchSpace
from trainers.errors import FoldtuneError


@dataclass(frozen=True)
class Workers:
    """``at_once`` jobs at a time, each a Ray task on one whole GPU and ``cpus`` CPUs (``on_gpus``) or on
    ``cpus`` CPUs alone, or, the default, one at a time in the driver's process."""

    at_once: int = 1
    cpus: float = 1  # a share of a node's CPUs may be a fraction (8 GPUs, 4 CPUs: half a CPU each)
    on_gpus: bool = False

    @property
    def in_driver(self) -> bool:
        return self.at_once <= 1 and not self.on_gpus

    def describe(self) -> str:
        if self.in_driver:
            return "in the driver, one after another"
        if not self.on_gpus:
            return f"{self.at_once} at once, {self.cpus:g} CPU(s) each, as the trials ran"
        return f"{self.at_once} at once, one GPU and {self.cpus:g} CPU(s) each"


@dataclass(frozen=True)
class Job:
    """A call to run: ``fn(*args, **kwargs)`` (module-level, so a Ray worker can import it) on ``device``
    (the run's ``device`` setting: a GPU the task holds but torch cannot use fails at once, naming why)."""

    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    device: str = "auto"


def workers_for(space: SearchSpace) -> Workers:
    """GPU trials on a running Ray cluster with whole GPUs: a job per GPU, with the GPU's share of its
    node's CPUs (whole CPUs where the node has at least one per GPU; at most what a trial's GPU share came
    with, per GPU), so every GPU's job can start at once. CPU trials that ran several at once: as many jobs
    at once, each with a trial's CPUs. Anything else: the driver."""
    import ray

    if not ray.is_initialized():
        return Workers()
    if space.gpus_per_trial <= 0:
        return _cpu_workers(space)
    nodes = [node for node in cluster_nodes() if node.gpus >= 1]
    if not nodes:
        return Workers()
    gpus = sum(math.floor(node.gpus) for node in nodes)
    per_gpu = min(_cpus_per_gpu(node.cpus, math.floor(node.gpus)) for node in nodes)
    trial_share = max(1, math.floor(space.cpus_per_trial / space.gpus_per_trial))
    return Workers(at_once=gpus, cpus=min(per_gpu, trial_share), on_gpus=True)


def _cpu_workers(space: SearchSpace) -> Workers:
    """As many jobs at once as trials ran (``max_concurrent``; ``auto``: what the cluster holds), each with
    a trial's CPUs, so each trains at the cost its screen measured; one at a time: the driver."""
    fits = sum(trials_per_node(node, space.cpus_per_trial, 0) for node in cluster_nodes())
    ran = space.max_concurrent if isinstance(space.max_concurrent, int) else fits
    at_once = min(ran, fits)
    return Workers(at_once=at_once, cpus=space.cpus_per_trial) if at_once > 1 else Workers()


def _cpus_per_gpu(cpus: float, gpus: int) -> float:
    share = cpus / gpus
    return math.floor(share) if share >= 1 else share


def run_jobs(
    workers: Workers,
    count: int,
    start: Callable[[int], Job | None],
    done: Callable[[int, Any], None],
) -> None:
    """Jobs ``0..count-1`` in order, ``workers.at_once`` at a time: ``start(index)`` (called when a slot
    frees; None skips that job) gives the call, ``done(index, outcome)`` gets its result or, when it raised
    a ``FoldtuneError``, a ``JobFailed`` with that error's line. An interrupt cancels the jobs still running
    (their runs keep what their own checkpoints kept: a resumed search goes on from there)."""
    if workers.in_driver:
        for index in range(count):
            job = start(index)
            if job is not None:
                done(index, _call(job))
        return
    import ray

    gpus = 1 if workers.on_gpus else 0
    remote = ray.remote(_in_the_task).options(num_gpus=gpus, num_cpus=workers.cpus, max_retries=0)
    running: dict[Any, int] = {}
    next_index = 0
    try:
        while next_index < count or running:
            while next_index < count and len(running) < workers.at_once:
                job = start(next_index)
                if job is not None:
                    running[remote.remote(job, workers.cpus)] = next_index
                next_index += 1
            if running:
                (ready,), _ = ray.wait(list(running), num_returns=1)
                done(running.pop(ready), ray.get(ready))
    finally:
        for ref in running:
            ray.cancel(ref, force=True)


@dataclass(frozen=True)
class JobFailed:
    """What a job that raised a ``FoldtuneError`` returns instead: its one line (the error object itself
    need not survive the trip back from a Ray worker)."""

    line: str


def _call(job: Job) -> Any:
    try:
        return job.fn(*job.args, **job.kwargs)
    except FoldtuneError as error:
        return JobFailed(_one_line(error))


def _one_line(error: FoldtuneError) -> str:
    """The error's message on one line (a ``DataError`` lists its problems on lines of their own)."""
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())[:500]


def _in_the_task(job: Job, cpus: float) -> Any:
    """In the Ray task: kept off every GPU unless it holds one (``trial.claim_devices``, as a trial is: Ray
    2.60 leaves a 0-GPU task the node's ``CUDA_VISIBLE_DEVICES``, ray#54868), the torch threads of its CPUs,
    the device checked where it holds a GPU (``pick_device`` with the GPU held: a torch that cannot use it is
    a ``DeviceError`` naming the build and the fix), then the call."""
    import ray
    import torch

    from orchestrator.search.trial import claim_devices
    from trainers.device import pick_device

    holds_gpu = claim_devices(ray.get_gpu_ids())  # before torch starts CUDA
    torch.set_num_threads(max(1, int(cpus)))
    if holds_gpu:
        try:
            pick_device(job.device, holds_gpu=True)
        except FoldtuneError as error:
            return JobFailed(_one_line(error))
    return _call(job)
