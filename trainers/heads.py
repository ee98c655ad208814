"""The head registry: what sits on the backbone, how its output becomes 18-class log-probabilities, and
which loss trains it. One entry per head, so a new head is one registration here.

- "single": the timm model itself with an 18-class classifier; `model(x)` returns logits (N, 18).
- "multitask": `MultiTaskNet`, the timm backbone as a feature extractor (`num_classes=0`) plus three linear
  heads; `model(x)` returns a dict of logits {"mask": (N, 3), "gender": (N, 2), "age": (N, 3)}.

`class_log_probs(output, head)` turns either output into log-probabilities over the 18 classes, so
metrics, OOF files, TTA and the ensemble never care which head produced them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.errors import FoldtuneError
from trainers.labels import NUM_AGE, NUM_CLASSES, NUM_GENDER, NUM_MASK, decode
from trainers.losses import LOSSES, multitask_loss, single_head_loss
from trainers.registry import Registry


class ModelError(FoldtuneError, ValueError):
    """A model cannot be built, frozen or read as configured; the message says what to change."""


TASK_SIZES = {"mask": NUM_MASK, "gender": NUM_GENDER, "age": NUM_AGE}


class MultiTaskNet(nn.Module):
    """A timm backbone (pooled features) with three linear heads: mask (3), gender (2) and age band (3).

    `forward(x)` returns a dict {"mask": (N, 3), "gender": (N, 2), "age": (N, 3)} of raw logits. Predicting
    the three factors separately shares data across the 18 classes (an old woman without a mask teaches the
    age head about old women with masks too). Combine them with `class_log_probs(output, "multitask")`.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        # head_hidden_size is the width of what forward() returns when it differs from num_features (e.g.
        # MobileNetV3's conv_head after pooling); older timm models only define num_features
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.heads = nn.ModuleDict({task: nn.Linear(width, size) for task, size in TASK_SIZES.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        return {task: head(features) for task, head in self.heads.items()}


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict with keys {sorted(value)}"
    return type(value).__name__


def _single_log_probs(model_output) -> Tensor:
    if not isinstance(model_output, Tensor) or model_output.ndim != 2 or model_output.shape[1] != NUM_CLASSES:
        raise ModelError(
            f"single head output must be a (N, {NUM_CLASSES}) tensor, got {_describe(model_output)}"
        )
    return F.log_softmax(model_output.float(), dim=1)


@functools.lru_cache(maxsize=8)
def _task_index_of_class(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """For every class 0..17, its mask, gender and age-band index (trainers.labels order) on `device`."""
    return tuple(
        torch.as_tensor(part, dtype=torch.long, device=device) for part in decode(np.arange(NUM_CLASSES))
    )


def _multitask_log_probs(model_output) -> Tensor:
    """log p(class) = log p(mask) + log p(gender) + log p(age band): the three factors are treated as
    independent given the image; the result still sums to 1 over the 18 classes."""
    if not isinstance(model_output, Mapping) or set(model_output) != set(TASK_SIZES):
        raise ModelError(
            f"multitask output must be a dict with keys {tuple(TASK_SIZES)}, got {_describe(model_output)}"
        )
    mask_lp, gender_lp, age_lp = (F.log_softmax(model_output[task].float(), dim=1) for task in TASK_SIZES)
    mask_of, gender_of, age_of = _task_index_of_class(mask_lp.device)
    return mask_lp[:, mask_of] + gender_lp[:, gender_of] + age_lp[:, age_of]


@dataclass(frozen=True)
class Head:
    """One head: the classes timm builds its classifier with, what wraps the timm model, how the output
    becomes log-probabilities, and the loss (focusing gamma, alpha, label smoothing, task weights)."""

    timm_classes: Callable[[int], int]
    wrap: Callable[[nn.Module], nn.Module]
    log_probs: Callable[[object], Tensor]
    loss: Callable[..., nn.Module]


HEADS: Registry[Head] = Registry("head")
HEADS.register("single", Head(lambda n: n, lambda model: model, _single_log_probs, single_head_loss))
HEADS.register("multitask", Head(lambda n: 0, MultiTaskNet, _multitask_log_probs, multitask_loss))


def class_log_probs(model_output: Tensor | Mapping[str, Tensor], head: str) -> Tensor:
    """Log-probabilities (N, 18), float32, from the raw output of either head."""
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; choose one of {', '.join(HEADS.names())}")
    return HEADS.get(head).log_probs(model_output)


def build_loss(
    name: str,
    gamma: float = 2.0,
    alpha: Tensor | Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    head: str = "single",
    task_weights: Sequence[float] = (1.0, 1.0, 1.0),
) -> nn.Module:
    """The loss for a config: the loss registry says which gamma ("ce" is focal with gamma 0), the head
    registry which loss module (one 18-way focal loss, or three task focal losses)."""
    focusing = LOSSES.get(name)(gamma)
    return HEADS.get(head).loss(focusing, alpha, label_smoothing, task_weights)
