"""Losses for both heads, called the same way: `loss_fn(model(x), target)` with the 18-class target.

- `FocalLoss` takes LOGITS (N, C) of the single head and integer targets (N,). Per sample it is
  `-sum_c q_c * alpha_c * (1 - p_c)**gamma * log p_c` with q the label-smoothed target
  (`(1 - ls) * onehot + ls / C`). With gamma=0 this is exactly `F.cross_entropy(logits, target,
  weight=alpha, label_smoothing=ls)`, including the "mean" reduction dividing by the summed alpha of the
  targets, so "ce" and "focal" differ only by gamma.
- `MultiTaskLoss` takes the multitask output dict (`mask`, `gender`, `age` logits, see
  trainers.heads.MultiTaskNet), decodes the 18-class target with trainers.labels.decode and sums the three
  focal losses with task weights. Its `alpha` is an 18-class weight used per SAMPLE (the weight of the
  sample's full class), so `class_balanced_alpha` serves both heads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.labels import NUM_CLASSES, decode
from trainers.registry import Registry

# The loss registry: name -> the focusing gamma it trains with, given the config's focal_gamma. Cross-entropy
# is the focal loss with gamma 0 exactly (see FocalLoss), so the two differ only there.
LOSSES: Registry[Callable[[float], float]] = Registry("loss")
LOSSES.register("focal", lambda gamma: float(gamma))
LOSSES.register("ce", lambda gamma: 0.0)
TASKS = ("mask", "gender", "age")


def _as_weight(alpha, num_classes: int | None, what: str) -> Tensor | None:
    """Validated float32 copy of class weights (None stays None); num_classes=None skips the length check."""
    if alpha is None:
        return None
    weight = torch.as_tensor(alpha, dtype=torch.float32).detach().clone()
    if weight.ndim != 1 or (num_classes is not None and weight.shape[0] != num_classes):
        expected = "a 1-D tensor" if num_classes is None else f"{num_classes} values"
        raise ValueError(f"{what} must be {expected} of class weights, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all() or (weight < 0).any():
        raise ValueError(f"{what} must be finite and non-negative, got {weight.tolist()}")
    return weight


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def focal_terms(
    logits: Tensor,
    target: Tensor,
    gamma: float,
    class_weight: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Unreduced focal loss per sample (N,), computed in float32 for stability under autocast."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    num_classes = log_probs.shape[1]
    smoothed = torch.full_like(log_probs, label_smoothing / num_classes)
    smoothed.scatter_add_(
        1, target.long().unsqueeze(1), torch.full_like(log_probs[:, :1], 1.0 - label_smoothing)
    )
    per_class = -smoothed * log_probs
    if gamma != 0:
        # 1 - p via expm1 keeps precision for confident predictions; the clamp keeps the gradient finite
        one_minus_p = (-torch.expm1(log_probs)).clamp(min=1e-12)
        per_class = per_class * one_minus_p.pow(gamma)
    if class_weight is not None:  # on the logits' device already (a loss module's buffer)
        per_class = per_class * class_weight
    return per_class.sum(dim=1)


def _check_focal_arguments(gamma: float, label_smoothing: float) -> None:
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _reduce(per_sample: Tensor, reduction: str, normaliser: Tensor | None) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if normaliser is None:
        return per_sample.mean()
    return per_sample.sum() / normaliser.sum()


class FocalLoss(nn.Module):
    """Focal loss on logits (Lin et al. 2017) with class weights `alpha` and label smoothing.

    gamma > 0 shrinks the loss of examples the model already gets right with confidence, so training effort
    goes to the hard, rare classes (old age bands, incorrect masks). See the module docstring for the formula.
    """

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_focal_arguments(gamma, label_smoothing)
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.reduction = _check_reduction(reduction)
        # a buffer follows .to(device); not persistent: a loss has no state worth checkpointing
        self.register_buffer("alpha", _as_weight(alpha, None, "alpha"), persistent=False)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"FocalLoss expects logits (N, C) and target (N,), got {tuple(logits.shape)} and "
                f"{tuple(target.shape)}"
            )
        weight = self.alpha
        if weight is not None and weight.shape[0] != logits.shape[1]:
            raise ValueError(
                f"alpha has {weight.shape[0]} class weights but the logits have {logits.shape[1]} classes"
            )
        per_sample = focal_terms(logits, target, self.gamma, weight, self.label_smoothing)
        normaliser = None if weight is None else weight[target.long()]
        return _reduce(per_sample, self.reduction, normaliser)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, label_smoothing={self.label_smoothing}, alpha={self.alpha is not None}"


class MultiTaskLoss(nn.Module):
    """Weighted sum of the mask, gender and age focal losses for `MultiTaskNet` outputs.

    `forward(outputs, target)` takes the dict of three logits and the 18-class target (N,). Returns the
    reduced total; `last_task_losses` keeps the three detached task-loss tensors of the last call for logging
    (tensors, not floats, so training does not wait on the GPU every step).
    """

    def __init__(
        self,
        gamma: float = 2.0,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        alpha: Tensor | Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        _check_focal_arguments(gamma, label_smoothing)
        if len(weights) != len(TASKS) or any(w < 0 for w in weights):
            raise ValueError(
                f"task weights must be three non-negative numbers (mask, gender, age), got {weights}"
            )
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.task_weights = tuple(float(w) for w in weights)
        self.reduction = _check_reduction(reduction)
        self.register_buffer(
            "alpha", _as_weight(alpha, NUM_CLASSES, "alpha (18 class weights)"), persistent=False
        )
        mask, gender, age = decode(np.arange(NUM_CLASSES))
        # class -> task label lookup, so targets are decoded on the device without leaving torch
        self.register_buffer(
            "task_of_class",
            torch.as_tensor(np.stack([mask, gender, age]), dtype=torch.long),
            persistent=False,
        )
        self.last_task_losses: dict[str, Tensor] = {}

    def forward(self, outputs: Mapping[str, Tensor], target: Tensor) -> Tensor:
        if not isinstance(outputs, Mapping) or set(outputs) != set(TASKS):
            raise ValueError(f"MultiTaskLoss expects a dict with keys {TASKS}, got {type(outputs).__name__}")
        target = target.long()
        # the buffers are on the targets' device: the trainer moves the loss module there once
        task_targets = self.task_of_class[:, target]
        sample_weight = None if self.alpha is None else self.alpha[target]
        total = None
        self.last_task_losses = {}
        for index, (task, task_weight) in enumerate(zip(TASKS, self.task_weights, strict=True)):
            per_sample = focal_terms(
                outputs[task], task_targets[index], self.gamma, None, self.label_smoothing
            )
            if sample_weight is not None:
                per_sample = per_sample * sample_weight
            task_loss = _reduce(per_sample, self.reduction, sample_weight)
            self.last_task_losses[task] = task_loss.detach()
            total = task_weight * task_loss if total is None else total + task_weight * task_loss
        return total

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, weights={self.task_weights}, label_smoothing={self.label_smoothing}, "
            f"alpha={self.alpha is not None}"
        )


def single_head_loss(gamma: float, alpha, label_smoothing: float, task_weights=None) -> FocalLoss:
    """The 18-way focal loss of the single head (``task_weights`` do not apply)."""
    return FocalLoss(gamma, _as_weight(alpha, NUM_CLASSES, "alpha (18 class weights)"), label_smoothing)


def multitask_loss(gamma: float, alpha, label_smoothing: float, task_weights) -> MultiTaskLoss:
    """The weighted mask + gender + age focal losses of the multitask head."""
    return MultiTaskLoss(gamma, task_weights, alpha, label_smoothing)


def _class_counts(labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array of class indices, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"label {labels[bad][0]} at row {np.argmax(bad)} is outside 0..{num_classes - 1}")
    return labels, np.bincount(labels, minlength=num_classes)


def class_balanced_alpha(labels, num_classes: int = NUM_CLASSES) -> Tensor:
    """Inverse-frequency class weights (float32, shape (num_classes,)) for `alpha`.

    Normalised so the classes that occur have mean weight 1 (the loss scale, hence a tuned learning rate,
    stays comparable with and without alpha). A class absent from `labels` gets weight 0: it has no
    training sample to up-weight, and a huge weight would only amplify its label-smoothing term.
    """
    _, counts = _class_counts(labels, num_classes)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    weights[present] = 1.0 / counts[present]
    weights[present] /= weights[present].mean()
    return torch.as_tensor(weights, dtype=torch.float32)


def balanced_sample_weights(labels, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Per-sample weights (float64, mean 1) for a WeightedRandomSampler: every class drawn equally often."""
    labels, counts = _class_counts(labels, num_classes)
    per_sample = 1.0 / counts[labels]
    return per_sample / per_sample.mean()
