"""``foldtune doctor``: what to check before a night of GPU time, one line each; exit 1 when something
would stop a run.

It only reads: no file is written, no weight is downloaded, no trial starts. Each line is one fact a first
GPU run has gone wrong on: the torch build against the NVIDIA driver, the GPUs torch and Ray see, what
``--space auto`` and ``max_concurrent: auto`` would choose, ``/dev/shm`` against what the loader workers
put there, free disk for the results and the image cache, the MLflow store, and whether each backbone's
weights resolve offline. The facts come from the rooms that act on them (``trainers.device``,
``search.capacity``, ``trainers.weights``, ``tracking.store``), so the doctor and a run cannot disagree.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "FAIL"
MIN_FREE_DISK = 2**30  # below this a run's first checkpoint or cache write fails


@dataclass(frozen=True)
class Line:
    """One check's outcome: ``ok``, ``warn`` (works, but look) or ``FAIL`` (a run would stop)."""

    status: str
    topic: str
    text: str

    def __str__(self) -> str:
        return f"{self.status:<4}  {self.topic:<8} {self.text}"


def run_doctor(
    space: str | None = None,
    storage: str | os.PathLike = "runs",
    data: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    address: str | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Print every check, one line each, and a last line; 1 when a check FAILs, else 0."""
    lines: list[Line] = []

    def say(line: Line) -> None:
        lines.append(line)
        out(str(line))

    from trainers.device import cuda_status

    status = cuda_status()
    with _ray(address) as (nodes, local_gpus):
        for line in _torch_lines(status, local_gpus):
            say(line)
        say(_ray_line(nodes))
        chosen = _space_lines(space, nodes, status)
        for line in chosen.lines:
            say(line)
    if chosen.space is not None:
        say(_shm_line(chosen))
    for line in _disk_lines(Path(storage), data, chosen.space):
        say(line)
    say(_mlflow_line(tracking_uri))
    if chosen.space is not None:
        for line in _weights_lines(chosen.space):
            say(line)
    failed = [line for line in lines if line.status == FAIL]
    if failed:
        out(f"doctor: {len(failed)} problem(s) would stop a run (the FAIL lines above)")
        return 1
    out("doctor: nothing blocks a run")
    return 0


def which_space(address: str | None = None) -> Path:
    """The space ``--space auto`` takes on this machine (or the cluster at ``address``/``RAY_ADDRESS``):
    ``make ensemble`` needs its name without running a search."""
    from orchestrator.search.capacity import auto_space_file

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        with _ray(address) as (nodes, _):
            gpus = sum(node.gpus for node in nodes)
    else:  # the GPUs a local Ray would declare: the driver's, as CUDA_VISIBLE_DEVICES narrows them
        gpus = _visible_gpu_count()
    return auto_space_file(gpus)[0]


# --- torch, the driver, Ray -------------------------------------------------------------------------------


@contextlib.contextmanager
def _ray(address: str | None) -> Iterator[tuple[list, float]]:
    """The Ray cluster's nodes and this node's GPUs: the cluster this process is connected to, the one at
    ``address``, or a local Ray started for the check (as ``foldtune search`` would start it)."""
    import ray

    from orchestrator.search.capacity import cluster_nodes

    started = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
        started = True
    try:
        here = ray.get_runtime_context().get_node_id()
        local = next((n for n in ray.nodes() if n.get("NodeID") == here), {})
        yield cluster_nodes(), float(local.get("Resources", {}).get("GPU", 0))
    finally:
        if started:
            ray.shutdown()


def _visible_gpu_count() -> int:
    from trainers.device import nvidia_smi

    _, gpus = nvidia_smi()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return len(gpus)
    return min(len(gpus), len([d for d in visible.split(",") if d.strip()]))


def _torch_lines(status, ray_local_gpus: float) -> list[Line]:
    """The torch build against the driver, and the GPUs torch sees (memory, native bf16)."""
    import torch

    problem = status.problem()
    gpus_here = bool(status.gpus) or ray_local_gpus > 0
    if status.usable:
        needed = status.needed_driver()
        driver = f"driver {status.driver}" + (f" (needs >= {'.'.join(map(str, needed))})" if needed else "")
        lines = [Line(OK, "torch", f"{status.build()}: CUDA works on {driver}")]
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            native_bf16 = torch.cuda.get_device_capability(index) >= (8, 0)
            precision = "bf16 native" if native_bf16 else "no native bf16: fp16 with loss scaling"
            memory = f"{props.total_memory / 2**30:.0f} GiB"
            lines.append(Line(OK, "gpu", f"cuda:{index} {props.name}, {memory}, {precision}"))
        return lines
    if gpus_here:
        where = f"Ray offers {ray_local_gpus:g} GPU(s) on this node and " if ray_local_gpus else ""
        return [Line(FAIL, "torch", f"{where}{problem}")]
    return [Line(OK, "torch", f"{status.build()}; no NVIDIA GPU on this machine: trials train on the CPU")]


def _ray_line(nodes: list) -> Line:
    cpus, gpus = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes)
    each = "; ".join(f"{n.cpus:g} CPU, {n.gpus:g} GPU" for n in nodes[:8]) + (
        " ..." if len(nodes) > 8 else ""
    )
    return Line(OK, "ray", f"{len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs ({each})")


# --- the space and what it would run ----------------------------------------------------------------------


@dataclass
class _Chosen:
    space: object | None  # the SearchSpace, with max_concurrent resolved
    lines: list[Line]
    trials_here: int = 0  # trials at once on this node (for /dev/shm)
    on_gpu: bool = False


def _space_lines(space_arg: str | None, nodes: list, status) -> _Chosen:
    import dataclasses

    from orchestrator.search.capacity import AUTO, auto_space_file, capacity, trials_per_node
    from orchestrator.space import load_space
    from trainers.errors import FoldtuneError

    gpus = sum(n.gpus for n in nodes)
    auto_path, why = auto_space_file(gpus)
    lines = [Line(OK, "space", f"SPACE=auto: {why}: {auto_path.name}")]
    path = auto_path if space_arg in (None, AUTO) else Path(space_arg)
    try:
        space = load_space(path)
    except FoldtuneError as error:
        return _Chosen(None, [*lines, Line(FAIL, "space", str(error))])
    gpu_share = space.gpus_per_trial if gpus > 0 else 0.0
    held = capacity(nodes, space.cpus_per_trial, gpu_share)
    if space.max_concurrent == AUTO:
        running = f"max_concurrent auto: {held.describe(space.cpus_per_trial, gpu_share)}"
        space = dataclasses.replace(space, max_concurrent=max(1, held.trials))
    else:
        running = f"max_concurrent {space.max_concurrent} of the {held.trials} trials the cluster holds"
    status_of = FAIL if held.trials == 0 else (WARN if held.by_gpu and held.by_cpu < held.by_gpu else OK)
    lines.append(Line(status_of, "space", f"{path.name}: {running}"))
    here = max((trials_per_node(n, space.cpus_per_trial, gpu_share) for n in nodes), default=0)
    on_gpu = gpu_share > 0 and space.fixed.get("device", "auto") != "cpu"
    return _Chosen(space, lines, min(here, int(space.max_concurrent)), on_gpu)


def _shm_line(chosen: _Chosen) -> Line:
    """``/dev/shm`` against the batches the loader workers of the trials on one node prepare at once."""
    from orchestrator.search.capacity import loader_memory
    from trainers.device import shared_memory_free

    memory, free = loader_memory(chosen.space, chosen.trials_here, chosen.on_gpu), shared_memory_free()
    if free is None:
        return Line(OK if memory.need == 0 else WARN, "shm", f"no /dev/shm here; {memory.describe()}")
    if free < memory.need:
        return Line(
            FAIL,
            "shm",
            f"/dev/shm has {_gib(free)} free but {memory.describe()}: docker run --shm-size=8g, or lower "
            "num_workers",
        )
    return Line(OK, "shm", f"/dev/shm {_gib(free)} free; {memory.describe()}")


# --- disk, MLflow, weights --------------------------------------------------------------------------------


def _disk_lines(storage: Path, data, space) -> list[Line]:
    from trainers.cache import foldtune_home
    from trainers.io import existing_parent

    cache_need = _cache_bytes(data, space) if data is not None and space is not None else None
    lines = []
    for topic, folder, need in (("disk", storage, None), ("cache", foldtune_home(), cache_need)):
        existing = existing_parent(Path(folder).expanduser().absolute())
        free = shutil.disk_usage(existing).free
        text = f"{_gib(free)} free at {Path(folder).expanduser().absolute()}"
        if need is not None:
            text += f"; the decoded-image cache of {data} needs {_gib(need)}"
        bad = free < MIN_FREE_DISK or (need is not None and free < need)
        lines.append(Line(FAIL if bad else OK, topic, text))
    return lines


def _cache_bytes(data, space) -> int:
    """Bytes of the decode-once cache of the data root's training images at the space's image size."""
    from trainers.data import read_train

    table = read_train(Path(data)).table
    height, width = space.config_for({n: p.values[0] for n, p in space.search.items()}).image_size
    return len(table) * int(height) * int(width) * 3


def _mlflow_line(tracking_uri: str | None) -> Line:
    from orchestrator.tracking.store import probe_store

    uri, problem = probe_store(tracking_uri)
    return Line(FAIL if problem else OK, "mlflow", problem or f"{uri} reachable")


def _weights_lines(space) -> list[Line]:
    """Each backbone's pretrained weights: resolved offline (HF_HUB_OFFLINE=1 for the check), else what a
    run would do (a download at the start of each trial), else why none can be had."""
    from trainers.errors import FoldtuneError
    from trainers.weights import resolve_pretrained

    lines = []
    for backbone in space.backbones():
        spec = space.pretrained_spec(backbone)
        try:
            with _offline():
                resolved = resolve_pretrained(backbone, spec)
            lines.append(Line(OK, "weights", f"{backbone}: offline from {resolved.source}"))
            continue
        except FoldtuneError:
            pass
        try:
            resolved = resolve_pretrained(backbone, spec)
            lines.append(Line(WARN, "weights", f"{backbone}: not offline; trials download {resolved.source}"))
        except FoldtuneError as error:
            lines.append(Line(FAIL, "weights", str(error).splitlines()[0]))
    return lines


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    saved = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved


def _gib(size: float) -> str:
    return f"{size / 2**30:.1f} GiB"
