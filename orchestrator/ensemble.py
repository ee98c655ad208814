"""The ensemble stage: soft-vote the best fold models of a finished search, with TTA, into the submission.

Why it works the way it does:

- Members are whole trials (all k fold models of one configuration), chosen on out-of-fold (OOF)
  probabilities, which every trial already wrote for every training image: greedy forward selection with
  replacement (Caruana et al. 2004) by default, or the N best trials with equal weights (``top``).
- Soft voting averages softmax probabilities (never logits: heads and temperatures differ between trials),
  weighted by how often a trial was picked; TTA views are averaged in probability space as well.
- The OOF estimate uses the same TTA as the submission, so the printed "expected F1" is honest: a stored
  OOF array is used when it was made with the requested views, otherwise the selected fold models score
  their validation images again with those views.
- Everything is computed before anything is written, and the submission is written last, atomically and
  only after it has been re-read and checked: on any error no new submission exists and an old one is
  untouched.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.errors import OrchestratorError
from trainers.config import TTA_VIEWS
from trainers.io import write_csv_atomic, write_text_atomic
from trainers.labels import NUM_CLASSES, AgeBands, class_names
from trainers.metrics import compute_metrics, confusion_matrix, f1_per_class, flat_scalars

DEFAULT_STORAGE = Path("runs")
DEFAULT_GREEDY_STEPS = 20  # picks at most; greedy selection usually stops far earlier
FAILED_STATUSES = frozenset({"diverged", "failed", "error", "errored"})
SUBMISSION_COLUMNS = ("ImageID", "ans")
SEARCH_PARENT_TAG = "foldtune.search_parent_run_id"
_LISTED = 10  # ids / trials named in one message


@dataclass
class EnsembleMember:
    """One selected trial: all its k fold models, with its share of the vote."""

    trial_id: str
    run_dir: Path
    backbone: str
    count: int  # times picked by greedy selection (1 for top-N)
    weight: float  # count / total picks
    tta: tuple[str, ...]  # views used for this member's OOF and submission probabilities
    oof_f1: float  # macro F1 of the member's OOF probabilities with ``tta``
    oof_f1_no_tta: float
    recomputed: bool  # True when the OOF probabilities were predicted again for the requested TTA


@dataclass
class EnsembleResult:
    """What ``run_ensemble`` wrote and measured."""

    submission: Path
    probs_path: Path
    report_path: Path
    plot_path: Path
    method: str  # "greedy" or "top"
    tta: tuple[str, ...] | None  # requested views; None = each trial's own
    members: list[EnsembleMember]
    oof_f1: float  # ensemble OOF macro F1 with the submission's TTA
    oof_f1_no_tta: float
    best_single_trial: str
    best_single_f1: float  # best member-candidate OOF F1 with the same TTA
    metrics: dict  # ensemble OOF metrics (scalars, per_class_f1)
    eval_probs: np.ndarray  # (N eval images, 18) ensemble probabilities, info.csv order
    image_ids: list[str]
    oof_rel_path: np.ndarray  # training images (sorted rel_path) the OOF arrays below refer to
    oof_labels: np.ndarray
    oof_probs: np.ndarray  # (N train images, 18) ensemble OOF probabilities with the submission's TTA
    member_oof_probs: dict[str, np.ndarray]  # trial id -> its OOF probabilities with its TTA
    mlflow_run_id: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # trial id -> why it is not a candidate
    folds: tuple[int, ...] | None = None  # fold models used; None = all (OOF figures cover these folds only)


@dataclass
class _Candidate:
    """A finished trial whose OOF probabilities and fold checkpoints are all there."""

    trial_id: str
    run_dir: Path
    config: dict
    status: str
    checkpoints: list[Path]
    rel_path: np.ndarray
    label: np.ndarray
    fold: np.ndarray
    probs: np.ndarray  # OOF, no TTA (float32)
    probs_tta: np.ndarray  # OOF with the trial's own ``tta`` (float32)

    @property
    def own_tta(self) -> tuple[str, ...]:
        return tuple(self.config.get("tta") or ())


# ----------------------------------------------------------------------------------------------------------
# finding the trials


def read_search_summary(search_dir: Path) -> dict:
    """What the search recorded about itself: ``summary.json`` (written when it ends) laid over
    ``tracking.json`` (written when it starts), or {} for a bare folder of trials.

    Keys used here: ``tracking_uri``, ``experiment_name``, ``parent_run_id`` and ``trials`` (each with
    ``trial_id`` and ``status``).
    """
    record: dict = {}
    for name in ("tracking.json", "summary.json"):
        path = search_dir / name
        if not path.is_file():
            continue
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise OrchestratorError(
                f"{path} is unreadable ({error}); restore it, or delete it to ensemble from trials/ alone"
            ) from None
        if isinstance(values, dict):
            record.update(values)
    return record


def _left_out_by_search(summary: dict) -> tuple[dict[str, str], dict[str, str]]:
    """Why the search itself leaves trials out: (failed, stopped early by ASHA), trial id -> reason.

    A failed trial's folder may still hold files from an earlier attempt; a stopped one has no result.
    """
    failed, stopped = {}, {}
    for trial in summary.get("trials") or []:
        if not isinstance(trial, dict):
            continue
        trial_id = str(trial.get("trial_id"))
        if trial.get("status") == "failed":
            failed[trial_id] = f"failed in the search ({trial.get('error') or 'error'})"
        elif trial.get("status") == "stopped_early":
            after = f" after {trial['epochs']} epoch(s)" if trial.get("epochs") else ""
            stopped[trial_id] = f"stopped early by ASHA{after}: a weak trial"
    return failed, stopped


def _discover(
    search_dir: Path, failed: dict[str, str], stopped: dict[str, str] | None = None
) -> tuple[list[_Candidate], dict[str, str]]:
    """Every usable trial under ``trials/`` and, for the others, why they are left out."""
    trials_dir = search_dir / "trials"
    if not trials_dir.is_dir():
        raise OrchestratorError(
            f"{search_dir} has no trials/ folder: it is not a foldtune search (or it never started a trial); "
            "run `foldtune search` first or check --search/--storage"
        )
    candidates: list[_Candidate] = []
    skipped: dict[str, str] = {}
    for run_dir in sorted(p for p in trials_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        trial_id = run_dir.name
        reason = None
        if trial_id in failed:
            skipped[trial_id] = failed[trial_id]
            continue
        result_path = run_dir / "result.json"
        if not result_path.is_file():
            skipped[trial_id] = (stopped or {}).get(
                trial_id, "no result.json (still running, or stopped before it finished)"
            )
            continue
        try:
            result = json.loads(result_path.read_text())
            config = dict(result["config"])
            status = str(result.get("status", ""))
        except (OSError, ValueError, KeyError, TypeError) as error:
            skipped[trial_id] = f"{result_path} is unreadable ({error})"
            continue
        if status in FAILED_STATUSES:
            skipped[trial_id] = f"status {status}"
            continue
        k = int(config.get("k", 0))
        checkpoints = [run_dir / "checkpoints" / f"fold{i}.pt" for i in range(k)]
        missing = [p.name for p in checkpoints if not p.is_file()]
        if len(missing) == k:
            reason = "no checkpoints (pruned: outside the search's top K)"
        elif missing:
            reason = f"checkpoints {', '.join(missing)} missing in {run_dir / 'checkpoints'}"
        elif not (run_dir / "oof.npz").is_file():
            reason = "no oof.npz (stopped before its out-of-fold predictions were written)"
        if reason:
            skipped[trial_id] = reason
            continue
        try:
            with np.load(run_dir / "oof.npz", allow_pickle=False) as oof:
                arrays = {key: oof[key] for key in ("rel_path", "label", "fold", "probs", "probs_tta")}
        except (OSError, ValueError, KeyError) as error:
            skipped[trial_id] = f"{run_dir / 'oof.npz'} is unreadable ({error})"
            continue
        order = np.argsort(arrays["rel_path"], kind="stable")  # one shared image order for every trial
        candidates.append(
            _Candidate(
                trial_id=trial_id,
                run_dir=run_dir,
                config=config,
                status=status,
                checkpoints=checkpoints,
                rel_path=arrays["rel_path"].astype(str)[order],
                label=arrays["label"].astype(np.int64)[order],
                fold=arrays["fold"].astype(np.int64)[order],
                probs=arrays["probs"].astype(np.float32)[order],  # as stored; sums are taken in float64
                probs_tta=arrays["probs_tta"].astype(np.float32)[order],
            )
        )
    if not candidates:
        why = "\n".join(f"  {trial}: {reason}" for trial, reason in list(skipped.items())[:50]) or "  (none)"
        raise OrchestratorError(
            f"no finished trial with out-of-fold predictions and all fold checkpoints in {trials_dir}:\n"
            f"{why}\n"
            "let the search finish (`foldtune search --resume`) or re-run it"
        )
    return candidates, skipped


def _check_same_split(candidates: list[_Candidate]) -> None:
    """All members must share one fold file and labels, or the OOF estimate mixes seen and unseen images."""
    reference = candidates[0]
    for other in candidates[1:]:
        pair = f"trials {reference.trial_id} and {other.trial_id}"
        if len(other.rel_path) != len(reference.rel_path) or not np.array_equal(
            other.rel_path, reference.rel_path
        ):
            differ = sorted(set(other.rel_path.tolist()) ^ set(reference.rel_path.tolist()))
            raise OrchestratorError(
                f"{pair} were trained on different images ({len(differ)} differ, e.g. {differ[:3]}); "
                "ensemble "
                "trials of one data set and fold file only (one search, or move the other trial out)"
            )
        if not np.array_equal(other.fold, reference.fold):
            bad = np.flatnonzero(other.fold != reference.fold)
            example = reference.rel_path[bad[0]]
            raise OrchestratorError(
                f"{pair} use different fold files ({len(bad)} images differ, e.g. {example}: fold "
                f"{reference.fold[bad[0]]} vs {other.fold[bad[0]]}); their out-of-fold predictions cannot be "
                "combined: ensemble trials that share one fold file (same k and folds_seed)"
            )
        if not np.array_equal(other.label, reference.label):
            bad = np.flatnonzero(other.label != reference.label)
            raise OrchestratorError(
                f"{pair} were trained with different labels ({len(bad)} images, e.g. "
                f"{reference.rel_path[bad[0]]}:"
                f" {reference.label[bad[0]]} vs {other.label[bad[0]]}); a different relabel overlay or "
                "age_edges: ensemble trials trained on the same labels only"
            )


# ----------------------------------------------------------------------------------------------------------
# selection


def macro_f1(labels: np.ndarray, probs: np.ndarray) -> float:
    """The competition score of the per-row argmax (any positive scaling of ``probs`` gives the same)."""
    predicted = np.asarray(probs).argmax(axis=1)
    return float(f1_per_class(confusion_matrix(np.asarray(labels), predicted, NUM_CLASSES)).mean())


def greedy_selection(
    oof_probs: Sequence[np.ndarray], labels: np.ndarray, max_steps: int = DEFAULT_GREEDY_STEPS
) -> list[int]:
    """Counts per candidate: start from the best one, add (with replacement) whichever raises OOF F1 most.

    Stops when no addition improves the score or after ``max_steps`` picks. Ties go to the lower index, so
    order candidates best-first for a deterministic result. The ensemble is ``sum(count * probs)``.
    """
    if not oof_probs:
        raise ValueError("greedy_selection needs at least one candidate")
    counts = [0] * len(oof_probs)
    singles = [macro_f1(labels, probs) for probs in oof_probs]
    first = int(np.argmax(singles))
    counts[first] = 1
    total = np.array(oof_probs[first], dtype=np.float64)
    best = singles[first]
    for _ in range(max(0, max_steps - 1)):
        scores = [macro_f1(labels, total + probs) for probs in oof_probs]
        pick = int(np.argmax(scores))
        if not scores[pick] > best + 1e-12:
            break
        counts[pick] += 1
        total += oof_probs[pick]
        best = scores[pick]
    return counts


def _same_views(a: Sequence[str], b: Sequence[str]) -> bool:
    """TTA views average in probability space, so their order does not matter (repeats do)."""
    return sorted(a) == sorted(b)


def _selection_probs(candidate: _Candidate, tta: tuple[str, ...] | None) -> tuple[np.ndarray, bool]:
    """The stored OOF probabilities closest to the requested TTA, and whether they are exactly it."""
    if tta is None:
        return candidate.probs_tta, True
    if not tta:
        return candidate.probs, True
    if _same_views(tta, candidate.own_tta):
        return candidate.probs_tta, True
    return candidate.probs_tta, False  # a proxy for choosing; members are predicted again with ``tta``


# ----------------------------------------------------------------------------------------------------------
# checkpoints and prediction


def _check_checkpoint(path: Path, candidate: _Candidate, fold: int) -> None:
    """Read a fold checkpoint's metadata (memory-mapped, no model built) and match it to the trial's config.

    Done for every member before any prediction, so a bad file fails in seconds, not after minutes.
    """
    import torch

    from trainers.checkpoint import CHECKPOINT_FORMAT, CheckpointError

    todo = f"re-run trial {candidate.trial_id} or delete its folder {candidate.run_dir} so it is skipped"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many kinds for truncated / foreign files
        first_line = (str(error).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(error).__name__}: {first_line}); {todo}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a foldtune checkpoint ({CHECKPOINT_FORMAT}); {todo}")
    config = candidate.config
    expected = {
        "num_classes": NUM_CLASSES,
        "backbone": config.get("backbone"),
        "head": config.get("head", "single"),
        "image_size": list(config.get("image_size") or []),
        "crop": list(config["crop"]) if config.get("crop") else None,
        "fold": fold,
    }
    for key, value in expected.items():
        found = payload.get(key)
        found = list(found) if isinstance(found, (tuple, list)) else found
        if found != value:
            raise CheckpointError(
                f"checkpoint {path} has {key} {found!r} but trial {candidate.trial_id}'s config "
                f"({candidate.run_dir / 'result.json'}) says {value!r}: the file belongs to another run; "
                f"{todo}"
            )


def _predict_member(
    candidate: _Candidate,
    tta: tuple[str, ...],
    recompute_oof: bool,
    eval_paths: list[str],
    train_paths: list[str] | None,
    cache_dir: Path,
    device,
    batch_size: int,
    log: Callable[[str], None],
    folds: Sequence[int],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Eval probabilities (mean of the ``folds`` models) and, if asked, the OOF probabilities with ``tta``.

    One fold model is on the device at a time; images stream from the memory-mapped cache in batches.
    """
    import torch

    from trainers.cache import build_cache, open_cache
    from trainers.checkpoint import CheckpointError, load_checkpoint
    from trainers.models import ModelError
    from trainers.predict import predict_proba

    config = candidate.config
    size = tuple(int(s) for s in config["image_size"])
    crop = config.get("crop") or None
    eval_cache = open_cache(build_cache(eval_paths, size, cache_dir, crop, log=log))
    eval_rows = eval_cache.rows(eval_paths)
    train_cache = train_rows = None
    if recompute_oof:
        train_cache = open_cache(build_cache(sorted(train_paths), size, cache_dir, crop, log=log))
        train_rows = train_cache.rows(train_paths)
    amp = bool(config.get("amp", True))
    channels_last = bool(config.get("channels_last", True)) and device.type == "cuda"
    eval_probs = np.zeros((len(eval_paths), NUM_CLASSES), dtype=np.float64)
    oof = np.zeros_like(candidate.probs) if recompute_oof else None
    for fold in folds:
        path = candidate.checkpoints[fold]
        try:
            loaded = load_checkpoint(path, device=device)
        except ModelError as error:  # e.g. a backbone this timm version does not know
            raise CheckpointError(
                f"checkpoint {path} cannot be rebuilt ({error}); use the timm version the search ran with"
            ) from None
        if channels_last:
            loaded.model.to(memory_format=torch.channels_last)
        common = dict(
            mean=loaded.mean,
            std=loaded.std,
            device=device,
            batch_size=batch_size,
            tta=tta,
            amp=amp,
            channels_last=channels_last,
        )
        eval_probs += predict_proba(loaded.model, loaded.head, eval_cache.images, eval_rows, **common)
        if recompute_oof:
            held_out = np.flatnonzero(candidate.fold == fold)
            oof[held_out] = predict_proba(
                loaded.model, loaded.head, train_cache.images, train_rows[held_out], **common
            )
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return eval_probs / len(folds), oof


