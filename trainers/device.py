"""Where a run trains, and whether it can: the device, the torch build against the NVIDIA driver, the GPU
speed settings, and the shared memory the loader workers will fill.

Why one room: the first run on a GPU node must never train quietly on the CPU. A CUDA 13 build of torch on a
node whose driver only knows CUDA 12 reports ``torch.cuda.is_available() == False`` and nothing else; a
trial holding half a GPU would then train on a few CPU threads for hours. So the device is chosen from
what the scheduler gave the run (``holds_gpu``), not only from what torch says, and a GPU that torch cannot
use is one line that names the torch build, the driver and the fix (``make .venv TORCH=...``).

Nothing here imports Ray: the caller says whether the run holds a GPU (a search trial: Ray gave it GPU
ids; ``foldtune train``: unknown, so a GPU the driver lists counts).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from trainers.errors import FoldtuneError


class DeviceError(FoldtuneError, RuntimeError):
    """The configured device cannot be used here; the message says why (torch build, driver) and the fix."""


# The oldest driver each CUDA major version's runtime runs on (NVIDIA's minor-version compatibility: any
# 12.x runtime on a >= 525.60.13 driver, any 13.x on >= 580.65.06).
MIN_DRIVER: dict[int, tuple[int, ...]] = {11: (450, 80, 2), 12: (525, 60, 13), 13: (580, 65, 6)}
# The torch builds `make .venv TORCH=...` installs (PyTorch's wheel indexes), newest first, each with the
# oldest driver it runs on: the fix offered is the newest build the node's driver runs.
TORCH_BUILDS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("cu130", (580, 65, 6)),
    ("cu128", (570, 26)),
    ("cu126", (525, 60, 13)),
)
NVIDIA_SMI_QUERY = ("--query-gpu=name,driver_version,memory.total", "--format=csv,noheader,nounits")


def version_tuple(text: str) -> tuple[int, ...]:
    """'550.54.15' -> (550, 54, 15); the leading numeric parts only."""
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


@dataclass(frozen=True)
class Gpu:
    """One GPU as the driver lists it."""

    name: str
    memory_mib: int


@dataclass(frozen=True)
class CudaStatus:
    """What this process can do with CUDA: the torch build, the driver, and whether they work together."""

    torch_version: str
    cuda_build: str | None  # torch.version.cuda: "13.0", or None for a CPU-only build
    usable: bool  # torch.cuda.is_available()
    driver: str | None  # from nvidia-smi; None when there is no nvidia-smi (no NVIDIA driver)
    gpus: tuple[Gpu, ...] = field(default=())
    torch_reason: str = ""  # torch's own first line when CUDA cannot start

    def build(self) -> str:
        """'torch 2.14.1+cu130 (a CUDA 13.0 build)'."""
        kind = f"a CUDA {self.cuda_build} build" if self.cuda_build else "a CPU-only build"
        return f"torch {self.torch_version} ({kind})"

    def needed_driver(self) -> tuple[int, ...] | None:
        """The oldest driver the torch build runs on; None for a CPU build or an unknown CUDA major."""
        if not self.cuda_build:
            return None
        return MIN_DRIVER.get(version_tuple(self.cuda_build)[0])

    def driver_too_old(self) -> bool:
        needed = self.needed_driver()
        return bool(self.driver and needed and version_tuple(self.driver) < needed)

    def fix_build(self) -> str | None:
        """The newest ``TORCH=`` build the driver runs, or None when the driver is older than all of them."""
        if not self.driver:
            return None
        found = version_tuple(self.driver)
        return next((name for name, needed in TORCH_BUILDS if found >= needed), None)

    def problem(self) -> str | None:
        """Why CUDA cannot be used here, with the fix, in one line; None when it can."""
        if self.usable:
            return None
        if self.driver is None:
            return (
                f"{self.build()} finds no NVIDIA driver (nvidia-smi is not on PATH): install the driver, or "
                "train on the CPU (device: cpu, resources.gpu: 0)"
            )
        have = f"the driver is {self.driver}" + (f" ({_count(self.gpus)})" if self.gpus else "")
        fix = self.fix_build()
        install = (
            f"install the build for this driver: make clean && make .venv TORCH={fix}"
            if fix
            else f"upgrade the NVIDIA driver to >= {_dotted(TORCH_BUILDS[-1][1])} (or make .venv TORCH=cpu)"
        )
        if not self.cuda_build:
            return f"{self.build()} cannot use the GPU ({have}); {install}"
        if self.driver_too_old():
            return (
                f"{self.build()} needs NVIDIA driver >= {_dotted(self.needed_driver() or ())} but {have}; "
                f"{install}"
            )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hidden = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
        why = f" ({self.torch_reason})" if self.torch_reason else ""
        return f"{self.build()} cannot use the GPU although {have} supports it{why}{hidden}"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(f"{part:02d}" if index else str(part) for index, part in enumerate(version))


def _count(gpus: tuple[Gpu, ...]) -> str:
    names = sorted({gpu.name for gpu in gpus})
    return f"{len(gpus)} × {', '.join(names)}"


def nvidia_smi() -> tuple[str | None, tuple[Gpu, ...]]:
    """The driver version and the GPUs the driver lists, from ``nvidia-smi`` (on PATH); (None, ()) without
    one. Read by the driver, not by torch: it answers even when this torch build cannot start CUDA."""
    program = shutil.which("nvidia-smi")
    if program is None:
        return None, ()
    try:
        out = subprocess.run(
            [program, *NVIDIA_SMI_QUERY], capture_output=True, text=True, timeout=20, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, ()
    driver, gpus = None, []
    for line in out.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 3:
            continue
        name, driver = parts[0], parts[1]
        try:
            memory = int(float(parts[2]))
        except ValueError:
            memory = 0
        gpus.append(Gpu(name, memory))
    return driver, tuple(gpus)


def cuda_status() -> CudaStatus:
    """This process's CUDA as torch and the driver see it (asks nvidia-smi; starts CUDA only to learn why
    it cannot start)."""
    usable = torch.cuda.is_available()
    reason = ""
    if not usable and torch.version.cuda:
        try:
            torch.cuda.init()
        except Exception as error:  # torch says why in many exception types
            reason = (str(error).strip().splitlines() or [""])[0][:160]
    driver, gpus = nvidia_smi()
    return CudaStatus(torch.__version__, torch.version.cuda, usable, driver, gpus, reason)


def pick_device(name: str = "auto", holds_gpu: bool | None = None) -> torch.device:
    """The device a run trains or predicts on; never a silent fall-back to the CPU.

    ``holds_gpu`` is what the scheduler gave the run: True (a search trial with GPU ids), False (a trial
    with none: the CPU, whatever torch sees) or None (no scheduler: ``foldtune train``, ``predict``).
    ``auto`` is CUDA when the run holds a GPU, the CPU when it holds none, and with None CUDA when torch can
    use it. A GPU the run holds, or ``cuda`` asked for, that torch cannot use is a ``DeviceError`` naming
    the torch build, the driver and the fix; so is ``auto`` with None on a machine whose driver lists GPUs
    this torch cannot use (``device: cpu`` trains on the CPU there on purpose).
    """
    if name not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"device must be auto, cpu or cuda, got {name!r}")
    if name == "cpu" or (name == "auto" and holds_gpu is False):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    status = cuda_status()
    if name == "cuda" or holds_gpu:
        asked = "this trial holds a GPU" if holds_gpu else "device 'cuda' was asked for"
        raise DeviceError(f"{asked} but {status.problem()}")
    if status.gpus:
        raise DeviceError(
            f"the driver lists {_count(status.gpus)} but {status.problem()}; to train on the CPU anyway set "
            "device: cpu (or --device cpu)"
        )
    return torch.device("cpu")


def amp_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU computes it natively (Ampere and later), else fp16 (which
    needs loss scaling: see ``fold_state.build_fold``); None on the CPU or without AMP (plain fp32).

    ``including_emulation=False``: plain ``is_bf16_supported()`` is True on V100/T4 too, where bf16 is
    emulated and slower than fp32.
    """
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast_for(device: torch.device, amp: bool):
    """Autocast in ``amp_dtype``; nothing on the CPU (plain fp32 there)."""
    dtype = amp_dtype(device, amp)
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


