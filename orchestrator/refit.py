"""``foldtune refit``: train a search's chosen configuration once more, on every training person.

The command finds the search and the trial (``--trial``, else the ensemble's first member, else the trial
with the best out-of-fold macro F1), checks everything that can fail before any training (the trial's
config, fold checkpoints and fold file, the data root, the device, the weights), then runs
``trainers.refit.refit`` for the mean best epoch of the trial's folds and records the result: the seed
models and ``holdout.npz`` in ``<search>/refit/<trial_id>/``, then ``refit.json`` last, then an MLflow run.

``refit.json`` is the mark of a finished refit: it is removed before a refit starts and written only once
every model is, so ``refit_models`` (what the ensemble adds to its vote) never mixes the models of a
killed refit with those of an earlier one. MLflow is a record, not the result: a tracking failure warns.

torch and the trainers are imported inside the functions, so the CLI stays quick to start.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.ensemble.arguments import DEFAULT_STORAGE
from orchestrator.errors import OrchestratorError

REFIT_DIR = "refit"
RECORD_FILE = "refit.json"


def refit_dir(search_dir: Path, trial_id: str) -> Path:
    """Where the refit of ``trial_id`` is kept: ``<search>/refit/<trial_id>/``."""
    return Path(search_dir) / REFIT_DIR / str(trial_id)


def read_refit_record(search_dir: Path, trial_id: str) -> dict | None:
    """The finished refit's ``refit.json``, or None when the trial has none (never refit, or killed)."""
    path = refit_dir(search_dir, trial_id) / RECORD_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"{path} is unreadable ({error}); re-run `foldtune refit` for it") from None
    if not isinstance(record, dict):
        raise OrchestratorError(f"{path} is not a refit record; re-run `foldtune refit` for it")
    return record


def refit_models(search_dir: Path, trial_id: str) -> list[Path]:
    """The seed checkpoints of the trial's finished refit that are on disk, in seed order ([] if none).

    Read from ``refit.json``, not globbed: a ``seed{s}.pt`` it does not list is left over from an earlier
    or killed refit (another number of epochs) and must not join the vote.
    """
    record = read_refit_record(search_dir, trial_id)
    if record is None:
        return []
    folder = refit_dir(search_dir, trial_id)
    models = sorted(record.get("models") or [], key=lambda m: int(m["index"]))
    return [folder / m["file"] for m in models if (folder / m["file"]).is_file()]


def read_refit_holdout(search_dir: Path, trial_id: str) -> dict | None:
    """The finished refit's holdout predictions (``rel_path``, ``label``, ``probs``, ``probs_tta``: the seed
    models' mean; ``probs_seed{s}``, ``probs_tta_seed{s}``), or None without holdout rows or refit."""
    import numpy as np

    from trainers.refit import HOLDOUT_FILE

    record = read_refit_record(search_dir, trial_id)
    path = refit_dir(search_dir, trial_id) / HOLDOUT_FILE
    if record is None or not record.get("holdout_rows") or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"{path} is unreadable ({error}); re-run `foldtune refit` for it") from None


# ----------------------------------------------------------------------------------------------------------
# finding and checking the trial


def _check_search_dir(search: str, storage: Path | None) -> Path:
    search_dir = Path(storage or DEFAULT_STORAGE) / search
    if not (search_dir / "trials").is_dir():
        what = "not found" if not search_dir.is_dir() else "has no trials/ folder"
        raise OrchestratorError(
            f"search folder {search_dir} {what}; run `foldtune search --name {search}` first, or pass the "
            "--storage the search used"
        )
    return search_dir


def _trial_ids(search_dir: Path) -> list[str]:
    trials = search_dir / "trials"
    return sorted(p.name for p in trials.iterdir() if p.is_dir() and not p.name.startswith("."))