# ----------------------------------------------------------------------------------------------------------
# writing


def _submission_frame(image_ids: list[str], answers: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {"ImageID": pd.Series(image_ids, dtype=str), "ans": np.asarray(answers, dtype=np.int64)}
    )


def validate_submission(path: Path, expected_ids: Sequence[str]) -> None:
    """Re-read a written submission: columns ImageID,ans, info.csv's ids in order, classes 0..17."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"submission {path} cannot be read back ({error})") from None
    if tuple(frame.columns) != SUBMISSION_COLUMNS:
        raise OrchestratorError(
            f"submission {path} has columns {list(frame.columns)}, not {list(SUBMISSION_COLUMNS)}"
        )
    if frame["ImageID"].tolist() != list(expected_ids):
        raise OrchestratorError(
            f"submission {path} does not list eval/info.csv's ImageIDs in info.csv's order"
        )
    valid = frame["ans"].str.fullmatch(r"\d+") & (pd.to_numeric(frame["ans"], errors="coerce") < NUM_CLASSES)
    if not valid.all():
        row = int(np.flatnonzero(~valid.to_numpy())[0])
        raise OrchestratorError(
            f"submission {path} line {row + 2}: ans {frame['ans'][row]!r} is not a class 0..17"
        )


def _write_submission(path: Path, image_ids: list[str], answers: np.ndarray) -> None:
    """Atomic and checked: written under a pending name, re-read and validated, then renamed into place."""
    pending = path.with_name(f".{path.name}.pending")
    try:
        write_csv_atomic(_submission_frame(image_ids, answers), pending)
        validate_submission(pending, image_ids)
        os.replace(pending, path)
    finally:
        pending.unlink(missing_ok=True)


def _write_probs(
    path: Path,
    image_ids: list[str],
    probs: np.ndarray,
    member_ids: list[str],
    member_probs: np.ndarray,
    weights: list[float],
) -> None:
    tmp = path.with_name(f".{path.stem}.tmp.npz")
    try:
        np.savez_compressed(
            tmp,
            image_id=np.asarray(image_ids, dtype=str),
            probs=probs.astype(np.float32),
            members=np.asarray(member_ids, dtype=str),
            weights=np.asarray(weights),
            member_probs=member_probs.astype(np.float32),
        )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------
# MLflow


def _metric_name(text: str) -> str:
    """MLflow metric/param names allow letters, digits, _ - . / and spaces."""
    text = text.replace(">=", "ge").replace("<", "lt")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", text)


def _experiment_name(summary: dict, search: str) -> str:
    """The search's MLflow experiment: as recorded in its summary, else the search name."""
    return str(summary.get("experiment_name") or search)


