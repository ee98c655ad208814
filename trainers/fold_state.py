"""One fold's training state: model (frozen as configured), loss, AdamW, warmup-cosine schedule, AMP scaler.

``fit`` keeps k of these and steps them in lockstep; ``build_fold`` is the one place one is assembled, so
``make bench`` measures exactly what ``fit`` trains.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.config import TrainConfig
from trainers.device import amp_dtype
from trainers.heads import build_loss
from trainers.labels import NUM_CLASSES
from trainers.losses import class_balanced_alpha
from trainers.models import build_model, freeze_stages
from trainers.predict import predict_proba


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
    train_model: torch.nn.Module | None = None  # what the training step calls: ``torch.compile(model)``

    def forward_for_training(self) -> torch.nn.Module:
        """The module the training step runs: the compiled model with ``compile: true``, else the model (both
        share the weights; checkpoints and predictions always use the plain ``model``)."""
        return self.model if self.train_model is None else self.train_model


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
    model: torch.nn.Module | None = None,
    epochs: float | None = None,
) -> FoldState:
    """One fold's model (frozen as configured), loss, AdamW, warmup-cosine schedule and AMP scaler.

    The one place this is assembled, so ``make bench`` measures exactly what ``fit`` trains. ``model``
    replaces the configured timm model (the bench's null model for the pipeline ceiling); all else is
    built the same way. ``epochs`` (default ``cfg.epochs``) is how long the schedule runs; a fraction
    (a planned search's final model: what the budget holds) ends it within the last epoch.
    """
    use_cuda = device.type == "cuda"
    if model is None:
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
    alpha = class_balanced_alpha(train_labels, NUM_CLASSES) if cfg.class_alpha else None
    criterion = build_loss(
        cfg.loss,
        gamma=cfg.focal_gamma,
        alpha=alpha,
        label_smoothing=cfg.label_smoothing,
        head=cfg.head,
        task_weights=tuple(cfg.task_weights),
    ).to(device)  # its class weights and lookup tables live where the batches are: no copy per step
    optimizer = make_optimizer(model, cfg, device)
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        cosine_with_warmup(
            int(cfg.warmup_epochs * steps_per_epoch), round((epochs or cfg.epochs) * steps_per_epoch)
        ),
    )
    fp16 = amp_dtype(device, cfg.amp) == torch.float16
    empty = np.zeros(0, dtype=np.int64)
    return FoldState(
        index=index,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=fp16),
        freeze=freeze,
        train_rows=train_rows,
        train_labels=train_labels,
        val_rows=empty if val_rows is None else val_rows,
        val_labels=empty if val_labels is None else val_labels,
        val_positions=empty if val_positions is None else val_positions,
        criterion=criterion,
        train_model=torch.compile(model) if cfg.compile else None,
    )


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; on CUDA the fused kernel when ``fused_adamw`` (one kernel for
    every parameter, and with fp16 loss scaling ``GradScaler.step`` hands it the overflow flag on the GPU
    instead of reading it back to the host every step)."""
    fused = {"fused": True} if cfg.fused_adamw and device.type == "cuda" else {}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, **fused)


def predict_validation(
    fold: FoldState, cfg: TrainConfig, images: np.ndarray, device: torch.device, mean, std, tta=()
) -> np.ndarray:
    """The fold model's probabilities for its validation images (``images`` is the run's image cache),
    scored the way every validation and out-of-fold prediction of a run is."""
    return predict_proba(
        fold.model,
        cfg.head,
        images,
        fold.val_rows,
        mean,
        std,
        device,
        batch_size=max(cfg.batch_size, 64),
        tta=tta,
        amp=cfg.amp,
        channels_last=cfg.channels_last and device.type == "cuda",
    )


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What of a model's state training can change: everything but its frozen parameters, which stay as
    built (a resume state needs no copy of them, and they are most of a frozen backbone)."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    return {name: value for name, value in model.state_dict().items() if name not in frozen}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load a ``trainable_state``; anything missing must be a frozen parameter of the model as built."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    wrong = sorted(set(missing) - frozen) + sorted(unexpected)
    if wrong:
        raise RuntimeError(
            f"{source} does not fit this model ({', '.join(wrong[:5])}); start a new run folder"
        )
