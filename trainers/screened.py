"""The folds a screened run already trained, reused when the run is promoted to all k folds.

A planned search screens each configuration on its first ``train_folds`` fold(s) (a third of the compute
at k=3); the configurations that screened best and that the budget can afford are then *promoted*: the
same run folder trains its remaining folds (``fit(cfg, ..., promote=True)`` with ``train_folds`` 0), in
lockstep as any k-fold run does, while the screened folds are kept exactly as they are: their best
checkpoints, their validation probabilities and their epoch history. Nothing is trained twice, and the
promoted run is an ordinary k-fold run afterwards (``config.yaml``, ``result.json``, ``oof.npz`` of all k
folds), so the ensemble, refit and inspection read it like any other.

Until the promotion ends the folder still reads as the screened run it was (``fit`` writes the promoted
``config.yaml`` and ``result.json`` last): a promotion killed halfway never costs the screened model. Its
``metrics/epochs.csv`` is the one file rewritten from the first promoted epoch on, so the screen's history
is copied to ``metrics/epochs.screen.csv`` before that (``screen_history``) and read from there: a resumed
promotion, and the planner's measured cost while the folder is still the screen, see the screen's epochs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from trainers.checkpoint import fold_checkpoint_path, read_checkpoint
from trainers.config import TrainConfig, folds_trained_of, same_config
from trainers.errors import FoldtuneError
from trainers.io import atomic_write_bytes

FINISHED = ("completed", "early_stopped")
SCREEN_HISTORY = "epochs.screen.csv"  # in metrics/: the screen's epochs, kept when it is promoted
# columns of metrics/epochs.csv that are bookkeeping, not a fold's metrics
_NOT_METRICS = ("epoch", "fold", "epoch_seconds", "timed_from")


class PromotionError(FoldtuneError, ValueError):
    """A run folder that holds no finished screen of this configuration: nothing to promote."""


@dataclass(frozen=True)
class ScreenedFolds:
    """The first ``folds`` folds of a finished screen; each fold's metrics by epoch (``epochs.csv``)."""

    folds: int
    history: dict[int, dict[int, dict[str, float]]]

    def metrics(self, fold: int, epoch: int) -> dict[str, float]:
        """The fold's metrics at ``epoch``; past the epochs it trained (its screen stopped early), its last
        epoch's: the fold is finished, and the promoted run's mean over k folds counts it as it ended."""
        rows = self.history[fold]
        known = [e for e in rows if e <= epoch]
        return dict(rows[max(known) if known else min(rows)])


def read_screened(run_dir: Path, cfg: TrainConfig) -> ScreenedFolds:
    """The finished screen in ``run_dir`` that ``cfg`` (all k folds) promotes; PromotionError says why not."""
    result_path = Path(run_dir) / "result.json"
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        raise PromotionError(
            f"{result_path} is missing or unreadable: no finished screen to promote"
        ) from None
    result = result if isinstance(result, dict) else {}
    saved = result.get("config")
    if result.get("status") not in FINISHED or not isinstance(saved, dict):
        raise PromotionError(f"{run_dir} holds no finished screen (status {result.get('status')!r})")
    if not same_config(saved, cfg, of_fold=True):
        raise PromotionError(f"{run_dir} holds a screen of another configuration; promote with its own")
    screened = folds_trained_of(saved)
    if screened >= cfg.folds_trained:
        raise PromotionError(
            f"{run_dir} already trained {screened} of {cfg.k} folds: there is nothing left to promote"
        )
    history = pd.read_csv(screen_history(Path(run_dir)), dtype={"fold": str})
    by_fold: dict[int, dict[int, dict[str, float]]] = {}
    for fold in range(screened):
        rows = history[history["fold"] == str(fold)]
        if rows.empty:
            raise PromotionError(f"{run_dir}/metrics/epochs.csv has no epoch of fold {fold}")
        by_fold[fold] = {
            int(row["epoch"]): {k: float(v) for k, v in row.items() if k not in _NOT_METRICS and pd.notna(v)}
            for row in rows.to_dict("records")
        }
    return ScreenedFolds(folds=screened, history=by_fold)


def screen_history(run_dir: Path) -> Path:
    """The screen's ``epochs.csv`` kept as ``epochs.screen.csv`` (copied the first time a promotion of
    ``run_dir`` starts, atomically; a resumed promotion finds the copy and reads the screen from it)."""
    kept = run_dir / "metrics" / SCREEN_HISTORY
    if not kept.is_file():
        atomic_write_bytes((run_dir / "metrics" / "epochs.csv").read_bytes(), kept)
    return kept


def history_of(run_dir: Path, config: dict) -> Path:
    """The epoch history that describes the run ``config`` (its ``config.yaml``) says: while a promotion
    of it is under way or was cut, ``epochs.csv`` holds the promotion's epochs and the screen's are in the
    copy; otherwise ``epochs.csv``."""
    if promotion_under_way(run_dir, config):
        return Path(run_dir) / "metrics" / SCREEN_HISTORY
    return Path(run_dir) / "metrics" / "epochs.csv"


def promotion_under_way(run_dir: Path, config: dict | None = None) -> bool:
    """A promotion of the screen in ``run_dir`` started and has not ended (running, or cut by a kill:
    its resume state is what a ``--resume`` continues from, not to be pruned). ``config``: the run's
    ``config.yaml`` when the caller has read it."""
    return _promotion_ended(run_dir, config) is False


def was_promoted(run_dir: Path, config: dict | None = None) -> bool:
    """A run folder that screened and was then promoted to all its folds (the screen's history kept)."""
    return _promotion_ended(run_dir, config) is True


def _promotion_ended(run_dir: Path, config: dict | None) -> bool | None:
    """None: no promotion of ``run_dir`` ever started (no screen history kept) or its ``config.yaml`` is
    unreadable; else whether ``config.yaml`` already says all k folds (a promotion writes it last)."""
    if not (Path(run_dir) / "metrics" / SCREEN_HISTORY).is_file():
        return None
    if config is None:
        try:
            config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            return None
    if not isinstance(config, dict) or not config:
        return None
    return folds_trained_of(config) >= int(config.get("k", 0))


def reuse_screened(fold_states: Sequence, screened: ScreenedFolds, run_dir: Path) -> None:
    """The screened folds' best epoch, score and validation probabilities, from their checkpoints (the
    models themselves are loaded from them when the run predicts its out-of-fold images)."""
    for state in fold_states[: screened.folds]:
        path = fold_checkpoint_path(run_dir, state.index)
        payload = read_checkpoint(path, mmap=True)
        if "val_probs" not in payload:
            raise PromotionError(f"{path} has no validation probabilities: this screen cannot be promoted")
        state.best_f1, state.best_epoch = float(payload["val_f1"]), int(payload["epoch"])
        state.best_probs = payload["val_probs"].numpy().copy()


def describe(screened: ScreenedFolds, cfg: TrainConfig) -> str:
    """The line a promoted run prints when it starts."""
    reused = ", ".join(str(f) for f in range(screened.folds))
    return (
        f"promoting to all {cfg.k} folds: fold(s) {reused} reused from the screen; folds "
        f"{screened.folds}..{cfg.k - 1} train for up to {cfg.epochs} epochs"
    )
