"""The timm model factory: any timm backbone, a single 18-class head or three task heads, freeze depth.

The head on top of the backbone comes from the head registry (trainers.heads): an 18-class classifier
("single") or three task heads ("multitask"); `trainers.heads.class_log_probs` turns either output into
log-probabilities over the 18 classes.

Freezing is generic: timm models describe their own layer groups through `group_matcher(coarse=True)`
(stem first, then one group per stage; the classifier and other head layers match nothing). We use those
groups instead of a per-family table of module names, so new timm families work without code here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import timm
from timm.models._manipulate import group_with_matcher
from torch import nn

from trainers.heads import HEADS, ModelError, MultiTaskNet
from trainers.labels import NUM_CLASSES

# A parameter name no group pattern can match: timm files unmatched names (the head) into a last group of
# their own, so the group holding this name is the head group, whatever the head's layers are called.
_UNMATCHED_SENTINEL = "\x00foldtune-matches-nothing"


def _check_backbone_name(backbone: str) -> None:
    if ":" in backbone:  # hf-hub:org/name or local-dir:path, resolved by timm itself
        return
    if timm.is_model(backbone):
        return
    arch = backbone.split(".", 1)[0]
    suggestions = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else "; see timm.list_models()"
    raise ModelError(f"unknown timm backbone {backbone!r}{hint}")


def build_model(
    backbone: str,
    head: str = "single",
    num_classes: int = NUM_CLASSES,
    pretrained_kwargs: dict | None = None,
    drop_rate: float = 0.0,
    model_kwargs: dict | None = None,
    image_size: tuple[int, int] | None = None,
) -> nn.Module:
    """Create a timm backbone with the requested head.

    `pretrained_kwargs` (from trainers.weights) go to `timm.create_model` as they are; without them the
    weights are random (pretrained=False), which is what tests and offline runs want. `model_kwargs` are
    further architecture arguments, e.g. `{"img_size": (256, 192)}` for a ViT fed non-224 images.
    `drop_rate` is the dropout before the classifier (for multitask: on the shared features).
    `image_size` (height, width) is what the model will be fed: backbones timm builds for one input size
    (ViT, Swin, EVA, LeViT, ...) are built for it (position embeddings resampled from pretrained weights).
    """
    if head not in HEADS:
        raise ModelError(f"unknown head {head!r}; choose one of {', '.join(HEADS.names())}")
    if head == "multitask" and num_classes != NUM_CLASSES:
        raise ModelError(
            f"the multitask head always predicts {NUM_CLASSES} classes, got num_classes={num_classes}"
        )
    if not 0.0 <= drop_rate < 1.0:
        raise ModelError(f"drop_rate must be in [0, 1), got {drop_rate}")
    _check_backbone_name(backbone)

    kwargs = {"pretrained": False, **(pretrained_kwargs or {}), **(model_kwargs or {})}
    clashes = sorted({"num_classes", "drop_rate"} & kwargs.keys())
    if clashes:
        raise ModelError(
            f"pass {', '.join(clashes)} as build_model arguments, not in pretrained/model kwargs"
        )
    size = tuple(int(v) for v in image_size) if image_size is not None else None
    native = native_input_size(backbone)
    if size is not None and native is not None and size != native and "img_size" not in kwargs:
        kwargs["img_size"] = size
    kwargs["num_classes"] = HEADS.get(head).timm_classes(num_classes)
    kwargs["drop_rate"] = drop_rate
    try:
        model = timm.create_model(backbone, **kwargs)
    except Exception as exc:  # timm raises many kinds (TypeError for a bad kwarg, OSError for weights, ...)
        raise ModelError(
            f"could not build timm model {backbone!r} with {kwargs}: {type(exc).__name__}: {exc}"
        ) from exc
    return HEADS.get(head).wrap(model)


def native_input_size(backbone: str) -> tuple[int, int] | None:
    """(height, width) for a backbone timm marks ``fixed_input_size`` (it only takes that size), else None."""
    if ":" in backbone:
        return None
    try:
        cfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # an unknown tag: no size constraint known
        return None
    if cfg is None or not getattr(cfg, "fixed_input_size", False):
        return None
    return int(cfg.input_size[1]), int(cfg.input_size[2])


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm model inside (itself for the single head), e.g. for `timm.data.resolve_data_config`."""
    return model.backbone if isinstance(model, MultiTaskNet) else model


