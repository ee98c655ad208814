"""What one Tune trial runs: a k-fold ``trainers.fit.fit`` in its own run folder, reporting every epoch.

This is the only room that runs inside Ray's trial processes; everything it needs arrives prepared in a
``TrialContext`` (data, folds, cache folder, resolved weights), so a trial never reads the data root or
the network. Each epoch is reported with mean-over-folds validation macro F1 (so ASHA compares trials at
equal epochs) and a tiny marker checkpoint: the real resume state is fit's own ``last.pt``, kept on the
node's local disk (``trainers.resume.local_resume_dir``), not in the run folder on shared storage. A
trial whose fit already finished (its driver was killed before recording it) reports the final epoch
again instead of retraining.

Where a trial trains is what Ray gave it: a trial with GPU ids trains on CUDA or fails at once with one
line naming the torch build, the driver and the fix (``trainers.device.pick_device``); a trial with none
gets an empty ``CUDA_VISIBLE_DEVICES`` before torch can start CUDA (Ray 2.60 leaves a 0-GPU task the
node's, so it would otherwise land on GPU 0 with no memory cap). ``device.json`` in the run folder records
it. Trials packed onto one GPU (``resources.gpu`` below 1, e.g. 0.5 for two per GPU) each cap PyTorch's
allocator at their share of that GPU's memory (``limit_gpu_memory``), so one trial cannot starve the other.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune

from orchestrator.search.constants import CHECKPOINT_MARKER
from orchestrator.space import SearchSpace
from trainers.io import write_text_atomic


class TrialFailed(RuntimeError):
    """A trial that produced no usable model (its loss diverged); the message says what to change."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs, prepared once by the driver and shipped through Ray's object store."""

    space: SearchSpace
    table: pd.DataFrame
    folds: pd.DataFrame
    cache_dir: str
    trials_dir: str
    weights: dict[str, Any]  # backbone -> trainers.weights.ResolvedWeights
    log_epochs: bool


def run_trial(params: dict[str, Any], context: TrialContext) -> None:
    """One trial: fit all k folds in lockstep in ``trials/<trial_id>``, reporting to Tune after each epoch."""
    import torch

    from trainers.fit import fit
    from trainers.resume import local_resume_dir

    torch.set_num_threads(max(1, int(context.space.cpus_per_trial)))
    # one "Checkpoint successfully created" line per epoch and trial would drown the epoch lines
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    trial_id = tune.get_context().get_trial_id()
    run_dir = Path(context.trials_dir) / trial_id
    cfg = context.space.config_for(params)
    log = print if context.log_epochs else None
    holds_gpu = claim_devices(ray.get_gpu_ids())

    finished = _finished_fit(run_dir, cfg)
    if finished is not None:  # the fit ended but a killed driver never recorded it: report, don't retrain
        _report(_final_metrics(run_dir, finished, cfg.epochs), run_dir)
        return

    def report_epoch(report) -> None:
        _report({**report.flat(), "epochs_planned": cfg.epochs}, run_dir)

    record_device(run_dir, cfg.device, holds_gpu)
    if holds_gpu and cfg.device != "cpu":  # a CPU trial gets no CUDA context (the cap would create one)
        limit_gpu_memory(context.space.gpus_per_trial)
    result = fit(
        cfg,
        context.table,
        context.folds,
        run_dir,
        Path(context.cache_dir),
        resolved_weights=context.weights.get(cfg.backbone),
        callback=report_epoch,
        log=log,
        resume_dir=local_resume_dir(run_dir),
        holds_gpu=holds_gpu,
    )
    if result.status == "diverged":
        raise TrialFailed(result.message)


def claim_devices(gpu_ids: list) -> bool:
    """Whether this trial holds a GPU (Ray gave it ids); one that holds none is kept off every GPU.

    Ray 2.60 leaves a 0-GPU task the node's ``CUDA_VISIBLE_DEVICES`` (ray-project/ray#54868): such a trial
    would see every GPU, pick device 0 and allocate there without a cap. An empty value hides them all; it
    must be set before torch starts CUDA, which is why this runs first in the trial."""
    if gpu_ids:
        return True
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return False


def record_device(run_dir: Path, device: str, holds_gpu: bool) -> None:
    """``device.json``: where the trial trains (the device, the GPU ids and visible devices Ray gave it, the
    torch build), so a user can see per trial that GPUs were used."""
    import torch

    from trainers.device import pick_device

    run_dir.mkdir(parents=True, exist_ok=True)
    chosen = pick_device(device, holds_gpu)  # a GPU it cannot use fails here, before any data is read
    record = {
        "device": chosen.type,
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu_name": torch.cuda.get_device_name(chosen) if chosen.type == "cuda" else None,
    }
    write_text_atomic(json.dumps(record, indent=2), run_dir / "device.json")


def limit_gpu_memory(gpus_per_trial: float, cuda=None) -> bool:
    """Cap this process's CUDA memory at its GPU share when trials share a GPU; True when a cap was set.

    Only a fractional share (0 < ``gpus_per_trial`` < 1) is capped, and only when CUDA is available here.
    Ray makes the trial's one GPU the only visible one, so it is device 0. ``cuda`` is ``torch.cuda``
    unless a test passes a stand-in.
    """
    if not 0 < gpus_per_trial < 1:
        return False
    if cuda is None:
        import torch

        cuda = torch.cuda
    if not cuda.is_available():
        return False
    cuda.set_per_process_memory_fraction(gpus_per_trial, device=0)
    return True


def _report(metrics: dict[str, Any], run_dir: Path) -> None:
    """Report to Tune with a tiny marker checkpoint; the real resume state is fit's ``last.pt``."""
    with tempfile.TemporaryDirectory() as folder:
        marker = {"epoch": int(metrics["epoch"]), "run_dir": str(run_dir)}
        Path(folder, CHECKPOINT_MARKER).write_text(json.dumps(marker))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _finished_fit(run_dir: Path, cfg) -> dict[str, Any] | None:
    from trainers.config import same_config

    path = run_dir / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if same_config(result.get("config"), cfg) and result.get("status") in ("completed", "early_stopped"):
        return result
    return None


def _final_metrics(run_dir: Path, result: dict[str, Any], epochs_planned: int) -> dict[str, Any]:
    """The last epoch's metrics of a finished run, rebuilt from its ``metrics/epochs.csv``."""
    epoch = int(result["epochs_trained"])
    from trainers.run_outputs import epoch_metrics

    history = pd.read_csv(run_dir / "metrics" / "epochs.csv", dtype={"fold": str})
    metrics: dict[str, Any] = epoch_metrics(history, epoch)
    return {
        **metrics,
        "epoch": epoch,
        "best_f1": result["best_f1"],
        "best_epoch": result["best_epoch"],
        "epochs_planned": epochs_planned,
    }
