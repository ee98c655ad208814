"""One k-fold training run in fold lockstep: the k fold models train epoch by epoch side by side.

After every epoch the run reports per-fold and mean validation metrics through a plain callback, so a
scheduler can compare trials fairly at any epoch, and writes a resume state (``last.pt``) first, so an
interrupted run continues where it stopped. Each fold keeps only its best checkpoint; at the end the
best checkpoints predict their held-out persons (with and without TTA) into ``oof.npz``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler, WeightedRandomSampler

from trainers import cache as image_cache
from trainers.config import TrainConfig
from trainers.io import atomic_torch_save, write_csv_atomic, write_text_atomic
from trainers.labels import NUM_CLASSES, AgeBands, class_names
from trainers.losses import balanced_sample_weights, build_loss, class_balanced_alpha
from trainers.metrics import compute_metrics, flat_scalars, plot_confusion, plot_per_class_f1
from trainers.models import apply_freeze_train_mode, build_model, freeze_stages
from trainers.predict import CHECKPOINT_FORMAT, autocast_for, pick_device, predict_proba
from trainers.transforms import augment_batch, normalize_batch, train_pipeline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TrainingError(RuntimeError):
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


class CachedImages(Dataset):
    """Training images straight from the memory-mapped cache, augmented per image.

    The memory map is opened lazily in each loader worker (pickling a memmap would copy the array).
    """

    def __init__(self, cache_path: Path, rows: np.ndarray, labels: np.ndarray, augment: dict, seed: int):
        self.cache_path, self.rows, self.labels = cache_path, rows, labels
        self.augment, self.seed = augment, seed
        self._images: np.ndarray | None = None
        self._pipeline = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._images is None:
            self._images = image_cache.open_cache(self.cache_path).images
            worker = torch.utils.data.get_worker_info()
            self._pipeline = train_pipeline(self.augment, seed=self.seed + (worker.id if worker else 0))
        indices = np.asarray(indices)
        batch = augment_batch(self._pipeline, self._images[self.rows[indices]])
        return torch.from_numpy(batch), torch.from_numpy(self.labels[indices])

    def __getitem__(self, index: int):  # DataLoader uses __getitems__; this keeps Dataset complete
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def _identity_collate(batch):
    return batch


class SeededShuffle(Sampler[int]):
    """A permutation seeded per (run, fold, epoch), so a resumed run sees the same batches."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class FoldState:
    """Everything one fold model trains with; fit keeps k of them and steps them in lockstep."""

    index: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    freeze: object
    train_rows: np.ndarray
    train_labels: np.ndarray
    val_rows: np.ndarray
    val_labels: np.ndarray
    val_positions: np.ndarray  # positions of this fold's validation images in the run's table
    criterion: torch.nn.Module
    best_f1: float = -1.0
    best_epoch: int = 0
    best_probs: np.ndarray | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def cosine_with_warmup(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (1-D tensors) nor on what the timm model names in its
    ``no_weight_decay()`` (a ViT's position embedding and class token); frozen parameters are left out."""
    skip: set[str] = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            skip |= {f"{prefix}.{name}" if prefix else name for name in names()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def join_folds(table: pd.DataFrame, folds: pd.DataFrame, k: int) -> pd.DataFrame:
    """The table with each image's fold; refuses images without a fold or a fold file for another k."""
    merged = table.merge(folds[["rel_path", "fold"]], on="rel_path", how="left", validate="one_to_one")
    missing = merged["fold"].isna()
    if missing.any():
        example = merged.loc[missing, "rel_path"].iloc[0]
        raise TrainingError(
            f"{int(missing.sum())} images have no fold (e.g. {example}); the fold file belongs to other "
            "data: re-create it with `foldtune folds`"
        )
    merged["fold"] = merged["fold"].astype(int)
    found = sorted(merged["fold"].unique())
    if found != list(range(k)):
        raise TrainingError(f"the fold file has folds {found} but the config asks for k={k}; re-create it")
    return merged.reset_index(drop=True)


def _input_stats(resolved_weights) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if resolved_weights is not None and getattr(resolved_weights, "kind", "none") != "none":
        return tuple(resolved_weights.mean), tuple(resolved_weights.std)
    return IMAGENET_MEAN, IMAGENET_STD


def _resolve_weights(cfg: TrainConfig, resolved_weights):
    if resolved_weights is not None or not cfg.pretrained:
        return resolved_weights
    from trainers.weights import resolve_pretrained

    return resolve_pretrained(cfg.backbone, cfg.pretrained)


def _oom_error(cfg: TrainConfig) -> TrainingError:
    height, width = cfg.image_size
    return TrainingError(
        f"out of GPU memory training {cfg.backbone} at batch_size {cfg.batch_size} and image_size "
        f"{height}x{width}: lower batch_size (e.g. {max(1, cfg.batch_size // 2)}) or image_size, or "
        "give each trial a larger share of a GPU (resources.gpu)"
    )


def build_fold(
    cfg: TrainConfig,
    index: int,
    train_rows: np.ndarray,
    train_labels: np.ndarray,
    device: torch.device,
    pretrained_kwargs: dict | None = None,
    val_rows: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    val_positions: np.ndarray | None = None,
) -> FoldState:
    """One fold's model (frozen as configured), loss, AdamW, warmup-cosine schedule and AMP scaler.

    The one place this is assembled, so ``make bench`` measures exactly what ``fit`` trains.
    """
    use_cuda = device.type == "cuda"
    model = build_model(
        cfg.backbone,
        head=cfg.head,
        num_classes=NUM_CLASSES,
        pretrained_kwargs=pretrained_kwargs,
        drop_rate=cfg.drop_rate,
        image_size=tuple(cfg.image_size),
    )
    freeze = freeze_stages(model, cfg.freeze_depth)
    model.to(device)
    if cfg.channels_last and use_cuda:
        model.to(memory_format=torch.channels_last)
    alpha = class_balanced_alpha(train_labels, NUM_CLASSES).to(device) if cfg.class_alpha else None
    criterion = build_loss(
        cfg.loss,
        gamma=cfg.focal_gamma,
        alpha=alpha,
        label_smoothing=cfg.label_smoothing,
        head=cfg.head,
        task_weights=tuple(cfg.task_weights),
    )
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        cosine_with_warmup(int(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch),
    )
    fp16 = use_cuda and cfg.amp and not torch.cuda.is_bf16_supported()
    empty = np.zeros(0, dtype=np.int64)
    return FoldState(
        index=index,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=fp16),
        freeze=freeze,
        train_rows=train_rows,
        train_labels=train_labels,
        val_rows=empty if val_rows is None else val_rows,
        val_labels=empty if val_labels is None else val_labels,
        val_positions=empty if val_positions is None else val_positions,
        criterion=criterion,
    )


def train_loader(
    cache_path: Path,
    rows: np.ndarray,
    labels: np.ndarray,
    augment: dict,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool | None = None,
) -> DataLoader:
    """Augmented training batches from the memory-mapped cache, in a seeded order (or ``sampler``'s).

    Batches are assembled by ``CachedImages.__getitems__`` (one fancy-indexed read + batched
    augmentation), so collation is the identity. ``drop_last`` defaults to dropping a ragged last batch
    unless the images fit in one.
    """
    dataset = CachedImages(cache_path, rows, labels, augment, seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler if sampler is not None else SeededShuffle(len(dataset), seed),
        num_workers=num_workers,
        collate_fn=_identity_collate,
        drop_last=len(dataset) > batch_size if drop_last is None else drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


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
    use_cuda = device.type == "cuda"
    channels_last = cfg.channels_last and use_cuda
    resolved_weights = _resolve_weights(cfg, resolved_weights)
    mean, std = _input_stats(resolved_weights)
    pretrained_kwargs = {}
    if resolved_weights is not None:
        from trainers.weights import timm_kwargs

        pretrained_kwargs = timm_kwargs(resolved_weights)

    data = join_folds(table, folds, cfg.k)
    cache_path = image_cache.prepare_cache(cfg, data, cache_dir, log=log)
    cache = image_cache.open_cache(cache_path)
    all_rows = cache.rows(data["image_path"].tolist())
    labels = data["label"].to_numpy(dtype=np.int64)
    trainable = ~data["age"].isin(list(cfg.drop_ages)).to_numpy()

    write_text_atomic(yaml.safe_dump(cfg.to_dict(), sort_keys=False), run_dir / "config.yaml")
    write_csv_atomic(data[["rel_path", "person_id", "fold"]], run_dir / "folds.csv")

    fold_states: list[FoldState] = []
    for fold in range(cfg.k):
        seed_everything(cfg.seed + fold)
        train_mask = (data["fold"].to_numpy() != fold) & trainable
        val_mask = data["fold"].to_numpy() == fold
        fold_states.append(
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
    freeze = fold_states[0].freeze
    log(
        f"{cfg.backbone}: {freeze.trainable_params:,} of {freeze.total_params:,} parameters trainable "
        f"(freeze_depth {cfg.freeze_depth}); {cfg.k} folds on {device.type}"
    )

    history: list[dict] = []
    best_mean_f1, best_mean_epoch, start_epoch = -1.0, 0, 1
    resume_path = run_dir / "last.pt"
    if resume_path.exists():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        if state["config"] != cfg.to_dict():
            raise TrainingError(f"{run_dir} holds a run of another configuration; use a new run folder")
        for fold_state, saved in zip(fold_states, state["folds"], strict=True):
            fold_state.model.load_state_dict(saved["model"])
            fold_state.optimizer.load_state_dict(saved["optimizer"])
            fold_state.scheduler.load_state_dict(saved["scheduler"])
            fold_state.scaler.load_state_dict(saved["scaler"])
            fold_state.best_f1, fold_state.best_epoch = saved["best_f1"], saved["best_epoch"]
            fold_state.best_probs = saved["best_probs"].numpy() if saved["best_probs"] is not None else None
        history = state["history"]
        best_mean_f1, best_mean_epoch = state["best_mean_f1"], state["best_mean_epoch"]
        start_epoch = state["epoch"] + 1
        log(f"resuming {run_dir.name} after epoch {state['epoch']}")

    status, message, epoch = "completed", f"trained {cfg.epochs} epochs", start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs + 1):
        started = time.perf_counter()
        fold_metrics = []
        for fold_state in fold_states:
            try:
                train_loss = train_one_epoch(
                    fold_state, cfg, cache_path, device, mean, std, channels_last, epoch
                )
                probs = predict_proba(
                    fold_state.model,
                    cfg.head,
                    cache.images,
                    fold_state.val_rows,
                    mean,
                    std,
                    device,
                    batch_size=max(cfg.batch_size, 64),
                    amp=cfg.amp,
                    channels_last=channels_last,
                )
            except torch.OutOfMemoryError:
                raise _oom_error(cfg) from None
            if not math.isfinite(train_loss) or not np.isfinite(probs).all():
                train_loss = train_loss if not math.isfinite(train_loss) else float("nan")
                status = "diverged"
                message = (
                    f"training loss became {train_loss} at epoch {epoch} in fold {fold_state.index}: lower "
                    f"lr (now {cfg.lr:g}) or check the data"
                )
                break
            val_loss = float(
                -np.log(np.clip(probs[np.arange(len(probs)), fold_state.val_labels], 1e-7, 1)).mean()
            )
            scalars = flat_scalars(
                compute_metrics(fold_state.val_labels, probs, loss=val_loss), prefix="val_"
            )
            scalars["train_loss"] = train_loss
            fold_metrics.append(scalars)
            if scalars["val_f1"] > fold_state.best_f1:
                fold_state.best_f1, fold_state.best_epoch, fold_state.best_probs = (
                    scalars["val_f1"],
                    epoch,
                    probs,
                )
                _save_checkpoint(fold_state, cfg, mean, std, epoch, run_dir)
        if status == "diverged":
            break
        mean_metrics = {key: float(np.mean([m[key] for m in fold_metrics])) for key in fold_metrics[0]}
        if mean_metrics["val_f1"] > best_mean_f1:
            best_mean_f1, best_mean_epoch = mean_metrics["val_f1"], epoch
        for fold, values in enumerate(fold_metrics):
            history.append({"epoch": epoch, "fold": str(fold), **values})
        history.append({"epoch": epoch, "fold": "mean", **mean_metrics})
        write_csv_atomic(pd.DataFrame(history), run_dir / "metrics" / "epochs.csv")
        _save_resume_state(resume_path, fold_states, cfg, epoch, history, best_mean_f1, best_mean_epoch)
        report = EpochReport(
            epoch,
            mean_metrics,
            fold_metrics,
            best_mean_f1,
            best_mean_epoch,
            run_dir,
            time.perf_counter() - started,
        )
        per_fold = " ".join(f"{m['val_f1']:.3f}" for m in fold_metrics)
        log(
            f"epoch {epoch}/{cfg.epochs}  val_f1 {mean_metrics['val_f1']:.4f} "
            f"(folds {per_fold})  val_loss {mean_metrics['val_loss']:.3f}"
            f"  train_loss {mean_metrics['train_loss']:.3f}  best {best_mean_f1:.4f}@{best_mean_epoch}"
            f"  {report.epoch_seconds:.1f}s"
        )
        if callback is not None:
            callback(report)
        if cfg.patience and epoch - best_mean_epoch >= cfg.patience and epoch < cfg.epochs:
            status = "early_stopped"
            message = (
                f"no mean val_f1 gain for {cfg.patience} epochs; "
                f"best {best_mean_f1:.4f} at epoch {best_mean_epoch}"
            )
            break

    result = FitResult(
        status=status,
        message=message,
        best_f1=best_mean_f1,
        best_epoch=best_mean_epoch,
        epochs_trained=epoch,
        run_dir=run_dir,
        trainable_params=freeze.trainable_params,
        total_params=freeze.total_params,
    )
    if status != "diverged":
        _write_out_of_fold(fold_states, data, cfg, cache, device, mean, std, channels_last, run_dir, result)
        resume_path.unlink(missing_ok=True)
    _write_result(result, cfg, run_dir)
    log(f"{status}: {message}; OOF macro F1 {result.oof_f1:.4f} (TTA {result.oof_f1_tta:.4f})")
    return result


def train_one_epoch(
    fold: FoldState,
    cfg: TrainConfig,
    cache_path: Path,
    device: torch.device,
    mean,
    std,
    channels_last: bool,
    epoch: int,
) -> float:
    """One pass over the fold's training images; returns the mean loss (nan/inf if it diverged)."""
    seed = cfg.seed * 100_003 + fold.index * 1009 + epoch
    sampler = None
    if cfg.weighted_sampler:
        weights = torch.as_tensor(balanced_sample_weights(fold.train_labels), dtype=torch.double)
        sampler = WeightedRandomSampler(weights, len(weights), generator=torch.Generator().manual_seed(seed))
    loader = train_loader(
        cache_path,
        fold.train_rows,
        fold.train_labels,
        cfg.augment,
        cfg.batch_size,
        seed,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        sampler=sampler,
    )
    model = fold.model
    model.train()
    apply_freeze_train_mode(model, fold.freeze)
    total, count = 0.0, 0
    for images, targets in loader:
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


def _save_checkpoint(fold: FoldState, cfg: TrainConfig, mean, std, epoch: int, run_dir: Path) -> None:
    """The fold's best weights with what is needed to use them: config, class map, input stats."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in fold.model.state_dict().items()},
        "backbone": cfg.backbone,
        "head": cfg.head,
        "num_classes": NUM_CLASSES,
        "class_names": class_names(AgeBands(tuple(cfg.age_edges))),
        "mean": list(mean),
        "std": list(std),
        "image_size": list(cfg.image_size),
        "crop": list(cfg.crop) if cfg.crop else None,
        "fold": fold.index,
        "epoch": epoch,
        "val_f1": float(fold.best_f1),
        "config": cfg.to_dict(),
    }
    atomic_torch_save(payload, run_dir / "checkpoints" / f"fold{fold.index}.pt")


def _save_resume_state(
    path: Path,
    folds: list[FoldState],
    cfg: TrainConfig,
    epoch: int,
    history: list[dict],
    best_mean_f1: float,
    best_mean_epoch: int,
) -> None:
    atomic_torch_save(
        {
            "epoch": epoch,
            "config": cfg.to_dict(),
            "history": history,
            "best_mean_f1": best_mean_f1,
            "best_mean_epoch": best_mean_epoch,
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


def _write_out_of_fold(
    folds: list[FoldState],
    data: pd.DataFrame,
    cfg: TrainConfig,
    cache,
    device,
    mean,
    std,
    channels_last: bool,
    run_dir: Path,
    result: FitResult,
) -> None:
    """Every training image's probabilities from the fold model that never saw it, at its best epoch."""
    probs = np.zeros((len(data), NUM_CLASSES), dtype=np.float32)
    probs_tta = np.zeros_like(probs)
    names = class_names(AgeBands(tuple(cfg.age_edges)))
    per_class = {}
    for fold in folds:
        best = torch.load(
            run_dir / "checkpoints" / f"fold{fold.index}.pt", map_location="cpu", weights_only=True
        )
        fold.model.load_state_dict(best["state_dict"])
        probs[fold.val_positions] = fold.best_probs
        probs_tta[fold.val_positions] = predict_proba(
            fold.model,
            cfg.head,
            cache.images,
            fold.val_rows,
            mean,
            std,
            device,
            batch_size=max(cfg.batch_size, 64),
            tta=cfg.tta,
            amp=cfg.amp,
            channels_last=channels_last,
        )
        metrics = compute_metrics(fold.val_labels, fold.best_probs)
        per_class[f"fold{fold.index}"] = metrics["per_class_f1"]
        write_csv_atomic(
            pd.DataFrame(metrics["confusion"], index=names, columns=names),
            run_dir / "metrics" / f"confusion_fold{fold.index}.csv",
            index=True,
        )
    labels = data["label"].to_numpy()
    oof = compute_metrics(labels, probs)
    oof_tta = compute_metrics(labels, probs_tta)
    result.oof_f1, result.oof_f1_tta = float(oof["f1"]), float(oof_tta["f1"])
    result.extra = {
        "oof": flat_scalars(oof, prefix="oof_"),
        "oof_tta": flat_scalars(oof_tta, prefix="oof_tta_"),
        "fold_best_epochs": [f.best_epoch for f in folds],
        "fold_best_f1": [float(f.best_f1) for f in folds],
    }
    per_class["oof"] = oof["per_class_f1"]
    per_class["oof_tta"] = oof_tta["per_class_f1"]
    write_csv_atomic(
        pd.DataFrame(per_class, index=names), run_dir / "metrics" / "per_class_f1.csv", index=True
    )
    write_csv_atomic(
        pd.DataFrame(oof["confusion"], index=names, columns=names),
        run_dir / "metrics" / "confusion_oof.csv",
        index=True,
    )
    plot_confusion(
        np.asarray(oof["confusion"]),
        names,
        run_dir / "plots" / "confusion.png",
        title=f"{cfg.backbone} out-of-fold confusion (macro F1 {result.oof_f1:.3f})",
    )
    plot_per_class_f1(per_class, names, run_dir / "plots" / "per_class_f1.png")
    buffer = run_dir / "oof.npz"
    tmp = buffer.with_name(".oof.tmp.npz")
    np.savez_compressed(
        tmp,
        rel_path=data["rel_path"].to_numpy(dtype=str),
        label=labels,
        fold=data["fold"].to_numpy(),
        probs=probs,
        probs_tta=probs_tta,
    )
    tmp.replace(buffer)


def _write_result(result: FitResult, cfg: TrainConfig, run_dir: Path) -> None:
    payload = {**asdict(result), "run_dir": str(result.run_dir), "config": cfg.to_dict()}
    write_text_atomic(json.dumps(payload, indent=2, default=float), run_dir / "result.json")
