"""The fold checkpoint format: what one fold model's file holds, how it is written and how it is read back.

One module so that the trainer (which writes the best checkpoint of each fold), the predictor and the
ensemble (which read them) cannot drift apart. A checkpoint is a plain dict of tensors and builtins, saved
atomically and loaded with ``weights_only=True`` (no pickled code runs on load):

``format``, ``state_dict``, ``backbone``, ``head``, ``num_classes``, ``class_names``, ``mean``, ``std``,
``image_size``, ``crop``, ``fold``, ``epoch``, ``val_f1``, ``val_probs`` (the fold's out-of-fold
probabilities at that epoch) and the run's whole ``config``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainers.config import TrainConfig
from trainers.errors import FoldtuneError
from trainers.io import atomic_torch_save
from trainers.labels import NUM_CLASSES, AgeBands, class_names

CHECKPOINT_FORMAT = "foldtune-checkpoint-1"


class CheckpointError(FoldtuneError, RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def fold_checkpoint_path(run_dir: Path, fold: int) -> Path:
    """Where a run keeps fold ``fold``'s best model."""
    return Path(run_dir) / "checkpoints" / f"fold{fold}.pt"


def save_fold_checkpoint(
    path: Path,
    model: torch.nn.Module,
    cfg: TrainConfig,
    mean: Sequence[float],
    std: Sequence[float],
    fold: int,
    epoch: int,
    val_f1: float,
    val_probs: np.ndarray | None = None,
) -> Path:
    """A fold's weights with what is needed to use them anywhere: config, class map, input stats.

    ``val_probs`` (the fold's validation probabilities at this epoch, its out-of-fold predictions) go in
    the same file, so weights and OOF predictions are written in one atomic step and can never come from
    different epochs, whenever a run is killed.
    """
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "backbone": cfg.backbone,
        "head": cfg.head,
        "num_classes": NUM_CLASSES,
        "class_names": class_names(AgeBands(tuple(cfg.age_edges))),
        "mean": list(mean),
        "std": list(std),
        "image_size": list(cfg.image_size),
        "crop": list(cfg.crop) if cfg.crop else None,
        "fold": fold,
        "epoch": epoch,
        "val_f1": float(val_f1),
        "config": cfg.to_dict(),
    }
    if val_probs is not None:
        payload["val_probs"] = torch.from_numpy(np.asarray(val_probs, dtype=np.float32))
    return atomic_torch_save(payload, path)


def read_checkpoint(path: Path, todo: str = "delete it and re-run that trial", mmap: bool = False) -> dict:
    """The checkpoint's dict, checked to be a foldtune checkpoint; ``mmap`` reads metadata without loading
    the weights into memory. ``todo`` ends every error message (what the user should do about it)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is missing; re-run the search or pick another trial")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch raises many kinds for truncated / foreign files
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a foldtune checkpoint ({type(error).__name__}: "
            f"{first_line}); {todo}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a foldtune checkpoint ({CHECKPOINT_FORMAT}); {todo}")
    if payload.get("num_classes") != NUM_CLASSES:
        raise CheckpointError(
            f"checkpoint {path} predicts {payload.get('num_classes')} classes, not {NUM_CLASSES}; "
            "it belongs to another task"
        )
    return payload


def expected_metadata(config: Mapping[str, Any], fold: int) -> dict[str, Any]:
    """What a fold checkpoint of a run with ``config`` must say about itself."""
    return {
        "num_classes": NUM_CLASSES,
        "backbone": config.get("backbone"),
        "head": config.get("head", "single"),
        "image_size": list(config.get("image_size") or []),
        "crop": list(config["crop"]) if config.get("crop") else None,
        "fold": fold,
    }


def check_checkpoint(path: Path, config: Mapping[str, Any], fold: int, owner: str, todo: str) -> None:
    """Read a fold checkpoint's metadata (memory-mapped, no model built) and match it to its run's config.

    Done for every ensemble member before any prediction, so a bad file fails in seconds, not minutes.
    ``owner`` names where the config came from, for the message.
    """
    payload = read_checkpoint(path, todo=todo, mmap=True)
    for key, value in expected_metadata(config, fold).items():
        found = payload.get(key)
        found = list(found) if isinstance(found, (tuple, list)) else found
        if found != value:
            raise CheckpointError(
                f"checkpoint {path} has {key} {found!r} but {owner} says {value!r}: the file belongs to "
                f"another run; {todo}"
            )


@dataclass
class LoadedModel:
    """A fold model rebuilt from its checkpoint, with what is needed to feed it."""

    model: torch.nn.Module
    head: str
    backbone: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: tuple[int, int]
    crop: tuple[float, ...] | None
    meta: dict[str, Any]


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Rebuild a fold model from its checkpoint (``weights_only=True``), on ``device``, in eval mode."""
    from trainers.models import ModelError, build_model

    payload = read_checkpoint(path)
    try:
        model = build_model(
            payload["backbone"],
            head=payload["head"],
            num_classes=NUM_CLASSES,
            image_size=tuple(payload["image_size"]),
        )
    except ModelError as error:  # e.g. a backbone this timm version does not know
        raise CheckpointError(
            f"checkpoint {path} cannot be rebuilt ({error}); use the timm version the search ran with"
        ) from None
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path} does not match backbone {payload['backbone']!r} "
            f"({str(error).splitlines()[0]})"
        ) from None
    model.to(device).eval()
    return LoadedModel(
        model=model,
        head=payload["head"],
        backbone=payload["backbone"],
        mean=tuple(payload["mean"]),
        std=tuple(payload["std"]),
        image_size=tuple(payload["image_size"]),
        crop=tuple(payload["crop"]) if payload.get("crop") else None,
        meta={k: v for k, v in payload.items() if k != "state_dict"},
    )


def load_best_weights(model: torch.nn.Module, path: Path) -> None:
    """Put a fold's best checkpoint back into its (training) model, e.g. for out-of-fold predictions."""
    model.load_state_dict(read_checkpoint(path)["state_dict"])
