"""Reference data the bench compares its measurements with: published GPU training rates, and the figures of
the default (GPU) search space. Nothing here is measured.

Imports only PyYAML, so ``benchmarks.gpu_device`` (run on the lent GPU machine, without Ray) can use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# timm's own training benchmark: train samples/s at 224x224, AMP, channels_last (NHWC), RTX 3090,
# PyTorch 1.12, CUDA 11.3; the batch size is timm's (the largest that fit), one GPU, one process.
PUBLISHED_SOURCE = {
    "repository": "huggingface/pytorch-image-models",
    "file": "results/benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv",
    "commit": "5e7d47ca105a59a39778102d3276291d6db5dd32",
    "column": "train_samples_per_sec",
    "gpu": "NVIDIA RTX 3090",
    "software": "PyTorch 1.12, CUDA 11.3, AMP, NHWC (channels_last)",
}
# backbone -> (train samples/s, timm's batch size, image size); rows copied from that file
PUBLISHED_TRAIN_RATES: dict[str, tuple[float, int, int]] = {
    "efficientnet_b0": (1751.72, 512, 224),
    "convnext_tiny": (819.24, 256, 224),
    "resnet50": (1218.01, 512, 224),
}


def published_note() -> str:
    s = PUBLISHED_SOURCE
    return f"{s['repository']} {s['file']} (commit {s['commit'][:12]}; {s['gpu']}, {s['software']})"


def gpu_rate_per_trial(backbone: str, image_size: tuple[int, int], gpu_share: float) -> float:
    """The published training rate of ``backbone`` for one trial holding ``gpu_share`` of that GPU, scaled
    from the published image size to ``image_size`` by pixel count (compute ~ pixels for these CNNs)."""
    rate, _, size = PUBLISHED_TRAIN_RATES[backbone]
    height, width = image_size
    return rate * gpu_share * (size * size) / (height * width)


DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "default.yaml"


@dataclass(frozen=True)
class SpaceFigures:
    """What the bench takes from the default search space (the GPU node's)."""

    path: str
    image_size: tuple[int, int]
    batch_size: int
    num_workers: int | str
    augment: dict[str, float]
    k: int
    backbones: tuple[str, ...]
    freeze_depths: tuple[int, ...]  # the ends of the searched range
    trial_cpus: float
    gpu_share: float
    resume_every_epochs: int | None  # None: not set in the space (TrainConfig's default applies)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "image_size": list(self.image_size),
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "augment": dict(self.augment),
            "k": self.k,
            "backbones": list(self.backbones),
            "freeze_depths": list(self.freeze_depths),
            "trial_cpus": self.trial_cpus,
            "gpu_share": self.gpu_share,
            "resume_every_epochs": self.resume_every_epochs,
        }


def default_space(path: Path = DEFAULT_SPACE) -> SpaceFigures:
    """The default space's fixed values, searched backbones and freeze range, and per-trial resources."""
    space = yaml.safe_load(Path(path).read_text())
    fixed, search, resources = space["fixed"], space["search"], space.get("resources", {})

    def choices(name: str, default: Any) -> list:
        spec = search.get(name)
        if spec is None:
            return [fixed.get(name, default)]
        return list(spec.get("choice") or spec.get("int") or [])

    depths = [int(v) for v in choices("freeze_depth", 0)]
    every = fixed.get("resume_every_epochs")
    return SpaceFigures(
        path=str(path),
        image_size=tuple(int(v) for v in fixed["image_size"]),
        batch_size=int(fixed["batch_size"]),
        num_workers=fixed.get("num_workers", 0),  # a number, or "auto" (trainers.device.loader_workers)
        augment={k: float(v) for k, v in fixed.get("augment", {}).items()},
        k=int(fixed.get("k", 5)),
        backbones=tuple(str(b) for b in choices("backbone", "resnet10t")),
        freeze_depths=tuple(sorted({min(depths), max(depths)})),
        trial_cpus=float(resources.get("cpu", 1)),
        gpu_share=float(resources.get("gpu", 1)),
        resume_every_epochs=int(every) if every is not None else None,
    )
