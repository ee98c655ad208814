"""One k-fold training run in fold lockstep: the k fold models train epoch by epoch side by side.

After every epoch the run reports per-fold and mean validation metrics through a plain callback, so a
scheduler can compare trials fairly at any epoch, and writes a resume state (``last.pt``) first, so an
interrupted run continues where it stopped. Each fold keeps only its best checkpoint; at the end the
best checkpoints predict their held-out persons (with and without TTA) into ``oof.npz``.

Read top to bottom: the two result types, ``fit`` (setup, resume, the epoch loop, the end), then the
pieces it calls in the order it calls them. The rooms it draws on: ``fold_state`` (model, loss, optimizer
of one fold), ``loader`` (augmented batches from the image cache), ``checkpoint`` (the fold checkpoint
format), ``run_outputs`` (out-of-fold predictions, metrics files, ``result.json``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from trainers import cache as image_cache
from trainers.checkpoint import fold_checkpoint_path, save_fold_checkpoint
from trainers.config import TrainConfig
from trainers.errors import FoldtuneError
from trainers.fold_state import FoldState, build_fold, predict_validation, seed_everything
from trainers.io import atomic_torch_save, write_csv_atomic, write_text_atomic
from trainers.loader import fold_loader
from trainers.metrics import compute_metrics, flat_scalars
from trainers.models import apply_freeze_train_mode
from trainers.predict import autocast_for, pick_device
from trainers.run_outputs import write_out_of_fold, write_result
from trainers.transforms import normalize_batch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESUME_STATE = "last.pt"


class TrainingError(FoldtuneError, RuntimeError):
    """A run that cannot go on for a reason the user can fix; the message says what to change."""


@dataclass
class EpochReport:
    """What a run reports after each epoch: mean-over-folds and per-fold validation metrics."""

    epoch: int
    metrics: dict[str, float]
    fold_metrics: list[dict[str, float]]
    best_f1: float
    best_epoch: int
    run_dir: Path
    epoch_seconds: float = 0.0

    def flat(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.metrics)
        for fold, values in enumerate(self.fold_metrics):
            out.update({f"fold{fold}/{key}": value for key, value in values.items()})
        out.update(
            epoch=self.epoch,
            best_f1=self.best_f1,
            best_epoch=self.best_epoch,
            epoch_seconds=self.epoch_seconds,
        )
        return out


@dataclass
class FitResult:
    """How a run ended and where its results are."""

    status: str  # "completed" | "early_stopped" | "diverged"
    message: str
    best_f1: float  # best mean-over-folds validation macro F1 of any epoch
    best_epoch: int
    epochs_trained: int
    run_dir: Path
    oof_f1: float = float("nan")  # macro F1 of all out-of-fold predictions pooled (best checkpoints)
    oof_f1_tta: float = float("nan")
    trainable_params: int = 0
    total_params: int = 0
    extra: dict = field(default_factory=dict)


@dataclass
class _Progress:
    """The run's bookkeeping across epochs (saved in the resume state)."""

    history: list[dict] = field(default_factory=list)
    best_mean_f1: float = -1.0
    best_mean_epoch: int = 0
    last_epoch: int = 0