def _find_parent_run(tracking, search_dir: Path) -> str | None:
    """The search's parent run by its tags, for a search that stopped before writing summary.json."""
    from orchestrator.tracking import PARENT_ROLE, TAG

    folder = str(search_dir.absolute())
    if "'" in folder:
        return None
    query = f"tags.`{TAG}role` = '{PARENT_ROLE}' and tags.`{TAG}search_dir` = '{folder}'"
    found = tracking.client.search_runs([tracking.experiment_id], filter_string=query, max_results=1)
    return found[0].info.run_id if found else None


def _log_mlflow(
    result: EnsembleResult,
    summary: dict,
    search: str,
    search_dir: Path,
    tracking_uri: str | None,
    selection: dict,
) -> str:
    """One run named "ensemble" in the search's experiment, nested under the search's parent run.

    Tracking URI: the argument, else the search's own, else MLFLOW_TRACKING_URI, else ./mlruns/mlflow.db.
    """
    from orchestrator.tracking import TAG, SearchTracking

    tracking = SearchTracking(tracking_uri or summary.get("tracking_uri"), _experiment_name(summary, search))
    parent_run_id = summary.get("parent_run_id") or _find_parent_run(tracking, search_dir)
    tags = {
        f"{TAG}role": "ensemble",
        f"{TAG}search": search,
        f"{TAG}submission": str(result.submission.absolute()),
    }
    if parent_run_id:
        tags[SEARCH_PARENT_TAG] = str(parent_run_id)
        tags["mlflow.parentRunId"] = str(parent_run_id)
    run_id = tracking.client.create_run(tracking.experiment_id, run_name="ensemble", tags=tags).info.run_id
    try:
        params = {
            "selection": result.method,
            "members": json.dumps({m.trial_id: round(m.weight, 6) for m in result.members}),
            "n_members": len(result.members),
            "tta": ",".join(result.tta) if result.tta is not None else "own",
            "member_tta": json.dumps({m.trial_id: list(m.tta) for m in result.members}),
            **{key: value for key, value in selection.items() if value is not None},
        }
        metrics = {
            "oof_f1": result.oof_f1,
            "oof_f1_no_tta": result.oof_f1_no_tta,
            "best_single_oof_f1": result.best_single_f1,
            **{f"oof_{key}": value for key, value in result.metrics["scalars"].items() if key != "f1"},
            **{
                f"oof_class_f1/{i:02d}_{_metric_name(name)}": value
                for i, (name, value) in enumerate(result.metrics["per_class_f1"].items())
            },
            **{f"member/{_metric_name(m.trial_id)}/oof_f1": m.oof_f1 for m in result.members},
            **{f"member/{_metric_name(m.trial_id)}/weight": m.weight for m in result.members},
        }
        tracking.log_params(run_id, params)
        tracking.log_metrics(run_id, metrics)
        for path in (result.submission, result.report_path, result.plot_path, result.probs_path):
            tracking.client.log_artifact(run_id, str(path))
        tracking.finish(run_id, "FINISHED")
    except BaseException:
        tracking.finish(run_id, "FAILED")
        raise
    return run_id


