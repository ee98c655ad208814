"""Refit: one trial's configuration trained again on every training person, with no validation.

A k-fold trial's fold models each saw (k-1)/k of the training persons; once a configuration is chosen, a
model trained on all of them usually scores a little better, and is a cheap extra member for the vote.
Without validation there is no best epoch to pick, so the number of epochs is decided beforehand: the
rounded mean of the folds' best epochs (or the caller's), and the learning-rate schedule is built for
exactly that many epochs.

Everything else is one fold of ``trainers.fit``, so a refit model is trained the way the fold models it
joins were: the same ``build_fold`` (model, freeze depth, loss, AdamW, warmup-cosine schedule), the same
``FoldLoader`` and device augmentation, the same ``train_one_epoch``, the same ``drop_ages`` rule. The
rows are those with fold >= 0 in the trial's ``folds.csv``; rows with fold -1 are the search's HOLDOUT
persons, never trained on: each refit model predicts them (with and without the config's TTA) so the refit
has an honest score.

Seeds: model ``s`` of ``seeds`` trains with ``cfg.seed + 1000 * (s + 1)`` (``refit_seed``), so it shares
neither initialisation nor batch order with a fold model (fold i used ``cfg.seed + i``, and k < 1000) nor
with another refit model. Its checkpoint is a fold checkpoint (``trainers.checkpoint``) with fold -1, so
everything that loads a fold model loads it; its ``config`` is the one it trained with (epochs and seed
replaced). Each checkpoint is written atomically once its model is trained; ``holdout.npz`` after the last.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from trainers import cache as image_cache
from trainers.checkpoint import load_best_weights, read_checkpoint, save_fold_checkpoint
from trainers.config import TrainConfig
from trainers.device import pick_device
from trainers.device_augment import DeviceAugment
from trainers.fit import (
    TrainingError,
    augment_on_device,
    input_stats,
    out_of_memory_advice,
    train_one_epoch,
)
from trainers.fold_state import build_fold, seed_everything
from trainers.folds import HOLDOUT_FOLD
from trainers.io import atomic_savez
from trainers.labels import NUM_CLASSES
from trainers.loader import FoldLoader, epoch_seed
from trainers.metrics import compute_metrics
from trainers.predict import predict_proba

REFIT_FOLD = HOLDOUT_FOLD  # the "fold" of a refit checkpoint: no k-fold model, like the holdout rows
SEED_STRIDE = 1000  # refit model s trains with cfg.seed + SEED_STRIDE * (s + 1)
HOLDOUT_FILE = "holdout.npz"


def refit_seed(base_seed: int, index: int) -> int:
    """The seed of refit model ``index``: apart from every fold model's (``cfg.seed + fold``)."""
    return int(base_seed) + SEED_STRIDE * (index + 1)


def seed_checkpoint_path(out_dir: Path, index: int) -> Path:
    """Where refit model ``index`` is kept: ``<out_dir>/seed{index}.pt``."""
    return Path(out_dir) / f"seed{index}.pt"


@dataclass
class RefitModel:
    """One trained refit model: where it is, how its loss went, and its holdout probabilities."""

    index: int
    seed: int
    path: Path
    train_loss: list[float]  # per epoch
    seconds: float
    holdout_probs: np.ndarray  # (holdout rows, 18), no TTA; empty when there is no holdout
    holdout_probs_tta: np.ndarray  # with the config's TTA views
    holdout_f1: float = float("nan")  # macro F1 of ``holdout_probs`` (nan without holdout)