def fit(
    cfg: TrainConfig,
    table: pd.DataFrame,
    folds: pd.DataFrame,
    run_dir: Path,
    cache_dir: Path,
    resolved_weights=None,
    callback: Callable[[EpochReport], None] | None = None,
    log: Callable[[str], None] | None = print,
) -> FitResult:
    """Train ``cfg`` on all k folds in lockstep; see the module docstring for what is written where."""
    log = log or (lambda message: None)
    run_dir = Path(run_dir).absolute()
    for sub in ("checkpoints", "metrics", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    resolved_weights = _resolve_weights(cfg, resolved_weights)
    mean, std = input_stats(resolved_weights)

    data = join_folds(table, folds, cfg.k)
    cache_path = image_cache.prepare_cache(cfg, data, cache_dir, log=log)
    cache = image_cache.open_cache(cache_path)
    write_text_atomic(yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_dir / "config.yaml")
    write_csv_atomic(data[["rel_path", "person_id", "fold"]], run_dir / "folds.csv")

    fold_states = _build_folds(cfg, data, cache, device, resolved_weights)
    freeze = fold_states[0].freeze
    log(
        f"{cfg.backbone}: {freeze.trainable_params:,} of {freeze.total_params:,} parameters trainable "
        f"(freeze_depth {cfg.freeze_depth}); {cfg.k} folds on {device.type}"
    )
    resume_path = run_dir / RESUME_STATE
    progress = _load_resume_state(resume_path, fold_states, cfg, run_dir, log)

    status, message, epoch = "completed", f"trained {cfg.epochs} epochs", progress.last_epoch
    for epoch in range(progress.last_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        fold_metrics = []
        for fold_state in fold_states:
            outcome = _train_and_validate(fold_state, cfg, cache_path, cache, device, mean, std, epoch)
            if outcome.scalars is None:
                status = "diverged"
                message = (
                    f"training loss became {outcome.train_loss} at epoch {epoch} in fold "
                    f"{fold_state.index}: lower lr (now {cfg.lr:g}) or check the data"
                )
                break
            fold_metrics.append(outcome.scalars)
            if outcome.scalars["val_f1"] > fold_state.best_f1:
                fold_state.best_f1, fold_state.best_epoch, fold_state.best_probs = (
                    outcome.scalars["val_f1"],
                    epoch,
                    outcome.probs,
                )
                save_fold_checkpoint(
                    fold_checkpoint_path(run_dir, fold_state.index),
                    fold_state.model,
                    cfg,
                    mean,
                    std,
                    fold_state.index,
                    epoch,
                    fold_state.best_f1,
                )
        if status == "diverged":
            break
        report = _end_epoch(progress, fold_metrics, epoch, run_dir, time.perf_counter() - started)
        _save_resume_state(resume_path, fold_states, cfg, progress)
        _log_epoch(log, cfg, report)
        if callback is not None:
            callback(report)
        if cfg.patience and epoch - progress.best_mean_epoch >= cfg.patience and epoch < cfg.epochs:
            status = "early_stopped"
            message = (
                f"no mean val_f1 gain for {cfg.patience} epochs; "
                f"best {progress.best_mean_f1:.4f} at epoch {progress.best_mean_epoch}"
            )
            break

    result = FitResult(
        status=status,
        message=message,
        best_f1=progress.best_mean_f1,
        best_epoch=progress.best_mean_epoch,
        epochs_trained=epoch,
        run_dir=run_dir,
        trainable_params=freeze.trainable_params,
        total_params=freeze.total_params,
    )
    if status != "diverged":
        write_out_of_fold(fold_states, data, cfg, cache, device, mean, std, run_dir, result)
        resume_path.unlink(missing_ok=True)
    write_result(result, cfg, run_dir)
    log(f"{status}: {message}; OOF macro F1 {result.oof_f1:.4f} (TTA {result.oof_f1_tta:.4f})")
    return result


# --- setup ------------------------------------------------------------------------------------------------


def _resolve_weights(cfg: TrainConfig, resolved_weights):
    if resolved_weights is not None or not cfg.pretrained:
        return resolved_weights
    from trainers.weights import resolve_pretrained

    return resolve_pretrained(cfg.backbone, cfg.pretrained)


def input_stats(resolved_weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the backbone's pretrained weights were trained with (ImageNet's for random init)."""
    if resolved_weights is not None and getattr(resolved_weights, "kind", "none") != "none":
        return tuple(resolved_weights.mean), tuple(resolved_weights.std)
    return IMAGENET_MEAN, IMAGENET_STD


def join_folds(table: pd.DataFrame, folds: pd.DataFrame, k: int) -> pd.DataFrame:
    """The table with each image's fold; refuses images without a fold or a fold file for another k."""
    merged = table.merge(folds[["rel_path", "fold"]], on="rel_path", how="left", validate="one_to_one")
    missing = merged["fold"].isna()
    if missing.any():
        example = merged.loc[missing, "rel_path"].iloc[0]
        raise TrainingError(
            f"{int(missing.sum())} images have no fold (e.g. {example}); the fold file belongs to other "
            "data: re-create it with `foldtune folds` (and pass it with --folds) or leave --folds out"
        )
    merged["fold"] = merged["fold"].astype(int)
    found = sorted(merged["fold"].unique())
    if found != list(range(k)):
        raise TrainingError(
            f"the fold file has folds {found} but the config asks for k={k}; re-create it with "
            f"`foldtune folds --k {k}`"
        )
    return merged.reset_index(drop=True)


def _build_folds(cfg: TrainConfig, data: pd.DataFrame, cache, device, resolved_weights) -> list[FoldState]:
    """The k fold states, each seeded alike whatever ran before it (a resumed run builds the same ones)."""
    pretrained_kwargs = {}
    if resolved_weights is not None:
        from trainers.weights import timm_kwargs

        pretrained_kwargs = timm_kwargs(resolved_weights)
    all_rows = cache.rows(data["image_path"].tolist())
    labels = data["label"].to_numpy(dtype=np.int64)
    trainable = ~data["age"].isin(list(cfg.drop_ages)).to_numpy()
    fold_of = data["fold"].to_numpy()
    states = []
    for fold in range(cfg.k):
        seed_everything(cfg.seed + fold)
        train_mask = (fold_of != fold) & trainable
        val_mask = fold_of == fold
        states.append(
            build_fold(
                cfg,
                fold,
                all_rows[train_mask],
                labels[train_mask],
                device,
                pretrained_kwargs,
                val_rows=all_rows[val_mask],
                val_labels=labels[val_mask],
                val_positions=np.flatnonzero(val_mask),
            )
        )
    return states


def _load_resume_state(
    path: Path, folds: list[FoldState], cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]
) -> _Progress:
    """Continue after the last finished epoch when ``last.pt`` is there; a fresh start otherwise."""
    if not path.exists():
        return _Progress()
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != cfg.to_dict():
        raise TrainingError(f"{run_dir} holds a run of another configuration; use a new run folder")
    for fold_state, saved in zip(folds, state["folds"], strict=True):
        fold_state.model.load_state_dict(saved["model"])
        fold_state.optimizer.load_state_dict(saved["optimizer"])
        fold_state.scheduler.load_state_dict(saved["scheduler"])
        fold_state.scaler.load_state_dict(saved["scaler"])
        fold_state.best_f1, fold_state.best_epoch = saved["best_f1"], saved["best_epoch"]
        fold_state.best_probs = saved["best_probs"].numpy() if saved["best_probs"] is not None else None
    log(f"resuming {run_dir.name} after epoch {state['epoch']}")
    return _Progress(state["history"], state["best_mean_f1"], state["best_mean_epoch"], state["epoch"])


# --- one epoch --------------------------------------------------------------------------------------------


@dataclass
class _FoldEpoch:
    """One fold's epoch: its validation scalars and probabilities, or ``scalars`` None when it diverged."""

    scalars: dict[str, float] | None
    probs: np.ndarray | None
    train_loss: float


def _train_and_validate(
    fold: FoldState, cfg: TrainConfig, cache_path: Path, cache, device, mean, std, epoch: int
) -> _FoldEpoch:
    """Train one fold for one epoch and score its validation images."""
    channels_last = cfg.channels_last and device.type == "cuda"
    loader = fold_loader(cache_path, fold.train_rows, fold.train_labels, cfg, fold.index, epoch, device)
    try:
        train_loss = train_one_epoch(fold, cfg, loader, device, mean, std, channels_last)
        probs = predict_validation(fold, cfg, cache.images, device, mean, std)
    except torch.OutOfMemoryError:
        raise _oom_error(cfg) from None
    if not math.isfinite(train_loss) or not np.isfinite(probs).all():
        return _FoldEpoch(None, None, train_loss if not math.isfinite(train_loss) else float("nan"))
    val_loss = float(-np.log(np.clip(probs[np.arange(len(probs)), fold.val_labels], 1e-7, 1)).mean())
    scalars = flat_scalars(compute_metrics(fold.val_labels, probs, loss=val_loss), prefix="val_")
    scalars["train_loss"] = train_loss
    return _FoldEpoch(scalars, probs, train_loss)


def train_one_epoch(
    fold: FoldState,
    cfg: TrainConfig,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    mean,
    std,
    channels_last: bool,
) -> float:
    """One pass over ``batches`` (uint8 NHWC images, labels); returns the mean loss (nan/inf if it diverged).

    ``fit`` passes ``trainers.loader.fold_loader``; any iterable of batches works, which is how ``make
    bench`` times this same step on in-memory batches and on other loaders.
    """
    model = fold.model
    model.train()
    apply_freeze_train_mode(model, fold.freeze)
    total, count = 0.0, 0
    for images, targets in batches:
        x = normalize_batch(images.to(device, non_blocking=True), mean, std, channels_last)
        y = targets.to(device, non_blocking=True)
        with autocast_for(device, cfg.amp):
            loss = fold.criterion(model(x), y)
        if not torch.isfinite(loss):
            return float(loss.item())
        fold.optimizer.zero_grad(set_to_none=True)
        fold.scaler.scale(loss).backward()
        fold.scaler.step(fold.optimizer)
        fold.scaler.update()
        fold.scheduler.step()
        total += float(loss.item()) * len(y)
        count += len(y)
    return total / max(1, count)


def _oom_error(cfg: TrainConfig) -> TrainingError:
    height, width = cfg.image_size
    return TrainingError(
        f"out of GPU memory training {cfg.backbone} at batch_size {cfg.batch_size} and image_size "
        f"{height}x{width}: lower batch_size (e.g. {max(1, cfg.batch_size // 2)}) or image_size, or "
        "give each trial a larger share of a GPU (resources.gpu)"
    )


# --- after each epoch -------------------------------------------------------------------------------------


def _end_epoch(
    progress: _Progress, fold_metrics: list[dict[str, float]], epoch: int, run_dir: Path, seconds: float
) -> EpochReport:
    """Mean over folds, best-so-far, ``metrics/epochs.csv``; the report the callback receives."""
    mean_metrics = {key: float(np.mean([m[key] for m in fold_metrics])) for key in fold_metrics[0]}
    if mean_metrics["val_f1"] > progress.best_mean_f1:
        progress.best_mean_f1, progress.best_mean_epoch = mean_metrics["val_f1"], epoch
    for fold, values in enumerate(fold_metrics):
        progress.history.append({"epoch": epoch, "fold": str(fold), **values})
    progress.history.append({"epoch": epoch, "fold": "mean", **mean_metrics})
    progress.last_epoch = epoch
    write_csv_atomic(pd.DataFrame(progress.history), run_dir / "metrics" / "epochs.csv")
    return EpochReport(
        epoch, mean_metrics, fold_metrics, progress.best_mean_f1, progress.best_mean_epoch, run_dir, seconds
    )


def _save_resume_state(path: Path, folds: list[FoldState], cfg: TrainConfig, progress: _Progress) -> None:
    atomic_torch_save(
        {
            "epoch": progress.last_epoch,
            "config": cfg.to_dict(),
            "history": progress.history,
            "best_mean_f1": progress.best_mean_f1,
            "best_mean_epoch": progress.best_mean_epoch,
            "folds": [
                {
                    "model": f.model.state_dict(),
                    "optimizer": f.optimizer.state_dict(),
                    "scheduler": f.scheduler.state_dict(),
                    "scaler": f.scaler.state_dict(),
                    "best_f1": f.best_f1,
                    "best_epoch": f.best_epoch,
                    "best_probs": torch.from_numpy(f.best_probs) if f.best_probs is not None else None,
                }
                for f in folds
            ],
        },
        path,
    )


def _log_epoch(log: Callable[[str], None], cfg: TrainConfig, report: EpochReport) -> None:
    mean = report.metrics
    per_fold = " ".join(f"{m['val_f1']:.3f}" for m in report.fold_metrics)
    log(
        f"epoch {report.epoch}/{cfg.epochs}  val_f1 {mean['val_f1']:.4f} "
        f"(folds {per_fold})  val_loss {mean['val_loss']:.3f}"
        f"  train_loss {mean['train_loss']:.3f}  best {report.best_f1:.4f}@{report.best_epoch}"
        f"  {report.epoch_seconds:.1f}s"
    )