# ----------------------------------------------------------------------------------------------------------
# the stage


def _check_tta(tta: Sequence[str] | None) -> tuple[str, ...] | None:
    if tta is None:
        return None
    views = tuple(str(v).strip() for v in tta if str(v).strip())
    unknown = [v for v in views if v not in TTA_VIEWS]
    if unknown:
        raise OrchestratorError(
            f"--tta: unknown view(s) {unknown}; use a comma-separated subset of {list(TTA_VIEWS)}"
        )
    return views


def _check_folds(folds: Sequence[int] | None, k: int) -> list[int]:
    """The fold models to use, sorted; every one of the trials' ``k`` when ``folds`` is None."""
    if folds is None:
        return list(range(k))
    chosen = sorted({int(f) for f in folds})
    bad = [f for f in chosen if not 0 <= f < k]
    if not chosen or bad:
        raise OrchestratorError(
            f"--folds: {bad or 'none given'} not among the trials' folds 0..{k - 1}; e.g. --folds 0 or 0,2"
        )
    return chosen


def _train_paths(data_root: Path, rel_paths: np.ndarray) -> list[str]:
    """Absolute training image paths, spelled as trainers.data does (so the training cache is reused)."""
    root = data_root.resolve()
    paths = [str(root / rel) for rel in rel_paths.tolist()]
    missing = [rel for rel, path in zip(rel_paths.tolist(), paths, strict=True) if not os.path.isfile(path)]
    if missing:
        raise OrchestratorError(
            f"{len(missing)} training images the trials were trained on are missing under {root} (e.g. "
            f"{missing[:3]}); --data must be the data root the search was run on"
        )
    return paths