def choose_trial(search_dir: Path) -> tuple[str, str]:
    """(trial id, why it was chosen): the ensemble's first member when the search has an ensemble, else the
    usable trial (finished, all checkpoints, OOF predictions) with the best OOF macro F1 with TTA."""
    ensemble = search_dir / "ensemble.json"
    if ensemble.is_file():
        try:
            trial_id = str(json.loads(ensemble.read_text())["members"][0]["trial_id"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as error:
            raise OrchestratorError(
                f"{ensemble} is unreadable ({type(error).__name__}: {error}); pass --trial, or re-run "
                "`foldtune ensemble`"
            ) from None
        return trial_id, f"the first member of the ensemble ({ensemble.name})"
    ranked = ranked_trials(search_dir)
    trial_id, score, _ = ranked[0]
    return trial_id, f"the best OOF macro F1 with TTA ({score:.4f}) of {len(ranked)} usable trial(s)"


def ranked_trials(search_dir: Path) -> list[tuple[str, float, bool]]:
    """(trial id, OOF macro F1 with TTA, whether it trained all its epochs) of every usable trial (all its
    checkpoints and OOF predictions; a planned search's promoted trials when it has them: ``most_folds``),
    best first (ties: trial id). Raises what ``discover`` raises, or OrchestratorError when none is usable."""
    from orchestrator.ensemble.candidates import (
        discover,
        left_out_by_search,
        most_folds,
        oof_f1_tta,
        read_search_summary,
    )
    from trainers.screened import FINISHED

    candidates, _ = most_folds(*discover(search_dir, *left_out_by_search(read_search_summary(search_dir))))
    if not candidates:
        raise OrchestratorError(f"{search_dir}: no trial has all its checkpoints and OOF predictions")
    scored = sorted((-oof_f1_tta(c), c.trial_id, c.status in FINISHED and not c.partial) for c in candidates)
    return [(trial_id, -negative, finished) for negative, trial_id, finished in scored]


def _check_trial(search_dir: Path, trial_id: str, search: str):
    """The trial's folder, config (TrainConfig) and fold checkpoints; one line naming what is wrong."""
    import yaml

    from trainers.config import ConfigError, TrainConfig

    run_dir = search_dir / "trials" / trial_id
    if not run_dir.is_dir():
        known = _trial_ids(search_dir)
        listed = ", ".join(known[:5]) + (f" (and {len(known) - 5} more)" if len(known) > 5 else "")
        raise OrchestratorError(
            f"trial {trial_id!r} is not in search {search} ({search_dir / 'trials'}); its trials: "
            f"{listed or 'none'}"
        )
    config_path = run_dir / "config.yaml"
    try:
        cfg = TrainConfig.from_dict(yaml.safe_load(config_path.read_text()) or {})
    except (OSError, yaml.YAMLError, ConfigError, AttributeError) as error:
        raise OrchestratorError(
            f"{config_path} is missing or unreadable ({error}); trial {trial_id} cannot be refit: pick "
            "another with --trial"
        ) from None
    checkpoints = [run_dir / "checkpoints" / f"fold{i}.pt" for i in range(cfg.folds_trained)]
    missing = [p.name for p in checkpoints if not p.is_file()]
    if len(missing) == len(checkpoints):
        raise OrchestratorError(
            f"trial {trial_id} has no fold checkpoints in {run_dir / 'checkpoints'} (pruned: outside the "
            "search's top K, or it never finished an epoch); pick another trial with --trial"
        )
    if missing:
        raise OrchestratorError(
            f"trial {trial_id} lacks {', '.join(missing)} in {run_dir / 'checkpoints'} (not finished?); "
            "let the search finish (`foldtune search --resume`) or pick another trial with --trial"
        )
    if not (run_dir / "folds.csv").is_file():
        raise OrchestratorError(
            f"trial {trial_id} has no folds.csv in {run_dir}: it is not a finished foldtune trial; pick "
            "another with --trial"
        )
    return run_dir, cfg, checkpoints


def _read_data(data_root: Path, search_dir: Path, cfg, folds, trial_id: str):
    """The trial's rows of the data root, labelled as in the search (its label fixes, if any)."""
    from orchestrator.search.constants import RELABEL_COPY  # (the search package imports Ray: only here)
    from trainers.data import read_train
    from trainers.labels import AgeBands
    from trainers.refit import join_trial_rows

    relabel = search_dir / RELABEL_COPY
    table = read_train(
        data_root, AgeBands(tuple(cfg.age_edges)), relabel=relabel if relabel.is_file() else None
    ).table
    absent = sorted(set(folds["rel_path"]) - set(table["rel_path"]))
    if absent:
        raise OrchestratorError(
            f"--data {data_root} lacks {len(absent)} of the {len(folds)} images trial {trial_id} was "
            f"trained on (e.g. {absent[:3]}); the search was run on another data root: pass that one"
        )
    return join_trial_rows(table, folds)


# ----------------------------------------------------------------------------------------------------------
# the command


def run_refit(
    data_root: Path,
    search: str,
    storage: Path | None = None,
    trial: str | None = None,
    seeds: int = 1,
    epochs: float | None = None,
    device: str = "auto",
    tracking_uri: str | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = print,
    chosen_by: str | None = None,
    continue_fold: int | None = None,
) -> dict[str, Any]:
    """Refit one trial of search ``search`` on all its training persons; returns the ``refit.json`` record.
    ``chosen_by`` says why ``trial`` was chosen (a planned search's final phase), default "--trial";
    ``continue_fold``: the models start from that fold model's weights (``trainers.refit``'s ``init_from``).

    Every check runs before training; the files are written as described in the module docstring.
    """
    import dataclasses

    from trainers.device import pick_device
    from trainers.folds import HOLDOUT_FOLD, read_folds
    from trainers.refit import mean_best_epoch, refit, training_mask

    log = log or (lambda message: None)
    if seeds < 1:
        raise OrchestratorError(f"--seeds must be at least 1, got {seeds}")
    if epochs is not None and not epochs > 0:
        raise OrchestratorError(f"--epochs must be at least 1, got {epochs}")
    search_dir = _check_search_dir(search, storage)
    trial_id, why = (str(trial), chosen_by or "--trial") if trial is not None else choose_trial(search_dir)
    run_dir, cfg, checkpoints = _check_trial(search_dir, trial_id, search)
    mean_epoch, fold_epochs = mean_best_epoch(checkpoints)
    folds = read_folds(run_dir / "folds.csv")  # holdout rows (fold -1) included
    data = _read_data(Path(data_root), search_dir, cfg, folds, trial_id)
    torch_device = pick_device(device)
    resolved = _resolve_weights(cfg)
    if cache_dir is None:
        from trainers.cache import default_cache_dir

        cache_dir = default_cache_dir()

    chosen = epochs if epochs is not None else mean_epoch
    per_fold = ",".join(map(str, fold_epochs))
    epochs_from = "--epochs" if epochs is not None else "mean best epoch of the folds"
    rows_trained = int(training_mask(data, cfg).sum())
    holdout_rows = int((data["fold"] == HOLDOUT_FOLD).sum())
    log(f"refit of trial {trial_id} ({cfg.backbone}), chosen by {why}")
    note = f"(--epochs; folds' best: {per_fold})" if epochs is not None else f"(folds: {per_fold})"
    log(
        f"epochs: {chosen} {note}; {seeds} seed(s); {rows_trained} training images"
        + (f", {holdout_rows} holdout images kept out" if holdout_rows else ", no holdout")
    )

    out_dir = refit_dir(search_dir, trial_id)
    (out_dir / RECORD_FILE).unlink(missing_ok=True)  # from here until the end no refit is "finished"
    started = time.perf_counter()
    result = refit(
        cfg,
        data,
        out_dir,
        Path(cache_dir),
        chosen,
        seeds,
        resolved_weights=resolved,
        device=torch_device,
        log=log,
        init_from=None if continue_fold is None else checkpoints[continue_fold],
    )
    _remove_stale(out_dir, seeds, holdout=result.holdout_path is not None)
    refit_cfg = dataclasses.replace(cfg, epochs=int(chosen)).to_dict()
    record = {
        "trial_id": trial_id,
        "search": search,
        "chosen_by": why,
        "epochs": int(chosen),
        "epochs_from": epochs_from,
        "continued_from": None if continue_fold is None else checkpoints[continue_fold].name,
        "fold_epochs": fold_epochs,
        "seeds": seeds,
        "seed_rule": "cfg.seed + 1000 * (s + 1)",
        "rows_trained": result.rows_trained,
        "holdout_rows": holdout_rows,
        "holdout_f1": _finite(result.holdout_f1),
        "holdout_f1_tta": _finite(result.holdout_f1_tta),
        "holdout": result.holdout_path.name if result.holdout_path else None,
        "seconds": round(time.perf_counter() - started, 3),
        "data_root": str(Path(data_root).absolute()),
        "trial_dir": str(run_dir.absolute()),
        "models": [
            {
                "index": m.index,
                "seed": m.seed,
                "file": m.path.name,
                "path": str(m.path),
                "train_loss": m.train_loss,
                "seconds": round(m.seconds, 3),
                "holdout_f1": _finite(m.holdout_f1),
            }
            for m in result.models
        ],
        "config": refit_cfg,
    }
    _write_record(out_dir, record)
    run_id = _record_in_mlflow(record, refit_cfg, search, search_dir, out_dir, tracking_uri, log)
    if run_id is not None:
        record["mlflow_run_id"] = run_id
        _write_record(out_dir, record)
    _report(record, out_dir, log)
    return record


def _resolve_weights(cfg):
    """The trial's pretrained weights, resolved before training (fails fast, never a hang offline)."""
    if not cfg.pretrained:
        return None
    from trainers.weights import resolve_pretrained

    return resolve_pretrained(cfg.backbone, cfg.pretrained)


def _remove_stale(out_dir: Path, seeds: int, holdout: bool) -> None:
    """Models of an earlier refit with more seeds (and its holdout file) go: the folder is this refit's."""
    from trainers.refit import HOLDOUT_FILE

    for path in out_dir.glob("seed*.pt"):
        index = path.stem[len("seed") :]
        if not index.isdigit() or int(index) >= seeds:
            path.unlink(missing_ok=True)
    if not holdout:
        (out_dir / HOLDOUT_FILE).unlink(missing_ok=True)


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def _write_record(out_dir: Path, record: dict) -> None:
    from trainers.io import write_text_atomic

    write_text_atomic(json.dumps(record, indent=2), out_dir / RECORD_FILE)


def _record_in_mlflow(
    record: dict,
    config: dict,
    search: str,
    search_dir: Path,
    out_dir: Path,
    tracking_uri: str | None,
    log: Callable[[str], None],
) -> str | None:
    """The MLflow run, nested under the search's; a failure warns (the refit folder is the result)."""
    try:
        from orchestrator.ensemble.candidates import read_search_summary
        from orchestrator.tracking.refit_run import log_refit_run

        summary = read_search_summary(search_dir)
        return log_refit_run(record, config, summary, search, search_dir, out_dir, tracking_uri)
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        log(
            f"warning: the refit is written but logging it to MLflow failed ({type(error).__name__}: "
            f"{first}); check the tracking URI / MLFLOW_TRACKING_URI"
        )
        return None


def _report(record: dict, out_dir: Path, log: Callable[[str], None]) -> None:
    files = [m["file"] for m in record["models"]] + ([record["holdout"]] if record["holdout"] else [])
    log(f"refit done in {record['seconds']:.1f}s; written to {out_dir}: {', '.join(files)}, {RECORD_FILE}")
    if record["holdout_rows"]:
        f1, f1_tta = record["holdout_f1"], record["holdout_f1_tta"]
        log(
            f"holdout macro F1 ({record['holdout_rows']} images never trained on, {record['seeds']} seed "
            f"model(s) averaged): {_fmt(f1)} without TTA, {_fmt(f1_tta)} with TTA "
            f"{','.join(record['config'].get('tta') or []) or 'none'}"
        )
    if record.get("mlflow_run_id"):
        log(f"MLflow run: {record['mlflow_run_id']}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# ----------------------------------------------------------------------------------------------------------
# the command line


def cmd_refit(args: argparse.Namespace) -> int:
    """``foldtune refit``: exit 0 once the refit and its record are written."""
    run_refit(
        data_root=Path(args.data),
        search=args.search,
        storage=Path(args.storage) if args.storage else None,
        trial=args.trial,
        seeds=args.seeds,
        epochs=args.epochs,
        device=args.device,
        tracking_uri=args.tracking_uri,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
    )
    return 0


def add_refit_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``refit`` subcommand on ``foldtune``'s subparsers (``build_parser`` calls this)."""
    p = sub.add_parser(
        "refit", help="train a search's chosen trial on every training person for its mean best epoch"
    )
    p.add_argument("--data", required=True, help="the data root the search was run on")
    p.add_argument("--search", required=True, help="search name")
    p.add_argument("--storage", help="folder holding the searches (default ./runs)")
    p.add_argument(
        "--trial", help="trial id (default: the ensemble's first member, else the best OOF macro F1)"
    )
    p.add_argument("--seeds", type=int, default=1, help="models to train, each with its own seed (1)")
    p.add_argument("--epochs", type=int, help="epochs (default: the rounded mean of the folds' best epochs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--tracking-uri", help="MLflow store (default: the search's, else MLFLOW_TRACKING_URI, else mlruns/)"
    )
    p.add_argument("--cache-dir", help="decoded-image cache folder (default: the one searches use)")
    p.set_defaults(func=cmd_refit)
    return p
