"""Predicting with the members: every fold model of a selected trial, over the eval (and training) images.

This is the only slow, device-bound part of the ensemble, so it is arranged to fail early and to fit in
memory:

- every member's fold checkpoints are checked (metadata only, memory-mapped, no model built) before the
  first prediction, so a truncated or foreign file fails in seconds instead of after minutes of inference;
- one fold model is on the device at a time, and images stream in batches from the memory-mapped image
  cache (built once per image size and crop, and shared with training).

torch is imported inside the functions, so importing the ensemble package stays cheap (e.g. for the CLI).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from orchestrator.ensemble.candidates import Candidate
from trainers.labels import NUM_CLASSES


def check_member_checkpoints(candidate: Candidate, folds: Sequence[int]) -> None:
    """Match each of a member's ``folds`` checkpoints to the trial's config; a CheckpointError names the
    file, what is wrong and what to do."""
    from trainers.checkpoint import check_checkpoint

    result_path = candidate.run_dir / "result.json"
    owner = f"trial {candidate.trial_id}'s config ({result_path})"
    todo = f"re-run trial {candidate.trial_id} or delete its folder {candidate.run_dir} so it is skipped"
    for fold in folds:
        check_checkpoint(candidate.checkpoints[fold], candidate.config, fold, owner=owner, todo=todo)


def predict_member(
    candidate: Candidate,
    tta: tuple[str, ...],
    recompute_oof: bool,
    eval_paths: list[str],
    train_paths: list[str] | None,
    cache_dir: Path,
    device,
    batch_size: int,
    log: Callable[[str], None],
    folds: Sequence[int],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Eval probabilities (mean of the ``folds`` models) and, if asked, the OOF probabilities with ``tta``.

    One fold model is on the device at a time; images stream from the memory-mapped cache in batches.
    """
    import torch

    from trainers.cache import build_cache, open_cache
    from trainers.checkpoint import load_checkpoint
    from trainers.predict import predict_proba

    config = candidate.config
    size = tuple(int(s) for s in config["image_size"])
    crop = config.get("crop") or None
    eval_cache = open_cache(build_cache(eval_paths, size, cache_dir, crop, log=log))
    eval_rows = eval_cache.rows(eval_paths)
    train_cache = train_rows = None
    if recompute_oof:
        train_cache = open_cache(build_cache(sorted(train_paths), size, cache_dir, crop, log=log))
        train_rows = train_cache.rows(train_paths)
    amp = bool(config.get("amp", True))
    channels_last = bool(config.get("channels_last", True)) and device.type == "cuda"
    eval_probs = np.zeros((len(eval_paths), NUM_CLASSES), dtype=np.float64)
    oof = np.zeros_like(candidate.probs) if recompute_oof else None
    for fold in folds:
        loaded = load_checkpoint(candidate.checkpoints[fold], device=device)  # a CheckpointError names it
        if channels_last:
            loaded.model.to(memory_format=torch.channels_last)
        common = dict(
            mean=loaded.mean,
            std=loaded.std,
            device=device,
            batch_size=batch_size,
            tta=tta,
            amp=amp,
            channels_last=channels_last,
        )
        eval_probs += predict_proba(loaded.model, loaded.head, eval_cache.images, eval_rows, **common)
        if recompute_oof:
            held_out = np.flatnonzero(candidate.fold == fold)
            oof[held_out] = predict_proba(
                loaded.model, loaded.head, train_cache.images, train_rows[held_out], **common
            )
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return eval_probs / len(folds), oof


def predict_models(
    checkpoints: Sequence[Path],
    config: dict,
    tta: tuple[str, ...],
    paths: list[str],
    cache_dir: Path,
    device,
    batch_size: int,
    log: Callable[[str], None],
) -> np.ndarray:
    """The mean probabilities of ``checkpoints`` (e.g. a member's refit models) over ``paths``, predicted
    like its fold models: same image cache, size, crop, TTA and device settings (``config``)."""
    import torch

    from trainers.cache import build_cache, open_cache
    from trainers.checkpoint import load_checkpoint
    from trainers.predict import predict_proba

    size = tuple(int(s) for s in config["image_size"])
    cache = open_cache(build_cache(paths, size, cache_dir, config.get("crop") or None, log=log))
    rows = cache.rows(paths)
    channels_last = bool(config.get("channels_last", True)) and device.type == "cuda"
    probs = np.zeros((len(paths), NUM_CLASSES), dtype=np.float64)
    for path in checkpoints:
        loaded = load_checkpoint(path, device=device)
        if channels_last:
            loaded.model.to(memory_format=torch.channels_last)
        probs += predict_proba(
            loaded.model,
            loaded.head,
            cache.images,
            rows,
            mean=loaded.mean,
            std=loaded.std,
            device=device,
            batch_size=batch_size,
            tta=tta,
            amp=bool(config.get("amp", True)),
            channels_last=channels_last,
        )
        del loaded
    return probs / len(checkpoints)
