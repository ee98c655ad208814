"""The resume state (``last.pt``): what an interrupted run needs to continue exactly where it stopped.

Per fold: the trainable part of the model (frozen weights are rebuilt as they were built), the optimizer,
schedule and AMP scaler, and the best score so far; for the run: the epoch history, the best mean score,
and every random stream training draws from. Written atomically every ``resume_every_epochs`` epochs (or
``resume_every_minutes``), into ``fit``'s ``resume_dir`` (node-local in a search).

A fold's best weights and its out-of-fold probabilities live together in its checkpoint file (one atomic
write), and on resume the checkpoint file is what counts: a kill between a new best checkpoint and the next
resume state can then never pair weights and predictions of different epochs.

Without a usable resume state (a trial retried on another node, whose node-local ``last.pt`` stayed behind;
a ``last.pt`` that is truncated, foreign or unreadable, which is set aside under another name), the run
trains again from its first epoch but keeps what the run folder on shared storage has: each fold's best
checkpoint stays the bar a new epoch must beat, so a retry never replaces a better model with a worse one.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainers.cache import foldtune_home
from trainers.checkpoint import fold_checkpoint_path, read_checkpoint
from trainers.config import TrainConfig, same_config
from trainers.errors import FoldtuneError
from trainers.fold_state import FoldState, load_trainable_state, trainable_state
from trainers.io import atomic_torch_save

RESUME_STATE = "last.pt"


def local_resume_dir(run_dir: Path) -> Path:
    """A node-local folder for a run's resume state (under FOLDTUNE_CACHE): a search's run folders are on
    shared storage on a cluster, and k models with their optimizer states every few epochs do not belong
    there. Derived from the run folder, so the same run on the same machine finds it again."""
    digest = hashlib.sha1(str(Path(run_dir).absolute()).encode()).hexdigest()[:16]
    return foldtune_home() / "resume" / f"{Path(run_dir).name}-{digest}"


class ResumeError(FoldtuneError, RuntimeError):
    """A resume state that belongs to another run; the message says what to do."""


@dataclass
class Progress:
    """The run's bookkeeping across epochs (saved in the resume state)."""

    history: list[dict] = field(default_factory=list)
    best_mean_f1: float = -1.0
    best_mean_epoch: int = 0
    last_epoch: int = 0


def load_resume_state(
    path: Path, folds: list[FoldState], cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]
) -> Progress:
    """Continue after the last finished epoch when ``last.pt`` is there and usable; else from the run
    folder's best checkpoints (``continue_from_best_checkpoints``); a fresh start when there are none."""
    state = _usable_state(path, folds, cfg, run_dir, log) if path.exists() else None
    if state is None:
        return continue_from_best_checkpoints(folds, cfg, run_dir, log)
    for fold_state, saved in zip(folds, state["folds"], strict=True):
        load_trainable_state(fold_state.model, saved["model"], path)
        fold_state.optimizer.load_state_dict(saved["optimizer"])
        fold_state.scheduler.load_state_dict(saved["scheduler"])
        load_scaler_state(fold_state.scaler, saved["scaler"])
        fold_state.best_f1, fold_state.best_epoch = saved["best_f1"], saved["best_epoch"]
        fold_state.best_probs = saved["best_probs"].numpy() if saved["best_probs"] is not None else None
        _best_from_checkpoint(fold_state, run_dir, cfg)
    restore_rng_states(state.get("rng"))
    log(f"resuming {run_dir.name} after epoch {state['epoch']}")
    return Progress(state["history"], state["best_mean_f1"], state["best_mean_epoch"], state["epoch"])


_STATE_KEYS = {"epoch", "config", "history", "best_mean_f1", "best_mean_epoch", "folds"}


