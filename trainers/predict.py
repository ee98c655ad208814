"""Inference: batched, streamed from a memory-mapped array, TTA averaged in probability space.

Used by the trainer for validation and out-of-fold predictions and by the ensemble for the submission,
so a fold model scores its validation images exactly the way it will score the test images.
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import torch

from trainers.errors import FoldtuneError
from trainers.heads import class_log_probs
from trainers.labels import NUM_CLASSES
from trainers.transforms import normalize_batch, tta_views


class DeviceError(FoldtuneError, RuntimeError):
    """The configured device is not there (CUDA asked for on a machine without a visible GPU)."""


def pick_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present; asking for CUDA without one is a clear error, never a hang."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was asked for but no CUDA GPU is visible; use device: auto or cpu")
    return torch.device(name)


def amp_dtype(device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU computes it natively (Ampere and later), else fp16 (which
    needs loss scaling: see ``fold_state.build_fold``); None on the CPU or without AMP (plain fp32).

    ``including_emulation=False``: plain ``is_bf16_supported()`` is True on V100/T4 too, where bf16 is
    emulated and slower than fp32.
    """
    if device.type != "cuda" or not amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast_for(device: torch.device, amp: bool):
    """Autocast in ``amp_dtype``; nothing on the CPU (plain fp32 there)."""
    dtype = amp_dtype(device, amp)
    return nullcontext() if dtype is None else torch.autocast("cuda", dtype=dtype)


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module,
    head: str,
    images: np.ndarray,
    rows: np.ndarray | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    batch_size: int = 64,
    tta: tuple[str, ...] | list[str] = (),
    amp: bool = True,
    channels_last: bool = False,
) -> np.ndarray:
    """Class probabilities (N, 18) for ``images[rows]``; with TTA, the mean of the views' probabilities."""
    model.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    out = np.empty((len(rows), NUM_CLASSES), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        # sorted reads are sequential on the memory map; the order is restored below
        order = np.argsort(batch_rows, kind="stable")
        batch = torch.from_numpy(np.ascontiguousarray(images[batch_rows[order]]))
        x = normalize_batch(batch.to(device, non_blocking=True), mean, std, channels_last)
        probs = torch.zeros(len(batch_rows), NUM_CLASSES, device=device)
        views = tta_views(x, tuple(tta))
        with autocast_for(device, amp):
            for view in views:
                probs += class_log_probs(model(view), head).float().exp()
        probs /= len(views)
        result = np.empty_like(probs.cpu().numpy())
        result[order] = probs.cpu().numpy()
        out[start : start + len(batch_rows)] = result
    return out