def _describe_tta(views: Sequence[str]) -> str:
    return ",".join(views) if views else "none"


def run_ensemble(
    data_root: Path,
    search: str,
    storage: Path | None = None,
    top: int | None = None,
    tta: Sequence[str] | None = None,
    out: Path | None = None,
    batch_size: int = 64,
    tracking_uri: str | None = None,
    device: str = "auto",
    cache_dir: Path | None = None,
    greedy_steps: int = DEFAULT_GREEDY_STEPS,
    log: Callable[[str], None] | None = print,
    folds: Sequence[int] | None = None,
) -> EnsembleResult:
    """Select members of search ``search`` on OOF F1, predict eval/images, write the submission last.

    ``tta`` None keeps each trial's own TTA views; a sequence (possibly empty) applies those views to every
    member, for the OOF estimate as well as for the submission. ``top`` takes the N best trials with equal
    weights instead of greedy selection. ``folds`` keeps only those fold models of each member (e.g. one
    fold model, to measure what the k-fold average adds); its OOF figures then cover those folds'
    validation images only.
    """
    from trainers.data import read_eval
    from trainers.predict import pick_device

    log = log or (lambda message: None)
    data_root = Path(data_root)
    tta = _check_tta(tta)
    if top is not None and top < 1:
        raise OrchestratorError(f"--top must be at least 1, got {top}")
    if batch_size < 1:
        raise OrchestratorError(f"--batch-size must be at least 1, got {batch_size}")
    search_dir = Path(storage or DEFAULT_STORAGE) / search
    if not search_dir.is_dir():
        raise OrchestratorError(
            f"search folder {search_dir} not found; run `foldtune search --name {search}` first, or pass the "
            "--storage the search used"
        )
    out = Path(out) if out else search_dir / "submission.csv"
    if cache_dir is None:
        from trainers.cache import default_cache_dir

        cache_dir = default_cache_dir()
    try:
        torch_device = pick_device(device)
    except RuntimeError as error:
        raise OrchestratorError(str(error)) from None

    eval_table = read_eval(data_root)  # fail fast: missing eval images are a DataError naming each one
    image_ids = eval_table["image_id"].tolist()
    eval_paths = eval_table["image_path"].tolist()
    summary = read_search_summary(search_dir)
    candidates, skipped = _discover(search_dir, *_left_out_by_search(summary))
    _check_same_split(candidates)
    labels = candidates[0].label
    age_edges = [tuple(c.config.get("age_edges", (30, 60))) for c in candidates]
    if len(set(age_edges)) > 1:
        raise OrchestratorError(
            f"the trials use different age_edges {sorted(set(age_edges))}; their classes differ"
        )
    names = class_names(AgeBands(age_edges[0]))
    k = len(candidates[0].checkpoints)
    use_folds = _check_folds(folds, k)
    rows = np.isin(candidates[0].fold, use_folds)  # OOF rows those fold models can be judged on
    labels = labels[rows]

    # selection on stored OOF probabilities, best candidate first (ties: trial id)
    selection_probs, exact = zip(*(_selection_probs(c, tta) for c in candidates), strict=True)
    selection_probs = [p[rows] for p in selection_probs]
    single_f1 = [macro_f1(labels, p) for p in selection_probs]
    ranking = sorted(range(len(candidates)), key=lambda i: (-single_f1[i], candidates[i].trial_id))
    candidates = [candidates[i] for i in ranking]
    selection_probs = [selection_probs[i] for i in ranking]
    exact = [exact[i] for i in ranking]
    single_f1 = [single_f1[i] for i in ranking]
    if top is not None:
        method = "top"
        if top > len(candidates):
            log(f"--top {top}: only {len(candidates)} usable trials, taking all of them")
        counts = [1 if i < top else 0 for i in range(len(candidates))]
    else:
        method = "greedy"
        counts = greedy_selection(selection_probs, labels, max_steps=greedy_steps)
    chosen = [i for i, count in enumerate(counts) if count > 0]
    total = sum(counts)

    # fail fast on a bad checkpoint before any prediction
    for i in chosen:
        for fold in use_folds:
            _check_checkpoint(candidates[i].checkpoints[fold], candidates[i], fold)
    train_paths = None
    if any(not exact[i] for i in chosen):
        train_paths = _train_paths(data_root, candidates[0].rel_path)

    members: list[EnsembleMember] = []
    member_eval, member_oof, member_oof_plain = [], [], []
    for i in chosen:
        candidate = candidates[i]
        views = candidate.own_tta if tta is None else tta
        which = f"{k} folds" if len(use_folds) == k else f"fold(s) {','.join(map(str, use_folds))} of {k}"
        log(
            f"predicting with trial {candidate.trial_id} ({candidate.config.get('backbone')}, "
            f"{which}, TTA {_describe_tta(views)})"
        )
        eval_probs, recomputed = _predict_member(
            candidate,
            views,
            not exact[i],
            eval_paths,
            train_paths,
            Path(cache_dir),
            torch_device,
            batch_size,
            log,
            use_folds,
        )
        oof = recomputed[rows] if recomputed is not None else selection_probs[i]
        plain = candidate.probs[rows]
        member_eval.append(eval_probs)
        member_oof.append(oof)
        member_oof_plain.append(plain)
        members.append(
            EnsembleMember(
                trial_id=candidate.trial_id,
                run_dir=candidate.run_dir,
                backbone=str(candidate.config.get("backbone")),
                count=counts[i],
                weight=counts[i] / total,
                tta=tuple(views),
                oof_f1=macro_f1(labels, oof),
                oof_f1_no_tta=macro_f1(labels, plain),
                recomputed=recomputed is not None,
            )
        )

    weights = np.array([m.weight for m in members], dtype=np.float64)
    ensemble_oof = np.tensordot(weights, np.stack(member_oof).astype(np.float64), axes=1)
    ensemble_oof_plain = np.tensordot(weights, np.stack(member_oof_plain).astype(np.float64), axes=1)
    ensemble_eval = np.tensordot(weights, np.stack(member_eval), axes=1)
    oof_metrics = compute_metrics(labels, ensemble_oof)
    oof_f1_no_tta = macro_f1(labels, ensemble_oof_plain)
    best = members[0]  # the best candidate is always the first member (greedy starts there; top-N sorts)
    answers = ensemble_eval.argmax(axis=1)

    report_path = out.parent / "ensemble.json"
    plot_path = out.parent / "ensemble_confusion.png"
    probs_path = out.with_suffix(".npz")
    result = EnsembleResult(
        submission=out,
        probs_path=probs_path,
        report_path=report_path,
        plot_path=plot_path,
        method=method,
        tta=tta,
        members=members,
        oof_f1=float(oof_metrics["f1"]),
        oof_f1_no_tta=oof_f1_no_tta,
        best_single_trial=best.trial_id,
        best_single_f1=best.oof_f1,
        metrics={
            "scalars": flat_scalars(oof_metrics),
            "per_class_f1": dict(zip(names, oof_metrics["per_class_f1"], strict=True)),
        },
        eval_probs=ensemble_eval,
        image_ids=image_ids,
        oof_rel_path=candidates[0].rel_path[rows],
        oof_labels=labels,
        oof_probs=ensemble_oof,
        member_oof_probs={m.trial_id: p for m, p in zip(members, member_oof, strict=True)},
        skipped=skipped,
        folds=None if len(use_folds) == k else tuple(use_folds),
    )
    selection = {
        "greedy_max_steps": greedy_steps if method == "greedy" else None,
        "top": top,
        "candidates": len(candidates),
        "folds": ",".join(map(str, use_folds)) if result.folds is not None else None,
    }
    report = {
        "search": search,
        "search_dir": str(search_dir.absolute()),
        "submission": str(out.absolute()),
        "probs": str(probs_path.absolute()),
        "selection": method,
        **{key: value for key, value in selection.items() if value is not None},
        "tta": list(tta) if tta is not None else "own",
        "members": [
            {
                "trial_id": m.trial_id,
                "weight": m.weight,
                "count": m.count,
                "backbone": m.backbone,
                "tta": list(m.tta),
                "oof_f1": m.oof_f1,
                "oof_f1_no_tta": m.oof_f1_no_tta,
                "oof_recomputed": m.recomputed,
                "run_dir": str(m.run_dir.absolute()),
            }
            for m in members
        ],
        "oof_f1": result.oof_f1,
        "oof_f1_no_tta": oof_f1_no_tta,
        "oof_metrics": result.metrics["scalars"],
        "oof_per_class_f1": result.metrics["per_class_f1"],
        "oof_confusion": np.asarray(oof_metrics["confusion"]).tolist(),
        "best_single": {"trial_id": best.trial_id, "oof_f1": best.oof_f1},
        "candidates_oof_f1": {c.trial_id: f for c, f in zip(candidates, single_f1, strict=True)},
        "skipped": skipped,
        "eval_images": len(image_ids),
    }

    # everything is computed: write the side files, then the submission last
    from trainers.metrics import plot_confusion

    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(report, indent=2, default=float), report_path)
    _write_probs(
        probs_path,
        image_ids,
        ensemble_eval,
        [m.trial_id for m in members],
        np.stack(member_eval),
        weights.tolist(),
    )
    plot_confusion(
        np.asarray(oof_metrics["confusion"]),
        names,
        plot_path,
        title=f"ensemble out-of-fold confusion (macro F1 {result.oof_f1:.3f})",
    )
    _write_submission(out, image_ids, answers)

    try:
        result.mlflow_run_id = _log_mlflow(result, summary, search, search_dir, tracking_uri, selection)
    except Exception as error:  # tracking is a record of the result, not the result: keep the submission
        log(
            f"warning: the submission is written but logging the ensemble to MLflow failed "
            f"({type(error).__name__}: {error}); check the tracking URI / MLFLOW_TRACKING_URI"
        )
    else:
        report["mlflow_run_id"] = result.mlflow_run_id
        write_text_atomic(json.dumps(report, indent=2, default=float), report_path)
    log(format_report(result))
    return result


