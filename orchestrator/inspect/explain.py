"""Attention maps (Grad-CAM) of fold models: where a model looked when it chose a class.

Why Grad-CAM on the class log-probability: one definition for both heads (the single head's softmax, the
multitask head's sum of three task log-probabilities), and the gradient of log p(c) explains what made the
model prefer c over the other classes, not only what raised its raw score.

The target layer is found generically, from timm's ``feature_info`` (the last stage, the coarsest map that
still has a spatial layout): a CNN's last stage as it is (NCHW, or NHWC stages such as Swin's, permuted);
a transformer's last block through its ``norm1`` (the token sequence before the last attention, the usual
Grad-CAM recipe for ViTs), with the prefix tokens (class, registers) dropped and the patch tokens laid
back on their grid. A probe forward pass on one blank image decides which case a model is, so no list of
model families is kept here.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from orchestrator.errors import OrchestratorError
from trainers.heads import MultiTaskNet, class_log_probs
from trainers.transforms import normalize_batch


class ClassLogProbs(nn.Module):
    """A fold model returning its (N, 18) class log-probabilities, whatever its head."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return class_log_probs(self.model(x), self.head)


def _backbone(model: nn.Module) -> nn.Module:
    return model.backbone if isinstance(model, MultiTaskNet) else model


def _last_feature(backbone: nn.Module) -> dict | None:
    info = getattr(backbone, "feature_info", None)
    if isinstance(info, list | tuple) and info and isinstance(info[-1], dict) and info[-1].get("module"):
        return info[-1]
    return None


def target_layer(model: nn.Module) -> nn.Module:
    """The module whose activations the maps are made of: the last stage (``norm1`` of a transformer's last
    block), else the last convolution."""
    backbone = _backbone(model)
    last = _last_feature(backbone)
    if last is not None:
        layer = backbone.get_submodule(last["module"])
        return getattr(layer, "norm1", None) or layer
    convolutions = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    if not convolutions:
        raise OrchestratorError(
            f"cannot find a layer to explain in {type(backbone).__name__} (no timm feature_info, no "
            "convolution); attention maps need a timm CNN or vision transformer"
        )
    return convolutions[-1]


def _probe(model: nn.Module, layer: nn.Module, image_size: tuple[int, int], device) -> tuple[int, ...]:
    """The shape of ``layer``'s output for one blank image."""
    seen: list[tuple[int, ...]] = []

    def hook(_module, _inputs, output) -> None:
        output = output[0] if isinstance(output, tuple | list) else output
        seen.append(tuple(output.shape))

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *image_size, device=device))
    finally:
        handle.remove()
    if not seen:
        raise OrchestratorError(f"the layer chosen to explain ({type(layer).__name__}) never ran")
    return seen[0]


def reshape_for(
    model: nn.Module, layer: nn.Module, image_size: tuple[int, int], device
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The ``reshape_transform`` that turns ``layer``'s output into NCHW maps (None: it already is)."""
    shape = _probe(model, layer, image_size, device)
    backbone = _backbone(model)
    last = _last_feature(backbone)
    if len(shape) == 4:
        channels = getattr(layer, "normalized_shape", None) or ((last or {}).get("num_chs"),)
        if shape[1] != channels[0] and shape[3] == channels[0]:  # NHWC stages (Swin and friends)
            return lambda tensor: tensor.permute(0, 3, 1, 2)
        return None
    if len(shape) != 3:
        raise OrchestratorError(f"cannot lay out a layer output of shape {shape} as a map")
    grid = getattr(getattr(backbone, "patch_embed", None), "grid_size", None)
    if grid is None:
        reduction = int((last or {}).get("reduction") or 16)
        grid = (image_size[0] // reduction, image_size[1] // reduction)
    height, width = int(grid[0]), int(grid[1])
    prefix = shape[1] - height * width
    if prefix < 0:
        raise OrchestratorError(f"{shape[1]} tokens cannot cover a {height}x{width} patch grid")

    def tokens_to_map(tensor: torch.Tensor) -> torch.Tensor:
        patches = tensor[:, prefix:, :].reshape(tensor.shape[0], height, width, tensor.shape[2])
        return patches.permute(0, 3, 1, 2)

    return tokens_to_map


@torch.no_grad()
def predict_classes(wrapped: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its probability) per image, without TTA: what the maps explain."""
    probs = wrapped(x).float().exp()
    best = probs.argmax(dim=1)
    return best.cpu().numpy(), probs.gather(1, best[:, None])[:, 0].cpu().numpy()


def attention_maps(
    model: nn.Module,
    head: str,
    images: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    classes: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, H, W) in [0, 1], at the input's height and width, for uint8 NHWC ``images`` as
    the model was fed them (decoded, cropped and resized like the cache); each map explains ``classes``
    (default: the model's own prediction). Returns (maps, predicted classes, their probabilities)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model.eval()
    wrapped = ClassLogProbs(model, head).eval()
    x = normalize_batch(torch.from_numpy(np.ascontiguousarray(images)).to(device), mean, std)
    predicted, confidence = predict_classes(wrapped, x)
    explain = predicted if classes is None else np.asarray(classes)
    layer = target_layer(model)
    reshape = reshape_for(model, layer, tuple(images.shape[1:3]), device)
    with torch.enable_grad(), GradCAM(model=wrapped, target_layers=[layer], reshape_transform=reshape) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in explain])
    return np.asarray(maps, dtype=np.float32), predicted, confidence


def pick_images(
    labels: np.ndarray, probs: np.ndarray, n: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(errors, samples): the ``n`` most confident errors (highest OOF probability on a wrong class,
    ties by row) and ``n`` images spread over the classes (one per class in a seeded class order, then a
    second round, ...), drawn with ``seed``; no image in both."""
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    wrong = np.array(probs, dtype=np.float64)
    wrong[rows, labels] = -1.0
    is_error = np.asarray(probs).argmax(axis=1) != labels
    errors = rows[is_error][np.argsort(-wrong.max(axis=1)[is_error], kind="stable")][:n]
    rng = np.random.default_rng(seed)
    taken = set(errors.tolist())
    pools = {
        c: [r for r in rng.permutation(np.flatnonzero(labels == c)).tolist() if r not in taken]
        for c in rng.permutation(np.unique(labels)).tolist()
    }
    samples: list[int] = []
    while len(samples) < n and any(pools.values()):
        for pool in pools.values():
            if pool and len(samples) < n:
                samples.append(pool.pop(0))
    return errors, np.asarray(samples, dtype=np.int64)


def overlay(image: np.ndarray, cam: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """The map laid over the uint8 image as a jet colour map: float RGB in [0, 1]."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.clip(cam, 0.0, 1.0))[..., :3]
    return np.clip(weight * image.astype(np.float32) / 255.0 + (1 - weight) * heat, 0.0, 1.0)
