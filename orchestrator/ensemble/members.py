"""Predicting with the members: every fold model of a selected trial, over the eval (and training) images.

This is the only slow, device-bound part of the ensemble, so it is arranged to fail early and to fit in
memory:

- every member's fold checkpoints are checked (metadata only, memory-mapped, no model built) before the
  first prediction, so a truncated or foreign file fails in seconds instead of after minutes of inference;
- one fold model is on the device at a time, and images stream in batches from the memory-mapped image
  cache (built once per image size and crop, and shared with training).

``Predicted`` holds the members' probabilities; ``select_again`` repeats greedy selection among them once a
partial member's OOF was predicted again with its TTA (it was picked on a no-TTA proxy).

torch is imported inside the functions, so importing the ensemble package stays cheap (e.g. for the CLI).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.ensemble.candidates import Candidate
from orchestrator.ensemble.result import EnsembleMember
from orchestrator.ensemble.selection import greedy_selection, rank
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


@dataclass
class Predicted:
    """The members and their probabilities, in member order."""

    members: list[EnsembleMember]
    eval: list[np.ndarray]  # (N eval images, 18) each, float64
    oof: list[np.ndarray]  # OOF on the judged rows with the member's TTA
    oof_plain: list[np.ndarray]  # OOF on the judged rows without TTA
    holdout: list[np.ndarray]  # on the holdout persons' images, as submitted (refit models included)
    holdout_kfold: list[np.ndarray]  # the same with the k fold models only
    with_refit: bool = False  # some member's refit models are in the vote
    # each member's fold-model and refit-model probabilities (eval images, then holdout images; refit None
    # without refit models) and its (fold models, refit models): ``refit_mix`` re-weighs them
    kfold_all: list[np.ndarray] = dataclasses.field(default_factory=list)
    refit_all: list[np.ndarray | None] = dataclasses.field(default_factory=list)
    model_counts: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    refit_mix: str | None = None  # the vote refit models are in (``refit_mix.MIXES``), None without any
    refit_mix_holdout: dict[str, float] | None = None  # each mix's holdout macro F1, when chosen on it


def select_again(
    predicted: Predicted, labels: np.ndarray, greedy_steps: int, log: Callable[[str], None]
) -> Predicted:
    """Greedy selection once more among the members, now all on OOF made with the TTA they are submitted
    with: a partial trial was picked on its no-TTA OOF (a proxy), and once predicted again it may no longer
    add anything. Only drops members or changes their votes; the best single member stays first."""
    order = rank([m.oof_f1 for m in predicted.members], [m.trial_id for m in predicted.members])
    counts = greedy_selection([predicted.oof[i] for i in order], labels, max_steps=greedy_steps)
    kept = [(i, c) for i, c in zip(order, counts, strict=True) if c > 0]
    dropped = sorted(set(range(len(predicted.members))) - {i for i, _ in kept})
    if dropped:
        names = ", ".join(predicted.members[i].trial_id for i in dropped)
        log(f"selection repeated on the re-predicted OOF (with TTA): dropped {names}")
    total = sum(c for _, c in kept)
    pick = {f: [getattr(predicted, f)[i] for i, _ in kept] for f in ("eval", "oof", "oof_plain")}
    return Predicted(
        members=[dataclasses.replace(predicted.members[i], count=c, weight=c / total) for i, c in kept],
        holdout=[predicted.holdout[i] for i, _ in kept],
        holdout_kfold=[predicted.holdout_kfold[i] for i, _ in kept],
        with_refit=predicted.with_refit,
        **_split_of(predicted, [i for i, _ in kept]),
        refit_mix=predicted.refit_mix,
        **pick,
    )


def _split_of(predicted: Predicted, kept: list[int]) -> dict[str, list]:
    """The kept members' fold/refit split (``refit_mix``); none when the caller kept none (built by hand)."""
    if not predicted.kfold_all:
        return {}
    return {
        "kfold_all": [predicted.kfold_all[i] for i in kept],
        "refit_all": [predicted.refit_all[i] for i in kept],
        "model_counts": [predicted.model_counts[i] for i in kept],
    }
