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

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from trainers import cache as image_cache
from trainers import screened as promotion
from trainers.checkpoint import fold_checkpoint_path, save_fold_checkpoint
from trainers.config import TrainConfig
from trainers.device import apply_backend_settings, autocast_for, pick_device
from trainers.device_augment import DeviceAugment
from trainers.errors import FoldtuneError
from trainers.fold_state import FoldState, build_fold, predict_validation, seed_everything
from trainers.folds import HOLDOUT_FOLD
from trainers.io import write_csv_atomic, write_text_atomic
from trainers.loader import FoldLoader, epoch_seed
from trainers.metrics import compute_metrics, flat_scalars
from trainers.models import apply_freeze_train_mode
from trainers.resume import RESUME_STATE, Progress, load_resume_state, resume_state_due, save_resume_state
from trainers.run_outputs import FitResult, write_out_of_fold, write_result
from trainers.transforms import normalize_batch

# GradScaler skips an fp16 step whose gradients overflowed (the first steps, while it finds its scale); the
# schedule then steps without the optimizer and torch warns about the order. Expected with loss scaling.
warnings.filterwarnings(
    "ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before `optimizer\.step\(\)`"
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def fit(
    cfg: TrainConfig,
    table: pd.DataFrame,
    folds: pd.DataFrame,
    run_dir: Path,
    cache_dir: Path,
    resolved_weights=None,
    callback: Callable[[EpochReport], None] | None = None,
    log: Callable[[str], None] | None = print,
    resume_dir: Path | None = None,
    holds_gpu: bool | None = None,
    promote: bool = False,
) -> FitResult:
    """Train ``cfg`` on all k folds in lockstep; see the module docstring for what is written where.

    ``resume_dir`` holds the resume state (default: the run folder); a search puts it on node-local disk,
    so k models and their optimizer states are not written to shared storage every few epochs.
    ``holds_gpu`` says whether the scheduler gave this run a GPU (``trainers.device.pick_device``: a run
    holding one trains on it or fails at once, never quietly on the CPU).
    ``promote``: ``run_dir`` holds a finished screen of ``cfg`` on its first folds; those are reused as they
    are and the others trained (``trainers.screened``).
    """
    log = log or (lambda message: None)
    run_dir = Path(run_dir).absolute()
    for sub in ("checkpoints", "metrics", "plots"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    screened = promotion.read_screened(run_dir, cfg) if promote else None
    device = pick_device(cfg.device, holds_gpu)
    apply_backend_settings(cfg.cudnn_benchmark, cfg.tf32, device)
    resolved_weights = _resolve_weights(cfg, resolved_weights)
    mean, std = input_stats(resolved_weights)

    data = join_folds(table, folds, cfg.k)
    # decoding threads within this run's CPU share (a search sets torch's threads to the trial's CPUs)
    cache_path = image_cache.prepare_cache(cfg, data, cache_dir, log=log, workers=torch.get_num_threads())
    cache = image_cache.open_cache(cache_path)
    if screened is None:  # a promotion writes it last: until then the folder is the screened run
        write_text_atomic(yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_dir / "config.yaml")
    # with the labels trained on: the ensemble rebuilds an interrupted run's OOF rows from it
    write_csv_atomic(data[["rel_path", "person_id", "fold", "label"]], run_dir / "folds.csv")

    with out_of_memory_advice(cfg, "building the fold models"):
        fold_states = _build_folds(cfg, data, cache, device, resolved_weights)
    freeze = fold_states[0].freeze
    log(
        f"{cfg.backbone}: {freeze.trainable_params:,} of {freeze.total_params:,} parameters trainable "
        f"(freeze_depth {cfg.freeze_depth}); {_folds_line(cfg)} on {device.type}"
    )
    resume_path = Path(resume_dir or run_dir).absolute() / RESUME_STATE
    progress = load_resume_state(resume_path, fold_states, cfg, run_dir, log)
    reused = screened.folds if screened is not None else 0
    if screened is not None:
        promotion.reuse_screened(fold_states, screened, run_dir)
        log(promotion.describe(screened, cfg))
    on_device = augment_on_device(cfg, device)
    loaders = [
        FoldLoader(
            cache_path, f.train_rows, f.train_labels, cfg, f.index, device, augment_on_loader=not on_device
        )
        for f in fold_states
    ]
    device_augment = DeviceAugment(cfg.augment) if on_device else None
    last_saved = (progress.last_epoch, time.monotonic())

    status, message, epoch = "completed", f"trained {cfg.epochs} epochs", progress.last_epoch
    for epoch in range(progress.last_epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        fold_metrics = []
        for fold_state in fold_states:
            if fold_state.index < reused:  # a screened fold: its own epoch, as the screen trained it
                fold_metrics.append(screened.metrics(fold_state.index, epoch))
                continue
            if device_augment is not None:
                device_augment.reseed(epoch_seed(cfg, fold_state.index, epoch))
            batches = loaders[fold_state.index].epoch(epoch)
            outcome = _train_and_validate(fold_state, cfg, batches, device_augment, cache, device, mean, std)
            if outcome.scalars is None:
                status = "diverged"
                message = (
                    f"{outcome.why} at epoch {epoch} in fold {fold_state.index}: lower lr (now "
                    f"{cfg.lr:g}) or check the data"
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
                    val_probs=fold_state.best_probs,
                )
        if status == "diverged":
            break
        report = _end_epoch(progress, fold_metrics, epoch, run_dir, time.perf_counter() - started, reused)
        if resume_state_due(cfg, epoch, last_saved):
            save_resume_state(resume_path, fold_states, cfg, progress)
            last_saved = (epoch, time.monotonic())
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
        with out_of_memory_advice(cfg, "predicting the out-of-fold images with TTA"):
            write_out_of_fold(fold_states, data, cfg, cache, device, mean, std, run_dir, result)
        if screened is not None:
            write_text_atomic(yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_dir / "config.yaml")
    if not (status == "diverged" and screened is not None):  # a failed promotion keeps the screened run
        write_result(result, cfg, run_dir)
    if status != "diverged":  # last: a run killed before this resumes at its end, not at epoch 1
        resume_path.unlink(missing_ok=True)
        if resume_path.parent != run_dir:
            with contextlib.suppress(OSError):  # its own folder goes too, unless something else is in it
                resume_path.parent.rmdir()
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
    """The table with each image's fold; refuses images without a fold or a fold file for another k.

    Held-out persons (fold ``HOLDOUT_FOLD``) stay in the table: no fold trains or validates on them."""
    merged = table.merge(folds[["rel_path", "fold"]], on="rel_path", how="left", validate="one_to_one")
    missing = merged["fold"].isna()
    if missing.any():
        example = merged.loc[missing, "rel_path"].iloc[0]
        raise TrainingError(
            f"{int(missing.sum())} images have no fold (e.g. {example}); the fold file belongs to other "
            "data: re-create it with `foldtune folds` (and pass it with --folds) or leave --folds out"
        )
    merged["fold"] = merged["fold"].astype(int)
    found = sorted(set(merged["fold"].unique().tolist()) - {HOLDOUT_FOLD})
    if found != list(range(k)):
        raise TrainingError(
            f"the fold file has folds {found} but the config asks for k={k}; re-create it with "
            f"`foldtune folds --k {k}`"
        )
    return merged.reset_index(drop=True)


def _folds_line(cfg: TrainConfig) -> str:
    if cfg.folds_trained == cfg.k:
        return f"{cfg.k} folds"
    return f"{cfg.folds_trained} of {cfg.k} folds (train_folds)"


def _build_folds(cfg: TrainConfig, data: pd.DataFrame, cache, device, resolved_weights) -> list[FoldState]:
    """The fold states (the first ``train_folds``, else all k), each seeded alike whatever ran before it
    (a resumed run builds the same ones)."""
    pretrained_kwargs = {}
    if resolved_weights is not None:
        from trainers.weights import timm_kwargs

        pretrained_kwargs = timm_kwargs(resolved_weights)
    all_rows = cache.rows(data["image_path"].tolist())
    labels = data["label"].to_numpy(dtype=np.int64)
    trainable = ~data["age"].isin(list(cfg.drop_ages)).to_numpy()
    fold_of = data["fold"].to_numpy()
    states = []
    for fold in range(cfg.folds_trained):
        seed_everything(cfg.seed + fold)
        train_mask = (fold_of != fold) & (fold_of != HOLDOUT_FOLD) & trainable
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


# --- one epoch --------------------------------------------------------------------------------------------


@dataclass
class _FoldEpoch:
    """One fold's epoch: its validation scalars and probabilities, or ``scalars`` None when it diverged
    (``why`` then says how)."""

    scalars: dict[str, float] | None
    probs: np.ndarray | None
    why: str = ""


def _train_and_validate(
    fold: FoldState, cfg: TrainConfig, batches, augment, cache, device, mean, std
) -> _FoldEpoch:
    """Train one fold for one epoch on ``batches`` and score its validation images."""
    channels_last = cfg.channels_last and device.type == "cuda"
    with out_of_memory_advice(cfg, "training"):
        loss = train_one_epoch(fold, cfg, batches, device, mean, std, channels_last, augment)
        if loss.diverged:
            return _FoldEpoch(None, None, loss.why())
        probs = predict_validation(fold, cfg, cache.images, device, mean, std)
    if not np.isfinite(probs).all():
        return _FoldEpoch(None, None, "validation probabilities became non-finite")
    val_loss = float(-np.log(np.clip(probs[np.arange(len(probs)), fold.val_labels], 1e-7, 1)).mean())
    scalars = flat_scalars(compute_metrics(fold.val_labels, probs, loss=val_loss), prefix="val_")
    scalars["train_loss"] = loss.mean
    scalars["train_skipped_steps"] = float(loss.skipped)
    return _FoldEpoch(scalars, probs)


# A GradScaler whose scale fell this low has skipped step after step: fp16 cannot hold this run's numbers.
MIN_LOSS_SCALE = 2.0**-10


@dataclass(frozen=True)
class EpochLoss:
    """One pass over the training batches, read back from the device once at its end."""

    mean: float  # mean loss of the steps with a finite loss (nan when there was none)
    steps: int
    skipped: int  # steps fp16 loss scaling skipped (an overflow: the weights stayed as they were)
    scale: float  # the loss scale after the pass (1.0 without loss scaling)
    scaling: bool  # whether fp16 loss scaling ran (else any non-finite loss is divergence)
    nonfinite: int = 0  # steps whose loss was nan or inf

    @property
    def diverged(self) -> bool:
        """Without loss scaling a non-finite loss reached the weights; with it, a skipped step is harmless,
        but a scale that collapsed (every step overflowing) or no finite step at all is divergence."""
        if not self.scaling:
            return self.nonfinite > 0 or not math.isfinite(self.mean)
        return self.scale < MIN_LOSS_SCALE or not math.isfinite(self.mean)

    def why(self) -> str:
        if self.scaling and self.scale < MIN_LOSS_SCALE:
            return (
                f"the fp16 loss scale collapsed to {self.scale:g} ({self.skipped} of {self.steps} steps "
                "overflowed)"
            )
        return f"training loss became {'nan' if self.nonfinite else self.mean} ({self.nonfinite} steps)"


def train_one_epoch(
    fold: FoldState,
    cfg: TrainConfig,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    mean,
    std,
    channels_last: bool,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> EpochLoss:
    """One pass over ``batches`` (uint8 NHWC images, labels); its ``EpochLoss``.

    ``fit`` passes its ``FoldLoader``'s epoch; any iterable of batches works, which is how ``make bench``
    times this same step on in-memory batches and on other loaders. ``augment`` (device augmentation)
    runs on the batch once it is on the device.

    No host sync per step: the loss sums, the count of non-finite losses and of the steps fp16 loss
    scaling skipped stay on the device and are read once, at the end of the epoch (a ``loss.item()`` per
    step makes the CPU wait for the GPU to drain, so the next batch is queued late). With fp16 a step
    whose loss or gradients overflow is skipped by ``GradScaler`` and counted, not divergence.
    """
    model, forward, scaler = fold.model, fold.forward_for_training(), fold.scaler
    model.train()
    apply_freeze_train_mode(model, fold.freeze)
    scaling = scaler.is_enabled()
    # on the device: [loss sum over finite steps, their images, non-finite steps, skipped steps]
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    steps = 0
    for images, targets in batches:
        images = images.to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        x = normalize_batch(images, mean, std, channels_last)
        y = targets.to(device, non_blocking=True)
        with autocast_for(device, cfg.amp):
            loss = fold.criterion(forward(x), y)
        fold.optimizer.zero_grad(set_to_none=True)
        scaled = scaler.scale(loss)  # (makes the scaler's scale tensor on its first call)
        scale_before = scaler._scale.clone() if scaling else None
        scaled.backward()
        scaler.step(fold.optimizer)
        scaler.update()
        fold.scheduler.step()
        value = loss.detach().double()
        finite = torch.isfinite(value)
        sums[0] += torch.where(finite, value * len(y), 0.0)
        sums[1] += finite * len(y)
        sums[2] += ~finite
        if scale_before is not None:  # GradScaler halves its scale exactly when it skips a step
            sums[3] += scaler._scale < scale_before
        steps += 1
    scale = scaler._scale if scaling and scaler._scale is not None else None
    if scale is not None:
        sums = torch.cat([sums, scale.double().reshape(1)])
    values = sums.tolist()  # the one readback of the epoch
    total, images_kept, nonfinite, skipped = values[:4]
    return EpochLoss(
        mean=total / images_kept if images_kept else float("nan"),
        steps=steps,
        skipped=int(skipped),
        scale=values[4] if scale is not None else 1.0,
        scaling=scaling,
        nonfinite=int(nonfinite),
    )


def augment_on_device(cfg: TrainConfig, device: torch.device) -> bool:
    """Where augmentation runs: ``augment_on`` as configured; ``auto`` means on the GPU when training on
    one (the CPU then only slices cached batches), on the loader otherwise."""
    if cfg.augment_on == "auto":
        return device.type == "cuda"
    return cfg.augment_on == "device"


@contextlib.contextmanager
def out_of_memory_advice(cfg: TrainConfig, doing: str):
    """CUDA running out of memory ``doing`` something (building the folds, training, the out-of-fold and
    TTA pass) becomes one ``TrainingError`` line naming what to lower; what was written before stays."""
    try:
        yield
    except torch.OutOfMemoryError:
        height, width = cfg.image_size
        raise TrainingError(
            f"out of GPU memory {doing} ({cfg.backbone}, batch_size {cfg.batch_size}, image_size "
            f"{height}x{width}): lower batch_size (e.g. {max(1, cfg.batch_size // 2)}) or image_size, or "
            "give each trial a larger share of a GPU (resources.gpu)"
        ) from None


# --- after each epoch -------------------------------------------------------------------------------------


def _end_epoch(
    progress: Progress,
    fold_metrics: list[dict[str, float]],
    epoch: int,
    run_dir: Path,
    seconds: float,
    reused: int = 0,
) -> EpochReport:
    """Mean over folds, best-so-far, ``metrics/epochs.csv``; the report the callback receives. ``reused``:
    the first folds were not trained this epoch (a promotion); ``timed_from`` says which folds were timed."""
    keys = [key for key in fold_metrics[0] if all(key in m for m in fold_metrics)]
    mean_metrics = {key: float(np.mean([m[key] for m in fold_metrics])) for key in keys}
    if mean_metrics["val_f1"] > progress.best_mean_f1:
        progress.best_mean_f1, progress.best_mean_epoch = mean_metrics["val_f1"], epoch
    for fold, values in enumerate(fold_metrics):
        progress.history.append({"epoch": epoch, "fold": str(fold), **values})
    # the epoch's wall seconds (every fold, with validation): a planned search measures its cost from them
    timing = {"epoch_seconds": seconds, **({"timed_from": reused} if reused else {})}
    progress.history.append({"epoch": epoch, "fold": "mean", **mean_metrics, **timing})
    progress.last_epoch = epoch
    write_csv_atomic(pd.DataFrame(progress.history), run_dir / "metrics" / "epochs.csv")
    return EpochReport(
        epoch, mean_metrics, fold_metrics, progress.best_mean_f1, progress.best_mean_epoch, run_dir, seconds
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
