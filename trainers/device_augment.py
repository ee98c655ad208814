"""Training augmentation as batched tensor ops on the device: the same steps as the albumentations pipeline.

Why: the loader path (``trainers.transforms.train_pipeline``) augments one image at a time with
albumentations on the CPU, in the loader workers. On a fast GPU that per-image CPU work can starve the
GPU. With ``DeviceAugment`` the loader only slices uint8 batches out of the memory-mapped cache and the
batch is augmented where it already is (the GPU in production, the CPU in tests), before the unchanged
``trainers.transforms.normalize_batch``::

    augment = DeviceAugment(cfg.augment, seed=seed)        # once
    augment.reseed(seed_for(fold, epoch))                  # per epoch, for reproducible runs
    x = normalize_batch(augment(images_uint8_nhwc), mean, std)

``DEVICE_AUGMENTATIONS`` has exactly the names of ``trainers.transforms.AUGMENTATIONS``, in the same
(registration = application) order, so one config ``augment`` mapping is valid for both placements.
Each step is decided per sample: every image gets it with probability p and draws its own parameters,
from the same ranges as the albumentations step:

* ``hflip`` - horizontal flip. Identical to ``A.HorizontalFlip``.
* ``shift_scale_rotate`` - ``A.Affine(scale=(0.92, 1.08), translate_percent=(-0.05, 0.05),
  rotate=(-8, 8), border_mode=0)``: x and y scale drawn independently (albumentations' default
  ``keep_ratio=False``), rotation about the image centre, translation truncated to whole pixels
  (``int(fraction * size)``, as albumentations does), bilinear sampling, zero (black) outside the image.
  Same matrix as albumentations (centre ``(w/2 - 0.5, h/2 - 0.5)``); differs in interpolation details:
  ``grid_sample`` in float32 versus OpenCV's fixed-point ``warpAffine`` (for the same parameters the
  two agree to within one grey level; the test checks this against albumentations' own matrix).
* ``color_jitter`` - ``A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)``: factors
  uniform in [0.8, 1.2], hue shift uniform in [-0.02, 0.02] of a full turn, the four adjustments applied
  in a random order per image, as albumentations does. Same definitions (torchvision's): brightness
  scales the pixels; contrast blends with the mean of the image's grey level; saturation blends with
  the per-pixel grey level (ITU-R 601 weights, OpenCV's ``RGB2GRAY``); hue rotates the HSV hue; each
  adjustment clips to [0, 255]. Differs: the whole step runs in float and is rounded once at the end,
  where albumentations works in uint8 (lookup tables that truncate after brightness and contrast, and
  OpenCV's 8-bit HSV whose hue has 2-degree steps, truncated); so the device result is not darker by
  the ~0.5 grey level truncation costs, and its hue shift is continuous in [-7.2, 7.2] degrees where
  albumentations' is in 2-degree steps from -8 to 6 (about 1 degree low on average). The random order
  costs compute: each of the four positions evaluates the fused brightness/contrast/saturation update
  and the hue rotation for the whole batch and keeps the one each image drew (elementwise work, small
  beside a forward pass on the GPU, but the slowest step on a CPU).
* ``coarse_dropout`` - ``A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.15),
  hole_width_range=(0.05, 0.15))``: 1-4 holes, each ``int(u * size)`` pixels high and wide with u
  uniform in [0.05, 0.15], at a uniformly drawn position fully inside the image, filled with 0.
  Same sampling as albumentations.

Randomness comes from a ``torch.Generator`` on the batch's device, seeded with the given seed, so the
same seed and the same input give the same output on the same device (the CPU and CUDA generators give
different streams, and neither matches albumentations' numpy stream: the two placements agree in
distribution, not pixel for pixel - ``tests/test_device_augment.py`` compares the distributions).
The steps run in float32 NCHW internally; the batch is converted once on the way in and rounded to
uint8 once on the way out (albumentations rounds after every step). With no step enabled (every p
== 0) the input tensor itself is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainers.registry import Registry

# A step: (float32 NCHW batch with values in [0, 255], probability, generator on the batch's device)
# -> the augmented batch, same shape, values in [0, 255] (not yet rounded).
Step = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]

# ITU-R 601 luma weights, as OpenCV's COLOR_RGB2GRAY (which albumentations' ColorJitter uses).
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` draws uniform in [low, high), float32 on ``device``."""
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def _chosen(n: int, p: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per sample: does this image get the step (probability ``p``)?"""
    return torch.rand(n, generator=gen, device=device) < p


def _per_sample(mask: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1), to broadcast over an NCHW batch."""
    return mask.view(-1, 1, 1, 1)


@dataclass(frozen=True)
class HorizontalFlip:
    """``A.HorizontalFlip``: mirror left-right."""

    def __call__(self, x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        flip = _chosen(x.shape[0], p, gen, x.device)
        return torch.where(_per_sample(flip), x.flip(3), x)


def affine_theta(
    height: int,
    width: int,
    scale_x: torch.Tensor,
    scale_y: torch.Tensor,
    angle_deg: torch.Tensor,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor,
) -> torch.Tensor:
    """The (N, 2, 3) ``affine_grid`` matrices of albumentations' Affine with these per-sample parameters.

    Albumentations maps a source pixel ``s`` to ``t + R S (s - c) + c`` (``c`` the centre
    ``(w/2 - 0.5, h/2 - 0.5)``, ``S = diag(scale_x, scale_y)``, ``R = [[cos, sin], [-sin, cos]]``, ``t``
    the shift in pixels) and OpenCV samples the inverse map. ``affine_grid`` wants that inverse in
    normalised coordinates (``align_corners=False``: pixel ``x`` is ``(x - c_x) / (w / 2)``).
    """
    a = torch.deg2rad(angle_deg)
    cos, sin = torch.cos(a), torch.sin(a)
    # (R S)^-1 = S^-1 R^T, then conjugated with D = diag(w/2, h/2) into normalised coordinates.
    m00 = cos / scale_x
    m01 = -sin / scale_x * (height / width)
    m10 = sin / scale_y * (width / height)
    m11 = cos / scale_y
    tx = shift_x * (2.0 / width)
    ty = shift_y * (2.0 / height)
    row0 = torch.stack([m00, m01, -(m00 * tx + m01 * ty)], dim=1)
    row1 = torch.stack([m10, m11, -(m10 * tx + m11 * ty)], dim=1)
    return torch.stack([row0, row1], dim=1)


def warp_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Bilinear warp of an NCHW float batch by ``affine_grid`` matrices, zero (black) outside the image."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Affine:
    """``A.Affine(scale, translate_percent, rotate, border_mode=0)``: scale, rotate, shift; black border."""

    scale: tuple[float, float] = (0.92, 1.08)
    translate: tuple[float, float] = (-0.05, 0.05)
    rotate: tuple[float, float] = (-8.0, 8.0)

    def __call__(self, x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        chosen = _chosen(n, p, gen, dev)
        scale_x = _uniform(n, *self.scale, gen, dev)
        scale_y = _uniform(n, *self.scale, gen, dev)
        angle = _uniform(n, *self.rotate, gen, dev)
        # albumentations: int(fraction * size) pixels, truncated toward zero.
        shift_x = torch.trunc(_uniform(n, *self.translate, gen, dev) * w)
        shift_y = torch.trunc(_uniform(n, *self.translate, gen, dev) * h)
        theta = affine_theta(h, w, scale_x, scale_y, angle, shift_x, shift_y)
        return torch.where(_per_sample(chosen), warp_affine(x, theta), x)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) grey level."""
    r, g, b = _GRAY_WEIGHTS
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def shift_hue(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each image of an NCHW float batch by ``turns`` (N,) of a full turn.

    Value (max channel) and chroma (max - min) stay as they are; grey pixels are unchanged.
    """
    maxc, argmax = x.max(dim=1)
    minc = x.amin(dim=1)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.unbind(dim=1)
    # Hue in sixths of a turn, [0, 6): the standard piecewise definition, by which channel is the max.
    hue = torch.where(
        argmax == 0,
        (g - b) / safe,
        torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    hue = torch.remainder(hue + 6.0 * turns.view(-1, 1, 1), 6.0)
    # HSV -> RGB: channel n (R 5, G 3, B 1) is V - C * clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6.
    # (the offsets are Python numbers: a tensor of them would be a host-to-device copy on every call)
    k = torch.stack([torch.remainder(hue + offset, 6.0) for offset in (5.0, 3.0, 1.0)], dim=1)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


@dataclass(frozen=True)
class ColorJitter:
    """``A.ColorJitter(brightness, contrast, saturation, hue)``, the four in a random order per image."""

    brightness: tuple[float, float] = (0.8, 1.2)
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: tuple[float, float] = (-0.02, 0.02)

    def __call__(self, x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        n = x.shape[0]
        dev = x.device
        chosen = _chosen(n, p, gen, dev)
        bright = _uniform(n, *self.brightness, gen, dev)
        contrast = _uniform(n, *self.contrast, gen, dev)
        saturation = _uniform(n, *self.saturation, gen, dev)
        hue = _uniform(n, *self.hue, gen, dev)
        # A random permutation of (brightness, contrast, saturation, hue) per image.
        order = torch.rand(n, 4, generator=gen, device=dev).argsort(dim=1)
        one, zero = torch.ones_like(bright), torch.zeros_like(bright)
        y = x
        for position in range(4):
            op = order[:, position]
            # Brightness (0), contrast (1) and saturation (2) are all y*f + (1 - f)*grey, with the grey
            # being 0, the image's mean grey level or the pixel's grey level: one fused update per position.
            factor = torch.where(
                op == 0, bright, torch.where(op == 1, contrast, torch.where(op == 2, saturation, one))
            )
            w_mean = torch.where(op == 1, 1.0 - contrast, zero)
            w_pixel = torch.where(op == 2, 1.0 - saturation, zero)
            gray = _gray(y)
            mean_gray = gray.mean(dim=(1, 2, 3), keepdim=True)
            y = (
                y * _per_sample(factor) + _per_sample(w_mean) * mean_gray + _per_sample(w_pixel) * gray
            ).clamp(0.0, 255.0)
            y = torch.where(_per_sample(op == 3), shift_hue(y, hue), y)
        return torch.where(_per_sample(chosen), y, x)


@dataclass(frozen=True)
class CoarseDropout:
    """``A.CoarseDropout(num_holes_range, hole_height_range, hole_width_range, fill=0)``."""

    num_holes: tuple[int, int] = (1, 4)
    hole_height: tuple[float, float] = (0.05, 0.15)
    hole_width: tuple[float, float] = (0.05, 0.15)

    def __call__(self, x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        dev = x.device
        lo, hi = self.num_holes
        chosen = _chosen(n, p, gen, dev)
        holes = torch.randint(lo, hi + 1, (n, 1), generator=gen, device=dev)
        active = torch.arange(hi, device=dev).view(1, -1) < holes  # (N, max holes)
        heights = (_uniform(n * hi, *self.hole_height, gen, dev) * h).long().view(n, hi)
        widths = (_uniform(n * hi, *self.hole_width, gen, dev) * w).long().view(n, hi)
        # Top-left corner uniform over the positions that keep the hole inside the image.
        top = (torch.rand(n, hi, generator=gen, device=dev) * (h - heights + 1)).long()
        left = (torch.rand(n, hi, generator=gen, device=dev) * (w - widths + 1)).long()
        rows = torch.arange(h, device=dev).view(1, 1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, 1, w)
        inside = (
            (rows >= top[..., None, None])
            & (rows < (top + heights)[..., None, None])
            & (cols >= left[..., None, None])
            & (cols < (left + widths)[..., None, None])
        )
        dropped = (inside & active[..., None, None]).any(dim=1, keepdim=True)  # (N, 1, H, W)
        dropped &= _per_sample(chosen)
        return x.masked_fill(dropped, 0.0)


# The device augmentation registry: the names (and order) of trainers.transforms.AUGMENTATIONS.
DEVICE_AUGMENTATIONS: Registry[Step] = Registry("augmentation")
DEVICE_AUGMENTATIONS.register("hflip", HorizontalFlip())
DEVICE_AUGMENTATIONS.register("shift_scale_rotate", Affine())
DEVICE_AUGMENTATIONS.register("color_jitter", ColorJitter())
DEVICE_AUGMENTATIONS.register("coarse_dropout", CoarseDropout())


class DeviceAugment:
    """The training augmentation of a config's ``augment`` mapping (name -> probability), on uint8 batches.

    ``__call__`` takes a uint8 NHWC batch (N, H, W, 3) on any device and returns the augmented uint8 NHWC
    batch, same shape, same device. Steps run in the registry's order, those with p == 0 skipped; each
    image gets each step with its probability. Seeded: the same seed and input give the same output.
    """

    def __init__(self, augment: Mapping[str, float], seed: int = 0) -> None:
        DEVICE_AUGMENTATIONS.check(augment)
        for name, probability in augment.items():
            if not 0.0 <= float(probability) <= 1.0:
                raise ValueError(f"augmentation {name!r}: probability {probability!r} is not in [0, 1]")
        self.steps: list[tuple[str, Step, float]] = [
            (name, step, float(augment[name]))
            for name, step in DEVICE_AUGMENTATIONS.items()
            if float(augment.get(name, 0.0)) > 0.0
        ]
        self.seed = int(seed)
        self._generator: torch.Generator | None = None
        self._device: torch.device | None = None

    def reseed(self, seed: int) -> None:
        """Restart the random stream from ``seed`` (call per fold and epoch for reproducible runs)."""
        self.seed = int(seed)
        if self._generator is not None:
            self._generator.manual_seed(self.seed)

    def _generator_for(self, device: torch.device) -> torch.Generator:
        # A CUDA generator must live on the CUDA device; a new device starts from the seed.
        if self._generator is None or self._device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            self._device = device
        return self._generator

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected a uint8 NHWC batch (N, H, W, 3), got {images.dtype} of shape {tuple(images.shape)}"
            )
        if not self.steps or images.shape[0] == 0:
            return images
        gen = self._generator_for(images.device)
        x = images.permute(0, 3, 1, 2).float()
        for _, step, probability in self.steps:
            x = step(x, probability, gen)
        return x.round_().clamp_(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def __repr__(self) -> str:
        steps = ", ".join(f"{name}={p:g}" for name, _, p in self.steps)
        return f"DeviceAugment({steps}; seed={self.seed})"


__all__ = [
    "DEVICE_AUGMENTATIONS",
    "Affine",
    "ColorJitter",
    "CoarseDropout",
    "DeviceAugment",
    "HorizontalFlip",
    "affine_theta",
    "shift_hue",
    "warp_affine",
]