def apply_backend_settings(cudnn_benchmark: bool, tf32: bool, device: torch.device) -> dict[str, object]:
    """The process-wide GPU speed settings of a run on CUDA; nothing on the CPU. Returns what was set.

    ``cudnn_benchmark``: cuDNN times its convolution algorithms once per input shape and keeps the fastest
    (every training batch has one shape: the cache fixes the image size and fit drops a ragged last batch).
    ``tf32``: float32 matrix products on the tensor cores (``set_float32_matmul_precision("high")``), for
    whatever autocast leaves in fp32.
    """
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    return {
        "cudnn_benchmark": bool(cudnn_benchmark),
        "float32_matmul_precision": "high" if tf32 else "highest",
    }


# --- loader workers and the shared memory they fill ---------------------------------------------------------

PREFETCH_FACTOR = 2  # torch's DataLoader default: batches each worker prepares ahead
SHM_PATH = "/dev/shm"


def loader_workers(
    num_workers: int | str, augment_on_device: bool, device: torch.device, threads: int
) -> int:
    """Loader worker processes per fold: a number as configured, or for ``auto`` what the placement needs.

    On the CPU none (the step and the loader share the same cores: workers would only compete with it). On
    CUDA with device augmentation one: it only slices uint8 batches out of the memory-mapped cache, far
    faster than any GPU trains (BENCHMARKS.md, pipeline ceiling). On CUDA with loader augmentation the
    trial's CPU threads: albumentations runs per image in the workers.
    """
    if num_workers != "auto":
        return int(num_workers)
    if device.type != "cuda":
        return 0
    return 1 if augment_on_device else max(1, int(threads))


def shared_memory_need(workers: int, batch_size: int, image_size: tuple[int, int]) -> int:
    """Bytes of shared memory one fold's loader workers hold at once: each prepares ``PREFETCH_FACTOR`` uint8
    batches in ``/dev/shm`` (folds train one after another, so one fold's workers are busy at a time)."""
    height, width = image_size
    return int(workers) * PREFETCH_FACTOR * int(batch_size) * (int(height) * int(width) * 3 + 8)


def shared_memory_free(path: str = SHM_PATH) -> int | None:
    """Free bytes in ``/dev/shm``; None where there is none (not Linux)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def check_shared_memory(need: int, what: str, free: int | None = None) -> None:
    """A ``DeviceError`` when ``/dev/shm`` cannot hold ``need`` bytes: the loader workers would die with
    "Bus error" mid-epoch (Docker's default ``/dev/shm`` is 64 MB)."""
    free = shared_memory_free() if free is None else free
    if need <= 0 or free is None or free >= need:
        return
    raise DeviceError(
        f"{SHM_PATH} has {_mib(free)} free but {what} need about {_mib(need)}: give the container more "
        "(docker run --shm-size=8g, or a larger tmpfs on /dev/shm), or fewer loader workers (num_workers)"
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"