@dataclass(frozen=True)
class FreezeReport:
    """What `freeze_stages` did. Parameter counts are numbers of scalar weights (numel), not tensors.

    `frozen_modules` are the outermost modules whose parameters are all frozen; `apply_freeze_train_mode`
    keeps them in eval mode so their BatchNorm statistics and dropout / drop-path stay fixed too.
    """

    depth: int
    max_depth: int
    frozen_params: int
    trainable_params: int
    total_params: int
    frozen_modules: tuple[str, ...] = ()

    def __str__(self) -> str:
        return (
            f"freeze depth {self.depth}/{self.max_depth}: {self.frozen_params:,} of {self.total_params:,} "
            f"parameters frozen, {self.trainable_params:,} trainable"
        )


def stage_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per layer group of the backbone: [stem, stage 1, ..., stage K], head layers excluded.

    Names are as in `model.named_parameters()` (prefixed `backbone.` for a MultiTaskNet).
    """
    target, prefix = _freeze_target(model)
    matcher_fn = getattr(target, "group_matcher", None)
    if matcher_fn is None:
        raise ModelError(
            f"{type(target).__name__} does not describe its stages (no timm group_matcher); "
            "use freeze depth 0"
        )
    try:
        matcher = matcher_fn(coarse=True)
    except NotImplementedError as exc:
        raise ModelError(f"{type(target).__name__} does not describe its stages; use freeze depth 0") from exc
    names = [name for name, _ in target.named_parameters()] + [_UNMATCHED_SENTINEL]
    grouped = group_with_matcher(((name, name) for name in names), matcher)
    groups = [grouped[group_id] for group_id in sorted(grouped)]
    return [[prefix + name for name in group] for group in groups if _UNMATCHED_SENTINEL not in group]


def count_stages(model: nn.Module) -> int:
    """How many stages can be frozen after the stem (the largest valid freeze depth)."""
    return max(len(stage_groups(model)) - 1, 0)


def _freeze_target(model: nn.Module) -> tuple[nn.Module, str]:
    if isinstance(model, MultiTaskNet):
        return model.backbone, "backbone."
    return model, ""


def freeze_stages(model: nn.Module, depth: int) -> FreezeReport:
    """Freeze the stem and the first `depth` stages (depth 0: train everything); every other parameter trains.

    Idempotent: parameters outside the frozen groups get requires_grad=True again, so calling it twice with
    different depths behaves like calling it once with the last. Call `apply_freeze_train_mode` instead of
    `model.train()` so frozen BatchNorm layers keep their running statistics.
    """
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
        raise ModelError(f"freeze depth must be a non-negative integer, got {depth!r}")
    depth = int(depth)
    if depth == 0:
        try:
            max_depth = count_stages(model)
        except ModelError:
            max_depth = 0  # a model without stage information can still train unfrozen
        frozen_names: set[str] = set()
    else:
        groups = stage_groups(model)
        max_depth = max(len(groups) - 1, 0)
        if depth > max_depth:
            raise ModelError(
                f"freeze depth {depth} is larger than the {max_depth} stages of "
                f"{type(backbone_of(model)).__name__}; use 0..{max_depth}"
            )
        frozen_names = {name for group in groups[: depth + 1] for name in group}

    params = list(model.named_parameters())
    frozen = sum(param.numel() for name, param in params if name in frozen_names)
    trainable = sum(param.numel() for name, param in params if name not in frozen_names)
    if trainable == 0:  # checked before touching requires_grad, so a refused depth leaves the model as it was
        raise ModelError(f"freeze depth {depth} leaves no trainable parameter; use at most {max_depth - 1}")
    for name, param in params:
        param.requires_grad_(name not in frozen_names)
    return FreezeReport(
        depth=depth,
        max_depth=max_depth,
        frozen_params=frozen,
        trainable_params=trainable,
        total_params=frozen + trainable,
        frozen_modules=_outermost_frozen_modules(model),
    )


def _outermost_frozen_modules(model: nn.Module) -> tuple[str, ...]:
    """Modules that own parameters, all frozen, and whose parent is not such a module."""
    outermost: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") or parent == "" for parent in outermost):
            continue
        params = list(module.parameters())
        if params and not any(param.requires_grad for param in params):
            outermost.append(name)
    return tuple(outermost)


def apply_freeze_train_mode(model: nn.Module, report: FreezeReport) -> nn.Module:
    """`model.train()`, then eval mode for the frozen modules (BatchNorm statistics, dropout, drop-path).

    The trainer calls this wherever it would call `model.train()`; `model.eval()` for validation is unchanged.
    """
    model.train()
    for name in report.frozen_modules:
        model.get_submodule(name).eval()
    return model
