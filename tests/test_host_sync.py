"""No host sync inside a training step, counted on the CPU with torch's own function-mode hook.

On a GPU every read of a device tensor on the host (``.item()``, ``.cpu()``, ``.tolist()``, ``.numpy()``,
``bool()``, ``float()``), every ``torch.tensor`` built on the device from host numbers, and every blocking
``.to(device)`` makes the CPU wait for the GPU to drain before it can queue the next batch. None of them
needs a GPU to be seen: a ``TorchFunctionMode`` sees every torch call, and the stack says which file made
it. Real steps run here (device augmentation with every step on, the multitask head with class-weighted
focal loss, TTA prediction with every view): the project's own files may read back once per epoch or
prediction pass, and not once more for more steps or batches.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import orchestrator
import trainers
from trainers.config import TrainConfig
from trainers.device_augment import DEVICE_AUGMENTATIONS, DeviceAugment
from trainers.fit import input_stats, train_one_epoch
from trainers.fold_state import build_fold, make_optimizer, seed_everything
from trainers.predict import predict_proba
from trainers.transforms import TTA_VIEWS

PROJECT = tuple(str(Path(package.__file__).parent) + "/" for package in (trainers, orchestrator))
TORCH = str(Path(torch.__file__).parent) + "/"
READBACKS = {"item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "cuda"}
FACTORIES = {"tensor", "as_tensor"}


def _moves_to_a_device(args: tuple, kwargs: dict) -> bool:
    """Whether a ``Tensor.to`` call names a device (or a tensor whose device it takes), not only a dtype."""
    targets = [*args[1:], kwargs.get("device"), kwargs.get("other")]
    return any(isinstance(t, (torch.device, torch.Tensor)) or (isinstance(t, str) and t) for t in targets)


class HostSyncs(TorchFunctionMode):
    """Records, per project file and line, every torch call that can make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        sync = (
            name in READBACKS
            or (name in FACTORIES and kwargs.get("device") is not None)
            or (name == "to" and _moves_to_a_device(args, kwargs) and not kwargs.get("non_blocking"))
        )
        if sync:
            site = _project_caller(name)
            if site is not None:
                self.sites[f"{site} {name}"] += 1
        return func(*args, **kwargs)


