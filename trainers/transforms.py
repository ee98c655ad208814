"""Augmentation pipelines: albumentations for training, tensor ops for normalisation and TTA.

Images arrive from the decode-once cache already cropped and resized, as uint8 HWC arrays. The training
pipeline (albumentations, per image, on the CPU) keeps them uint8; normalisation happens on the batch
on the device, so the host moves 4x fewer bytes. Validation is normalisation only. TTA views are batched
tensor ops, so they run on the GPU beside the model.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainers.registry import Registry  # noqa: E402

# The augmentation registry: config name -> builder(probability) of one albumentations step. The training
# pipeline applies them in this order (registration order), each with its configured probability.
AUGMENTATIONS: Registry[Callable[[float], A.BasicTransform]] = Registry("augmentation")
AUGMENTATIONS.register("hflip", lambda p: A.HorizontalFlip(p=p))
AUGMENTATIONS.register(
    "shift_scale_rotate",
    lambda p: A.Affine(
        scale=(0.92, 1.08), translate_percent=(-0.05, 0.05), rotate=(-8, 8), border_mode=0, p=p
    ),
)
AUGMENTATIONS.register(
    "color_jitter", lambda p: A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=p)
)
AUGMENTATIONS.register(
    "coarse_dropout",
    lambda p: A.CoarseDropout(
        num_holes_range=(1, 4), hole_height_range=(0.05, 0.15), hole_width_range=(0.05, 0.15), p=p
    ),
)


def train_pipeline(augment: dict[str, float], seed: int | None = None) -> A.Compose:
    """Training augmentation from the config's ``augment`` mapping of name -> probability."""
    AUGMENTATIONS.check(augment)
    steps = [build(augment[name]) for name, build in AUGMENTATIONS.items() if augment.get(name, 0) > 0]
    return A.Compose(steps, seed=seed)


def normalize_batch(
    batch: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], channels_last: bool = False
) -> torch.Tensor:
    """uint8 NHWC -> float NCHW normalised with the backbone's mean/std (on whatever device batch is on)."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t, std_t = _stats_on(x.device, tuple(mean), tuple(std))
    x = (x - mean_t) / std_t
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


@functools.lru_cache(maxsize=16)
def _stats_on(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]):
    """The normalisation constants on ``device``, made once (not a host-to-device copy every batch)."""
    as_tensor = functools.partial(torch.tensor, device=device, dtype=torch.float32)
    return as_tensor(mean).view(1, -1, 1, 1), as_tensor(std).view(1, -1, 1, 1)


def _zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Centre zoom by ``factor`` (>1 zooms in), same output size."""
    return _warp_border(x, ((1 / factor, 0.0, 0.0), (0.0, 1 / factor, 0.0)))


def _shift(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Translate by fractions of the image size, border pixels repeated."""
    return _warp_border(x, ((1.0, 0.0, -2 * dx), (0.0, 1.0, -2 * dy)))


def _warp_border(x: torch.Tensor, matrix: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    """Bilinear warp of an NCHW batch by one ``affine_grid`` matrix, border pixels repeated."""
    theta = _theta_on(x.device, x.dtype, matrix)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@functools.lru_cache(maxsize=32)
def _theta_on(
    device: torch.device, dtype: torch.dtype, matrix: tuple[tuple[float, ...], ...]
) -> torch.Tensor:
    """A TTA view's matrix on ``device``, made once (not a host-to-device copy every batch)."""
    return torch.tensor(matrix, device=device, dtype=dtype)


# The TTA view registry: name -> the view of a normalised NCHW batch. Views are averaged in probability
# space with the original, so their order does not matter.
TTA_VIEWS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("TTA view")
TTA_VIEWS.register("hflip", lambda x: torch.flip(x, dims=[3]))
TTA_VIEWS.register("scale", lambda x: _zoom(x, 1.1))  # 1.1x centre zoom
TTA_VIEWS.register("shift", lambda x: _shift(x, 0.04, 0.04))  # 4% right and down


def tta_views(x: torch.Tensor, views: tuple[str, ...] | list[str]) -> list[torch.Tensor]:
    """The original batch plus one batch per TTA view."""
    return [x, *(TTA_VIEWS.get(view)(x) for view in views)]


def augment_batch(pipeline: A.Compose, images: np.ndarray) -> np.ndarray:
    """Apply the training pipeline to each uint8 HWC image of a batch."""
    return np.stack([pipeline(image=np.ascontiguousarray(img))["image"] for img in images])