@dataclass
class RefitResult:
    """What a refit produced: its models and, when the search keeps holdout persons, their scores."""

    epochs: float  # whole epochs, or a fraction of the last one (what a planned budget held)
    rows_trained: int
    models: list[RefitModel]
    holdout_rel_path: np.ndarray
    holdout_label: np.ndarray
    holdout_path: Path | None = None  # holdout.npz, when there are holdout rows
    holdout_f1: float = float("nan")  # macro F1 of the seed models' mean probabilities, no TTA
    holdout_f1_tta: float = float("nan")
    seconds: float = 0.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def join_trial_rows(table: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """The table's rows the trial used, each with its fold (-1: holdout); in the fold file's order.

    Every row of the fold file must be in the table: a missing one means other data than the trial's.
    Images of the table the trial never listed are left out.
    """
    merged = folds[["rel_path", "fold"]].merge(table, on="rel_path", how="left", validate="one_to_one")
    missing = merged["image_path"].isna()
    if missing.any():
        example = merged.loc[missing, "rel_path"].iloc[0]
        raise TrainingError(
            f"{int(missing.sum())} images of the trial's fold file are not in the data (e.g. {example}); "
            "pass the data root the search was run on"
        )
    return merged.reset_index(drop=True)


def mean_best_epoch(checkpoints: Sequence[Path]) -> tuple[int, list[int]]:
    """(the rounded mean of the folds' best epochs, each fold's best epoch), read memory-mapped.

    Each fold checkpoint is its fold's best epoch; their mean is how long this configuration trains
    before it stops improving, on (k-1)/k of the persons.
    """
    epochs = [int(read_checkpoint(path, mmap=True)["epoch"]) for path in checkpoints]
    return max(1, math.floor(sum(epochs) / len(epochs) + 0.5)), epochs


def training_mask(data: pd.DataFrame, cfg: TrainConfig) -> np.ndarray:
    """The rows a refit trains on: every non-holdout row whose age is not in ``drop_ages`` (as fit)."""
    trainable = ~data["age"].isin(list(cfg.drop_ages)).to_numpy()
    return (data["fold"].to_numpy() != HOLDOUT_FOLD) & trainable


def refit(
    cfg: TrainConfig,
    data: pd.DataFrame,
    out_dir: Path,
    cache_dir: Path,
    epochs: float,
    seeds: int = 1,
    resolved_weights=None,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = print,
    init_from: Path | None = None,
) -> RefitResult:
    """Train ``seeds`` models of ``cfg`` for ``epochs`` on ``data``'s fold >= 0 rows (see the module).

    ``init_from``: a fold checkpoint of the same configuration whose weights every model starts from
    instead of the pretrained ones (a planned search continues its screened fold model: the screen's
    epochs are reused, not repeated); its schedule (warmup, cosine over ``epochs``) starts afresh.

    ``data`` is ``join_trial_rows``'s table. Writes ``seed{s}.pt`` per model and, when there are holdout
    rows, ``holdout.npz`` (``rel_path``, ``label``, ``probs``, ``probs_tta``: the seed models' mean;
    ``probs_seed{s}``, ``probs_tta_seed{s}``: each model's) into ``out_dir``.
    """
    log = log or (lambda message: None)
    started = time.perf_counter()
    out_dir = Path(out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device if isinstance(device, torch.device) else pick_device(device or cfg.device)
    if resolved_weights is None and cfg.pretrained:
        from trainers.weights import resolve_pretrained

        resolved_weights = resolve_pretrained(cfg.backbone, cfg.pretrained)
    mean, std = input_stats(resolved_weights)
    pretrained_kwargs = {}
    if resolved_weights is not None:
        from trainers.weights import timm_kwargs

        pretrained_kwargs = timm_kwargs(resolved_weights)

    cache_path = image_cache.prepare_cache(cfg, data, cache_dir, log=log, workers=torch.get_num_threads())
    cache = image_cache.open_cache(cache_path)
    all_rows = cache.rows(data["image_path"].tolist())
    labels = data["label"].to_numpy(dtype=np.int64)
    train = training_mask(data, cfg)
    holdout = data["fold"].to_numpy() == HOLDOUT_FOLD
    if not train.any():
        raise TrainingError("no training rows: every row is holdout or in drop_ages; check folds.csv")

    models = []
    for index in range(seeds):
        seed_cfg = dataclasses.replace(cfg, epochs=math.ceil(epochs), seed=refit_seed(cfg.seed, index))
        with out_of_memory_advice(cfg, "refitting"):
            model = _train_one_seed(
                seed_cfg,
                index,
                seeds,
                cache_path,
                all_rows[train],
                labels[train],
                device,
                (mean, std),
                pretrained_kwargs,
                log,
                init_from,
                float(epochs),
            )
            probs, probs_tta = _predict_holdout(
                model, seed_cfg, cache.images, all_rows[holdout], device, mean, std
            )
        path = seed_checkpoint_path(out_dir, index)
        f1 = _macro_f1(labels[holdout], probs)
        save_fold_checkpoint(
            path, model.model, seed_cfg, mean, std, REFIT_FOLD, math.ceil(epochs), f1, val_probs=probs
        )
        models.append(
            RefitModel(index, seed_cfg.seed, path, model.losses, model.seconds, probs, probs_tta, f1)
        )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = RefitResult(
        epochs=float(epochs) if epochs != int(epochs) else int(epochs),
        rows_trained=int(train.sum()),
        models=models,
        holdout_rel_path=data.loc[holdout, "rel_path"].to_numpy(dtype=str),
        holdout_label=labels[holdout],
        mean=tuple(mean),
        std=tuple(std),
    )
    if holdout.any():
        result.holdout_path = _write_holdout(out_dir / HOLDOUT_FILE, result)
        result.holdout_f1 = _macro_f1(result.holdout_label, _mean_probs(models, tta=False))
        result.holdout_f1_tta = _macro_f1(result.holdout_label, _mean_probs(models, tta=True))
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class _Trained:
    model: torch.nn.Module
    losses: list[float]
    seconds: float


def _train_one_seed(
    cfg: TrainConfig,
    index: int,
    seeds: int,
    cache_path: Path,
    rows: np.ndarray,
    labels: np.ndarray,
    device: torch.device,
    stats: tuple[tuple[float, ...], tuple[float, ...]],
    pretrained_kwargs: dict,
    log: Callable[[str], None],
    init_from: Path | None = None,
    epochs: float | None = None,
) -> _Trained:
    """One refit model, trained as fold 0 of ``fit`` would be with ``cfg`` (its seed already the refit's),
    from ``init_from``'s weights when given; ``epochs`` with a fraction ends the schedule, and the training,
    that far into the last of ``cfg.epochs`` epochs."""
    started = time.perf_counter()
    seed_everything(cfg.seed)  # fit seeds fold i with cfg.seed + i before building it
    epochs = float(epochs or cfg.epochs)
    fold = build_fold(cfg, 0, rows, labels, device, pretrained_kwargs, epochs=epochs)

    if init_from is not None:
        load_best_weights(fold.model, init_from)
        if index == 0:
            log(f"starting from {init_from} (epoch {int(read_checkpoint(init_from, mmap=True)['epoch'])})")
    if index == 0:
        log(
            f"{cfg.backbone}: {fold.freeze.trainable_params:,} of {fold.freeze.total_params:,} parameters "
            f"trainable (freeze_depth {cfg.freeze_depth}); {len(rows)} images on {device.type}"
        )
    on_device = augment_on_device(cfg, device)
    loader = FoldLoader(cache_path, rows, labels, cfg, 0, device, augment_on_loader=not on_device)
    steps_per_epoch = len(loader.loader)  # the batches it yields (the last partial one is dropped)
    total_steps = round(epochs * steps_per_epoch)
    augment = DeviceAugment(cfg.augment) if on_device else None
    channels_last = cfg.channels_last and device.type == "cuda"
    losses = []
    for epoch in range(1, cfg.epochs + 1):
        epoch_started = time.perf_counter()
        if augment is not None:
            augment.reseed(epoch_seed(cfg, 0, epoch))
        batches = loader.epoch(epoch)
        left = total_steps - (epoch - 1) * steps_per_epoch
        if left < steps_per_epoch:  # the last, partial epoch of a fractional schedule
            batches = itertools.islice(batches, left)
        loss = train_one_epoch(fold, cfg, batches, device, *stats, channels_last, augment)
        if loss.diverged:
            raise TrainingError(
                f"refit model {index}: {loss.why()} at epoch {epoch} (lr {cfg.lr:g}); refit another trial "
                "(--trial) or with fewer --epochs; no refit record was written"
            )
        losses.append(loss.mean)
        log(
            f"seed {index + 1}/{seeds} epoch {epoch}/{cfg.epochs}  train_loss {loss.mean:.4f}  "
            f"{time.perf_counter() - epoch_started:.1f}s"
        )
    del loader  # its persistent workers end with it
    return _Trained(fold.model, losses, time.perf_counter() - started)


def _predict_holdout(
    trained: _Trained, cfg: TrainConfig, images: np.ndarray, rows: np.ndarray, device, mean, std
) -> tuple[np.ndarray, np.ndarray]:
    """The model's holdout probabilities without and with the config's TTA, scored as fit scores
    validation images (``predict_validation``'s batch size and settings)."""
    if len(rows) == 0:
        empty = np.zeros((0, NUM_CLASSES), dtype=np.float32)
        return empty, empty
    common = dict(
        device=device,
        batch_size=max(cfg.batch_size, 64),
        amp=cfg.amp,
        channels_last=cfg.channels_last and device.type == "cuda",
    )
    probs = predict_proba(trained.model, cfg.head, images, rows, mean, std, **common)
    probs_tta = predict_proba(trained.model, cfg.head, images, rows, mean, std, tta=cfg.tta, **common)
    return probs, probs_tta


def _mean_probs(models: list[RefitModel], tta: bool) -> np.ndarray:
    return np.mean([m.holdout_probs_tta if tta else m.holdout_probs for m in models], axis=0)


def _macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    return float(compute_metrics(labels, probs)["f1"]) if len(labels) else float("nan")


def _write_holdout(path: Path, result: RefitResult) -> Path:
    per_seed = {}
    for model in result.models:
        per_seed[f"probs_seed{model.index}"] = model.holdout_probs
        per_seed[f"probs_tta_seed{model.index}"] = model.holdout_probs_tta
    return atomic_savez(
        path,
        rel_path=result.holdout_rel_path,
        label=result.holdout_label,
        probs=_mean_probs(result.models, tta=False).astype(np.float32),
        probs_tta=_mean_probs(result.models, tta=True).astype(np.float32),
        **per_seed,
    )
