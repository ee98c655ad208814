"""Checking the ensemble's arguments before anything slow: TTA views, the search folder, the device, the
fold models asked for, and that the training images the trials used are still where they were.

Each check raises one OrchestratorError line naming the argument and what to do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from orchestrator.errors import OrchestratorError

DEFAULT_STORAGE = Path("runs")


def check_tta(tta: Sequence[str] | None) -> tuple[str, ...] | None:
    from trainers.transforms import TTA_VIEWS  # here: transforms pulls in torch, the CLI imports this package

    if tta is None:
        return None
    views = tuple(str(v).strip() for v in tta if str(v).strip())
    unknown = TTA_VIEWS.unknown(views)
    if unknown:
        raise OrchestratorError(
            f"--tta: unknown view(s) {unknown}; use a comma-separated subset of {list(TTA_VIEWS.names())}"
        )
    return views


def check_search_dir(search: str, storage: Path | None) -> Path:
    search_dir = Path(storage or DEFAULT_STORAGE) / search
    if not search_dir.is_dir():
        raise OrchestratorError(
            f"search folder {search_dir} not found; run `foldtune search --name {search}` first, or pass the "
            "--storage the search used"
        )
    return search_dir


def check_device(device: str):
    from trainers.device import pick_device

    try:
        return pick_device(device)
    except RuntimeError as error:
        raise OrchestratorError(str(error)) from None


def check_folds(folds: Sequence[int] | None, k: int) -> list[int]:
    """The fold models to use, sorted; every one of the trials' ``k`` when ``folds`` is None."""
    if folds is None:
        return list(range(k))
    chosen = sorted({int(f) for f in folds})
    bad = [f for f in chosen if not 0 <= f < k]
    if not chosen or bad:
        raise OrchestratorError(
            f"--folds: {bad or 'none given'} not among the trials' folds 0..{k - 1}; e.g. --folds 0 or 0,2"
        )
    return chosen


def train_paths(data_root: Path, rel_paths: np.ndarray) -> list[str]:
    """Absolute training image paths, spelled as trainers.data does (so the training cache is reused)."""
    root = data_root.resolve()
    paths = [str(root / rel) for rel in rel_paths.tolist()]
    missing = [rel for rel, path in zip(rel_paths.tolist(), paths, strict=True) if not os.path.isfile(path)]
    if missing:
        raise OrchestratorError(
            f"{len(missing)} training images the trials were trained on are missing under {root} (e.g. "
            f"{missing[:3]}); --data must be the data root the search was run on"
        )
    return paths
