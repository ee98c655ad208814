"""Inference: batched, streamed from a memory-mapped array, TTA averaged in probability space.

Used by the trainer for validation and out-of-fold predictions and by the ensemble for the submission,
so a fold model scores its validation images exactly the way it will score the test images.
"""

from __future__ import annotations

import numpy as np
import torch

from trainers.device import autocast_for
from trainers.heads import class_log_probs
from trainers.labels import NUM_CLASSES
from trainers.transforms import normalize_batch, tta_views


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
    """Class probabilities (N, 18) for ``images[rows]``; with TTA, the mean of the views' probabilities.

    The probabilities stay on the device until the last batch and come back in one copy: a copy to the
    host per batch would make the CPU wait for the GPU to drain before it queues the next batch.
    """
    model.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        return np.empty((0, NUM_CLASSES), dtype=np.float32)
    pin = device.type == "cuda"
    probs = torch.zeros(len(rows), NUM_CLASSES, device=device)
    orders = []
    for start in range(0, len(rows), batch_size):
        batch_rows = rows[start : start + batch_size]
        # sorted reads are sequential on the memory map; the rows come back in sorted order and are put
        # back in the caller's order on the host, after the one copy
        order = np.argsort(batch_rows, kind="stable")
        orders.append(start + order)
        batch = torch.from_numpy(np.ascontiguousarray(images[batch_rows[order]]))
        batch = batch.pin_memory() if pin else batch  # pinned: the copy below does not wait for the GPU
        x = normalize_batch(batch.to(device, non_blocking=True), mean, std, channels_last)
        views = tta_views(x, tuple(tta))
        block = probs[start : start + len(batch_rows)]
        with autocast_for(device, amp):
            for view in views:
                block += class_log_probs(model(view), head).float().exp()
        block /= len(views)
    out = np.empty((len(rows), NUM_CLASSES), dtype=np.float32)
    out[np.concatenate(orders)] = probs.cpu().numpy()
    return out