def _project_caller(name: str) -> str | None:
    """'file:line' of the code that made the call ``name`` when that code is the project's, else None.

    Torch's own code calling torch (an optimizer's step, a module's forward) is torch's: only the frame that
    called ``name`` counts. Functions written in Python reach the mode through ``torch.overrides``: those
    frames, and the torch function that dispatched (same name), are skipped first."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith("torch/overrides.py"):
        frame = frame.f_back
    if frame is not None and frame.f_code.co_filename.startswith(TORCH) and frame.f_code.co_name == name:
        frame = frame.f_back
    if frame is None or not frame.f_code.co_filename.startswith(PROJECT):
        return None
    path = Path(frame.f_code.co_filename)
    return f"{path.parent.name}/{path.name}:{frame.f_lineno}"


def _lines(sites: Counter[str]) -> set[str]:
    """The source lines of the recorded calls (``x.cpu().numpy()`` is one readback on one line)."""
    return {site.split()[0] for site in sites}


EVERY_STEP = {name: 0.5 for name in DEVICE_AUGMENTATIONS.names()}
STEP_CFG = TrainConfig(
    backbone="resnet10t",
    image_size=(32, 24),
    batch_size=4,
    head="multitask",
    loss="focal",
    focal_gamma=2.0,
    class_alpha=True,
    label_smoothing=0.05,
    augment=EVERY_STEP,
    augment_on="device",
    tta=tuple(TTA_VIEWS.names()),
)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (24, 32, 24, 3), dtype=np.uint8)


def _batches(images: np.ndarray, steps: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    labels = np.arange(len(images)) % 18
    return [
        (
            torch.from_numpy(images[i * batch_size : (i + 1) * batch_size]),
            torch.from_numpy(labels[:batch_size]),
        )
        for i in range(steps)
    ]


def _epoch_syncs(fold, augment, images, steps: int) -> Counter[str]:
    mean, std = input_stats(None)
    with HostSyncs() as recorder:
        loss = train_one_epoch(
            fold, STEP_CFG, _batches(images, steps, 4), torch.device("cpu"), mean, std, False, augment
        )
    assert loss.steps == steps and np.isfinite(loss.mean)
    return recorder.sites


def test_a_training_step_reads_nothing_back_from_the_device(images):
    seed_everything(0)
    labels = np.arange(18)
    fold = build_fold(STEP_CFG, 0, np.arange(18), labels, torch.device("cpu"))
    augment = DeviceAugment(STEP_CFG.augment, seed=1)
    assert [name for name, _, _ in augment.steps] == list(DEVICE_AUGMENTATIONS.names())  # every step on
    _epoch_syncs(fold, augment, images, 1)  # first use: cached constants are made once per device
    one, five = _epoch_syncs(fold, augment, images, 1), _epoch_syncs(fold, augment, images, 5)
    assert one == five, f"syncs that grow with the steps: {five - one}"
    assert len(_lines(five)) <= 1, f"more than the one readback per epoch: {dict(five)}"


def test_fp16_loss_scaling_with_fused_adamw_reads_nothing_back_per_step(images):
    """With loss scaling (fp16 GPUs) the overflow check is GradScaler's; with the fused AdamW it stays on the
    device. Counted from every file here, torch's own included."""
    if not hasattr(torch.amp, "GradScaler"):
        pytest.skip("torch.amp.GradScaler is missing")
    cfg = TrainConfig(**{**STEP_CFG.to_dict(), "head": "single"})
    seed_everything(0)
    fold = build_fold(cfg, 0, np.arange(18), np.arange(18), torch.device("cpu"))
    fold.optimizer = make_optimizer(fold.model, cfg, torch.device("cuda"))  # fused, as on CUDA
    assert fold.optimizer.defaults["fused"] is True
    fold.scheduler = torch.optim.lr_scheduler.LambdaLR(fold.optimizer, lambda step: 1.0)
    fold.scaler = torch.amp.GradScaler("cpu", enabled=True)
    mean, std = input_stats(None)
    counts = []
    for steps in (1, 1, 4):
        with AllItems() as recorder:
            train_one_epoch(fold, cfg, _batches(images, steps, 4), torch.device("cpu"), mean, std, False)
        counts.append(recorder.count)
    assert counts[1] == counts[2], f"readbacks grow with the steps: {counts}"


class AllItems(TorchFunctionMode):
    """Counts every ``.item()`` / ``.tolist()`` / ``bool()`` of a tensor, from any file."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READBACKS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_tta_prediction_copies_back_once_per_pass(images):
    seed_everything(0)
    fold = build_fold(STEP_CFG, 0, np.arange(18), np.arange(18), torch.device("cpu"))
    mean, std = input_stats(None)

    def syncs(rows: np.ndarray) -> tuple[Counter[str], np.ndarray]:
        with HostSyncs() as recorder:
            probs = predict_proba(
                fold.model,
                "multitask",
                images,
                rows,
                mean,
                std,
                torch.device("cpu"),
                batch_size=4,
                tta=STEP_CFG.tta,
            )
        return recorder.sites, probs

    syncs(np.arange(4))  # first use
    one_batch, _ = syncs(np.arange(4))
    rows = np.random.default_rng(1).permutation(len(images))[:20]  # five batches, shuffled rows
    five_batches, probs = syncs(rows)
    assert one_batch == five_batches, f"syncs that grow with the batches: {five_batches - one_batch}"
    assert len(_lines(five_batches)) <= 1, f"more than one readback per pass: {dict(five_batches)}"
    # the rows come back in the caller's order although each batch is read sorted
    one_by_one = np.concatenate(
        [
            predict_proba(
                fold.model,
                "multitask",
                images,
                rows[i : i + 1],
                mean,
                std,
                torch.device("cpu"),
                1,
                STEP_CFG.tta,
            )
            for i in range(len(rows))
        ]
    )
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)