def _usable_state(
    path: Path, folds: list[FoldState], cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]
) -> dict | None:
    """``last.pt``'s contents, or None after setting aside one that is unreadable, truncated or foreign
    (every retry would otherwise fail on the same file). One of another configuration in a run folder
    whose checkpoints are of that other configuration too is a user error (a new config pointed at an old
    run folder): ``ResumeError``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        usable = isinstance(state, dict) and set(state) >= _STATE_KEYS and len(state["folds"]) == len(folds)
        why = "" if usable else "not a foldtune resume state of this run"
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        state, why = None, f"unreadable: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]}"
    if not why and not same_config(state["config"], cfg):
        if not _checkpoints_of(cfg, run_dir, len(folds)):
            raise ResumeError(f"{run_dir} holds a run of another configuration; use a new run folder")
        why = "written for another configuration of this run"
    if not why:
        return state
    aside = path.with_name(f"{path.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    log(f"resume state {path} is {why}: set aside as {aside.name}; continuing from the best checkpoints")
    return None


def _checkpoints_of(cfg: TrainConfig, run_dir: Path, k: int) -> bool:
    """Whether some fold checkpoint in the run folder is of ``cfg`` (none there: nothing to protect)."""
    found = [fold_checkpoint_path(run_dir, fold) for fold in range(k)]
    found = [path for path in found if path.is_file()]
    if not found:
        return True
    for path in found:
        try:
            if same_config(read_checkpoint(path, mmap=True).get("config"), cfg, of_fold=True):
                return True
        except FoldtuneError:
            continue
    return False


def continue_from_best_checkpoints(
    folds: list[FoldState], cfg: TrainConfig, run_dir: Path, log: Callable[[str], None]
) -> Progress:
    """Without a resume state, a fresh start that keeps what the run folder already has: each fold's best
    checkpoint (if it is of this config) is the score a new epoch must beat, so a retried run never
    replaces a better model with a worse one, and its out-of-fold probabilities stay those of the kept
    model. Training starts again from epoch 1 (exactly as the first attempt did, when run where it ran)."""
    kept = 0
    for fold_state in folds:
        path = fold_checkpoint_path(run_dir, fold_state.index)
        try:
            payload = read_checkpoint(path, mmap=True) if path.is_file() else None
        except FoldtuneError as error:
            log(f"{error}; that fold starts again")
            payload = None
        of_this_config = payload is not None and same_config(payload.get("config"), cfg, of_fold=True)
        if of_this_config and "val_probs" in payload:
            fold_state.best_f1, fold_state.best_epoch = float(payload["val_f1"]), int(payload["epoch"])
            fold_state.best_probs = payload["val_probs"].numpy().copy()
            kept += 1
    if kept:
        log(
            f"{run_dir.name} has no resume state here: training again from epoch 1; its best checkpoints "
            f"({kept} of {len(folds)} folds) stay unless an epoch beats them"
        )
    return Progress()


def load_scaler_state(scaler: torch.amp.GradScaler, saved: dict) -> None:
    """The fp16 loss scaler's state, when both sides scale: a run resumed on another kind of GPU switches
    between bf16 (no scaler: an empty state) and fp16 (a scaler), and then starts a fresh scale."""
    if saved and scaler.is_enabled():
        scaler.load_state_dict(saved)


def _best_from_checkpoint(fold: FoldState, run_dir: Path, cfg: TrainConfig) -> None:
    """The fold's best so far as its checkpoint file says: a run killed after writing a new best checkpoint
    but before its next resume state would otherwise pair the new weights with older OOF predictions."""
    path = fold_checkpoint_path(run_dir, fold.index)
    if not path.is_file():
        return
    payload = read_checkpoint(path)
    if same_config(payload.get("config"), cfg, of_fold=True) and "val_probs" in payload:
        fold.best_f1, fold.best_epoch = float(payload["val_f1"]), int(payload["epoch"])
        fold.best_probs = payload["val_probs"].numpy()


def rng_states() -> dict:
    """Every random stream training draws from (dropout, stochastic depth, ...), for the resume state:
    with them a resumed run continues exactly where an uninterrupted one would be."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    version, python_state, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": [version, list(python_state), python_gauss],
    }


def restore_rng_states(states: dict | None) -> None:
    if not states:  # a resume state written before RNG states were kept
        return
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, python_state, python_gauss = states["python"]
    random.setstate((version, tuple(python_state), python_gauss))


def resume_state_due(cfg: TrainConfig, epoch: int, last_saved: tuple[int, float]) -> bool:
    """Every ``resume_every_epochs`` epochs, or sooner once ``resume_every_minutes`` have passed."""
    saved_epoch, saved_at = last_saved
    if epoch - saved_epoch >= cfg.resume_every_epochs:
        return True
    minutes = cfg.resume_every_minutes
    return bool(minutes) and time.monotonic() - saved_at >= 60 * minutes


def save_resume_state(path: Path, folds: list[FoldState], cfg: TrainConfig, progress: Progress) -> None:
    atomic_torch_save(
        {
            "epoch": progress.last_epoch,
            "config": cfg.to_dict(),
            "history": progress.history,
            "best_mean_f1": progress.best_mean_f1,
            "best_mean_epoch": progress.best_mean_epoch,
            "rng": rng_states(),
            "folds": [
                {
                    "model": trainable_state(f.model),
                    "optimizer": f.optimizer.state_dict(),
                    "scheduler": f.scheduler.state_dict(),
                    "scaler": f.scaler.state_dict(),
                    "best_f1": f.best_f1,
                    "best_epoch": f.best_epoch,
                    "best_probs": torch.from_numpy(f.best_probs) if f.best_probs is not None else None,
                }
                for f in folds
            ],
        },
        path,
    )