def format_report(result: EnsembleResult) -> str:
    """The short printed summary: members, their OOF F1, the ensemble's, the best single trial's."""
    tta = "each trial's own TTA" if result.tta is None else f"TTA {_describe_tta(result.tta)}"
    folds = "" if result.folds is None else f", fold model(s) {','.join(map(str, result.folds))} only"
    lines = [
        f"ensemble: {len(result.members)} trial(s), {result.method} selection, {tta}{folds}",
        "  weight  OOF F1  TTA             trial",
    ]
    for m in result.members:
        note = " (OOF re-predicted)" if m.recomputed else ""
        lines.append(
            f"  {m.weight:6.3f}  {m.oof_f1:.4f}  {_describe_tta(m.tta):<14}  {m.trial_id} ({m.backbone})"
            f"{note}"
        )
    lines += [
        f"best single trial: {result.best_single_trial}  OOF macro F1 {result.best_single_f1:.4f}",
        f"ensemble OOF macro F1 {result.oof_f1:.4f} with {tta} ({result.oof_f1_no_tta:.4f} without TTA)"
        f"  <- expected F1"
        + ("" if result.folds is None else f" (on the {len(result.oof_labels)} images of those folds)"),
        f"submission: {result.submission} ({len(result.image_ids)} images); "
        f"probabilities {result.probs_path}",
    ]
    if result.skipped:
        lines.append(
            f"not candidates: {len(result.skipped)} trial(s): "
            + "; ".join(f"{t} ({why})" for t, why in list(result.skipped.items())[:_LISTED])
        )
    if result.mlflow_run_id:
        lines.append(f"MLflow run: {result.mlflow_run_id}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# scoring a submission


def _read_labelled_csv(path: Path, role: str) -> pd.DataFrame:
    """An ImageID,ans CSV with ids as strings and ans as classes 0..17; every bad row is named."""
    path = Path(path)
    if not path.is_file():
        raise OrchestratorError(f"{role} file {path} not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"{role} file {path} is not a readable CSV ({error})") from None
    missing = [c for c in SUBMISSION_COLUMNS if c not in frame.columns]
    if missing:
        raise OrchestratorError(f"{role} file {path} lacks column(s) {missing}; it needs ImageID,ans")
    ans = frame["ans"].str.strip()
    valid = ans.str.fullmatch(r"\d+") & (pd.to_numeric(ans, errors="coerce") < NUM_CLASSES)
    if not valid.all():
        bad = np.flatnonzero(~valid.to_numpy())
        listed = ", ".join(f"line {i + 2} ({frame['ans'][i]!r})" for i in bad[:_LISTED])
        raise OrchestratorError(
            f"{role} file {path}: {len(bad)} ans value(s) are not a class 0..17: {listed}"
        )
    duplicated = frame["ImageID"][frame["ImageID"].duplicated()].unique().tolist()
    if duplicated:
        raise OrchestratorError(
            f"{role} file {path} lists {len(duplicated)} ImageID(s) twice, e.g. {duplicated[:_LISTED]}"
        )
    return pd.DataFrame({"ImageID": frame["ImageID"], "ans": ans.astype(np.int64)})


def _macro_f1_present(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> tuple[float, np.ndarray]:
    """Macro F1 over the classes present in the answers or the predictions (scikit-learn's default).

    A test set rarely lacks a class, but a small one may: a class absent from both sides is left out, as
    the competition's scorer does, instead of counting as 0. Per-class F1 is NaN for such a class.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    per_class = f1_per_class(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(per_class[present].mean()), np.where(present, per_class, np.nan)


def score_arrays(y_true: Sequence[int], y_pred: Sequence[int]) -> dict:
    """Competition scores of predicted classes: f1 (macro), acc, mask/gender/age_f1, per_class_f1, n."""
    from trainers.labels import NUM_AGE, NUM_GENDER, NUM_MASK, decode

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or not len(y_true):
        raise ValueError(f"need two equally long 1-D label arrays, got {y_true.shape} and {y_pred.shape}")
    f1, per_class = _macro_f1_present(y_true, y_pred, NUM_CLASSES)
    scores = {"f1": f1, "acc": float((y_true == y_pred).mean())}
    for name, size, truth, predicted in zip(
        ("mask_f1", "gender_f1", "age_f1"),
        (NUM_MASK, NUM_GENDER, NUM_AGE),
        decode(y_true),
        decode(y_pred),
        strict=True,
    ):
        scores[name] = _macro_f1_present(truth, predicted, size)[0]
    scores["per_class_f1"] = [float(v) for v in per_class]
    scores["n"] = int(len(y_true))
    return scores


def score_submission_arrays(submission: Path, answers: Path) -> dict:
    """``score_arrays`` of a submission CSV against an answers CSV, after checking both list the same ids."""
    predicted = _read_labelled_csv(submission, "submission")
    truth = _read_labelled_csv(answers, "answers")
    truth_ids, predicted_ids = set(truth["ImageID"]), set(predicted["ImageID"])
    missing = [i for i in truth["ImageID"] if i not in predicted_ids]
    extra = [i for i in predicted["ImageID"] if i not in truth_ids]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} answer id(s) missing from the submission: {missing[:_LISTED]}")
        if extra:
            parts.append(f"{len(extra)} submission id(s) not in the answers: {extra[:_LISTED]}")
        raise OrchestratorError(
            f"submission {submission} and answers {answers} list different images; " + "; ".join(parts)
        )
    aligned = predicted.set_index("ImageID").loc[truth["ImageID"], "ans"].to_numpy()
    return score_arrays(truth["ans"].to_numpy(), aligned)


def score_submission(submission: Path, answers: Path) -> str:
    """`foldtune score`: macro F1, accuracy and per-task F1 of a submission, as printable text."""
    scores = score_submission_arrays(submission, answers)
    names = class_names()
    per_class = "  ".join(
        f"{i}:{f1:.2f}" if math.isfinite(f1) else f"{i}:-" for i, f1 in enumerate(scores["per_class_f1"])
    )
    return "\n".join(
        [
            f"{submission} vs {answers}: {scores['n']} images",
            f"macro F1 {scores['f1']:.4f}  accuracy {scores['acc']:.4f}",
            f"mask F1 {scores['mask_f1']:.4f}  gender F1 {scores['gender_f1']:.4f}  "
            f"age F1 {scores['age_f1']:.4f}",
            f"per-class F1 (0={names[0]} .. 17={names[17]}): {per_class}",
        ]
    )
