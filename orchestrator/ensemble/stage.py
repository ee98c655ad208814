"""The ensemble stage, step by step: from a finished search folder to a checked submission.

``run_ensemble`` reads as the list of its steps: check the arguments, discover the candidate trials,
select the members on out-of-fold (OOF) F1, check their checkpoints, predict with them, combine their
probabilities, describe the result, write the side files and then the submission, record it in MLflow.

The order is the point: every check that can fail fast runs before the slow predictions, everything is
computed before anything is written, and the submission is written last (atomically, after being re-read
and checked), so on any error no new submission exists and an old one is untouched. MLflow is a record of
the result, not the result: a tracking failure after the submission is a warning, not an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.ensemble.candidates import (
    Candidate,
    check_same_split,
    discover,
    left_out_by_search,
    read_search_summary,
    shared_class_names,
)
from orchestrator.ensemble.members import check_member_checkpoints, predict_member
from orchestrator.ensemble.result import (
    EnsembleMember,
    EnsembleResult,
    build_report,
    describe_tta,
    format_report,
)
from orchestrator.ensemble.selection import DEFAULT_GREEDY_STEPS, Selection, macro_f1, select, soft_vote
from orchestrator.ensemble.submission import write_probs, write_submission
from orchestrator.errors import OrchestratorError
from trainers.io import write_text_atomic
from trainers.metrics import compute_metrics, flat_scalars, plot_confusion

DEFAULT_STORAGE = Path("runs")

# ----------------------------------------------------------------------------------------------------------
# checking the arguments


def _check_tta(tta: Sequence[str] | None) -> tuple[str, ...] | None:
    from trainers.transforms import TTA_VIEWS  # here: transforms pulls in torch, the CLI imports this package

    if tta is None:
        return None
    views = tuple(str(v).strip() for v in tta if str(v).strip())
    unknown = TTA_VIEWS.unknown(views)
    if unknown:
        raise OrchestratorError(
            f"--tta: unknown view(s) {unknown}; use a comma-separated subset of {list(TTA_VIEWS.names())}"
        )
    return views


def _check_search_dir(search: str, storage: Path | None) -> Path:
    search_dir = Path(storage or DEFAULT_STORAGE) / search
    if not search_dir.is_dir():
        raise OrchestratorError(
            f"search folder {search_dir} not found; run `foldtune search --name {search}` first, or pass the "
            "--storage the search used"
        )
    return search_dir


def _check_device(device: str):
    from trainers.predict import pick_device

    try:
        return pick_device(device)
    except RuntimeError as error:
        raise OrchestratorError(str(error)) from None


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


# ----------------------------------------------------------------------------------------------------------
# the stage


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

    # check the arguments, the data and the device before anything slow
    log = log or (lambda message: None)
    data_root = Path(data_root)
    tta = _check_tta(tta)
    if top is not None and top < 1:
        raise OrchestratorError(f"--top must be at least 1, got {top}")
    if batch_size < 1:
        raise OrchestratorError(f"--batch-size must be at least 1, got {batch_size}")
    search_dir = _check_search_dir(search, storage)
    out = Path(out) if out else search_dir / "submission.csv"
    if cache_dir is None:
        from trainers.cache import default_cache_dir

        cache_dir = default_cache_dir()
    torch_device = _check_device(device)
    eval_table = read_eval(data_root)  # fail fast: missing eval images are a DataError naming each one

    # discover the candidates; they must agree on images, folds, labels and classes
    pool = _discover(search_dir, folds)

    # select on stored OOF probabilities, best candidate first (ties: trial id)
    selection = select(pool.candidates, pool.labels, pool.rows, tta, top, greedy_steps)
    if top is not None and top > len(pool.candidates):
        log(f"--top {top}: only {len(pool.candidates)} usable trials, taking all of them")

    # fail fast on a bad checkpoint before any prediction
    for i in selection.chosen:
        check_member_checkpoints(selection.candidates[i], pool.folds)
    train_paths = None
    if any(not selection.exact[i] for i in selection.chosen):
        train_paths = _train_paths(data_root, pool.candidates[0].rel_path)

    # predict (one fold model on the device at a time), combine, describe
    predicted = _predict_members(
        pool,
        selection,
        tta,
        eval_table["image_path"].tolist(),
        train_paths,
        Path(cache_dir),
        torch_device,
        batch_size,
        log,
    )
    result, confusion = _combine(pool, selection, predicted, tta, out, eval_table["image_id"].tolist())
    settings = {
        "greedy_max_steps": greedy_steps if selection.method == "greedy" else None,
        "top": top,
        "candidates": len(pool.candidates),
        "folds": ",".join(map(str, pool.folds)) if result.folds is not None else None,
    }
    candidates_oof_f1 = {
        c.trial_id: f for c, f in zip(selection.candidates, selection.single_f1, strict=True)
    }
    report = build_report(result, search, search_dir, settings, confusion, candidates_oof_f1)

    # everything is computed: write the side files, then the submission last
    _write_outputs(result, report, predicted, confusion, pool.class_names)

    # after the submission: the model folder `foldtune predict` reads, then the MLflow run and model
    bundle = _write_bundle(result, pool, search, log)
    _record_in_mlflow(
        result, report, pool.summary, search, search_dir, tracking_uri, settings, log, bundle, data_root
    )
    log(format_report(result))
    return result


# ----------------------------------------------------------------------------------------------------------
# the steps


@dataclass
class _Pool:
    """A search's usable trials, and the OOF rows and labels their chosen fold models are judged on."""

    summary: dict  # what the search recorded (read_search_summary)
    candidates: list[Candidate]  # in trial id order
    skipped: dict[str, str]  # trial id -> why it is not a candidate
    class_names: list[str]
    k: int  # fold models per trial
    folds: list[int]  # the fold models used
    rows: np.ndarray  # boolean mask of the OOF rows those fold models can be judged on
    labels: np.ndarray  # the labels of those rows


def _discover(search_dir: Path, folds: Sequence[int] | None) -> _Pool:
    """The candidates, checked to agree on images, folds, labels and classes, and the rows to judge on."""
    summary = read_search_summary(search_dir)
    candidates, skipped = discover(search_dir, *left_out_by_search(summary))
    check_same_split(candidates)
    names = shared_class_names(candidates)
    k = len(candidates[0].checkpoints)
    use_folds = _check_folds(folds, k)
    rows = np.isin(candidates[0].fold, use_folds)
    return _Pool(summary, candidates, skipped, names, k, use_folds, rows, candidates[0].label[rows])


@dataclass
class _Predicted:
    """The members and their probabilities, in member order."""

    members: list[EnsembleMember]
    eval: list[np.ndarray]  # (N eval images, 18) each, float64
    oof: list[np.ndarray]  # OOF on the judged rows with the member's TTA
    oof_plain: list[np.ndarray]  # OOF on the judged rows without TTA


def _predict_members(
    pool: _Pool,
    selection: Selection,
    tta: tuple[str, ...] | None,
    eval_paths: list[str],
    train_paths: list[str] | None,
    cache_dir: Path,
    device,
    batch_size: int,
    log: Callable[[str], None],
) -> _Predicted:
    """Each member's eval probabilities and, when the stored ones do not match its TTA, its OOF again."""
    k, use_folds, rows, labels = pool.k, pool.folds, pool.rows, pool.labels
    predicted = _Predicted(members=[], eval=[], oof=[], oof_plain=[])
    for i in selection.chosen:
        candidate = selection.candidates[i]
        views = candidate.own_tta if tta is None else tta
        which = f"{k} folds" if len(use_folds) == k else f"fold(s) {','.join(map(str, use_folds))} of {k}"
        log(
            f"predicting with trial {candidate.trial_id} ({candidate.config.get('backbone')}, "
            f"{which}, TTA {describe_tta(views)})"
        )
        eval_probs, recomputed = predict_member(
            candidate,
            views,
            not selection.exact[i],
            eval_paths,
            train_paths,
            cache_dir,
            device,
            batch_size,
            log,
            use_folds,
        )
        oof = recomputed[rows] if recomputed is not None else selection.probs[i]
        plain = candidate.probs[rows]
        predicted.eval.append(eval_probs)
        predicted.oof.append(oof)
        predicted.oof_plain.append(plain)
        predicted.members.append(
            EnsembleMember(
                trial_id=candidate.trial_id,
                run_dir=candidate.run_dir,
                backbone=str(candidate.config.get("backbone")),
                count=selection.counts[i],
                weight=selection.counts[i] / selection.total,
                tta=tuple(views),
                oof_f1=macro_f1(labels, oof),
                oof_f1_no_tta=macro_f1(labels, plain),
                recomputed=recomputed is not None,
            )
        )
    return predicted


def _combine(
    pool: _Pool,
    selection: Selection,
    predicted: _Predicted,
    tta: tuple[str, ...] | None,
    out: Path,
    image_ids: list[str],
) -> tuple[EnsembleResult, np.ndarray]:
    """Soft vote of the members' probabilities, weighted by their share of the picks, and its OOF scores;
    with the OOF confusion matrix (for the report and the plot)."""
    labels = pool.labels
    weights = np.array([m.weight for m in predicted.members], dtype=np.float64)
    ensemble_oof = soft_vote(weights, predicted.oof)
    oof_metrics = compute_metrics(labels, ensemble_oof)
    best = predicted.members[0]  # the best candidate is the first member (greedy starts there; top-N sorts)
    result = EnsembleResult(
        submission=out,
        probs_path=out.with_suffix(".npz"),
        report_path=out.parent / "ensemble.json",
        plot_path=out.parent / "ensemble_confusion.png",
        method=selection.method,
        tta=tta,
        members=predicted.members,
        oof_f1=float(oof_metrics["f1"]),
        oof_f1_no_tta=macro_f1(labels, soft_vote(weights, predicted.oof_plain)),
        best_single_trial=best.trial_id,
        best_single_f1=best.oof_f1,
        metrics={
            "scalars": flat_scalars(oof_metrics),
            "per_class_f1": dict(zip(pool.class_names, oof_metrics["per_class_f1"], strict=True)),
        },
        eval_probs=soft_vote(weights, predicted.eval),
        image_ids=image_ids,
        oof_rel_path=pool.candidates[0].rel_path[pool.rows],
        oof_labels=labels,
        oof_probs=ensemble_oof,
        member_oof_probs={m.trial_id: p for m, p in zip(predicted.members, predicted.oof, strict=True)},
        skipped=pool.skipped,
        folds=None if len(pool.folds) == pool.k else tuple(pool.folds),
    )
    return result, np.asarray(oof_metrics["confusion"])


def _write_outputs(
    result: EnsembleResult,
    report: dict,
    predicted: _Predicted,
    confusion: np.ndarray,
    names: list[str],
) -> None:
    """ensemble.json, the probabilities and the confusion plot, then the submission, each atomically."""
    result.submission.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(report, indent=2, default=float), result.report_path)
    write_probs(
        result.probs_path,
        result.image_ids,
        result.eval_probs,
        [m.trial_id for m in result.members],
        np.stack(predicted.eval),
        [m.weight for m in result.members],
    )
    plot_confusion(
        confusion,
        names,
        result.plot_path,
        title=f"ensemble out-of-fold confusion (macro F1 {result.oof_f1:.3f})",
    )
    write_submission(result.submission, result.image_ids, result.eval_probs.argmax(axis=1))


def _write_bundle(
    result: EnsembleResult, pool: _Pool, search: str, log: Callable[[str], None]
) -> Path | None:
    """The ensemble's model folder next to the submission (members' used fold checkpoints + spec); after the
    submission, so a failure only warns (and leaves no stale model: the folder is replaced or removed)."""
    from orchestrator.ensemble.bundle import BUNDLE_DIR, member_from_config, write_bundle

    target = result.submission.parent / BUNDLE_DIR
    try:
        candidates = {c.trial_id: c for c in pool.candidates}
        members = [
            member_from_config(
                m.trial_id, m.weight, m.tta, candidates[m.trial_id].config, pool.folds, m.oof_f1
            )
            for m in result.members
        ]
        sources = {m.trial_id: dict(enumerate(candidates[m.trial_id].checkpoints)) for m in result.members}
        age_edges = candidates[result.members[0].trial_id].config.get("age_edges", (30, 60))
        info = {"search": search, "oof_f1": result.oof_f1, "submission": str(result.submission.absolute())}
        write_bundle(target, members, sources, pool.class_names, age_edges, info)
    except Exception as error:  # the submission is the result; the model folder is a convenience
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        log(
            f"warning: the submission is written but the model folder {target} is not "
            f"({type(error).__name__}: {error})"
        )
        return None
    log(f"model folder: {target} (`foldtune predict --model` it)")
    return target


def _record_in_mlflow(
    result: EnsembleResult,
    report: dict,
    summary: dict,
    search: str,
    search_dir: Path,
    tracking_uri: str | None,
    settings: dict,
    log: Callable[[str], None],
    bundle: Path | None = None,
    data_root: Path | None = None,
) -> None:
    """Log the run (its id goes into the result and ensemble.json), then the model folder as an MLflow model
    registered under the search's name; a failure of either only warns."""
    try:
        from orchestrator.tracking.ensemble_run import log_ensemble_run

        result.mlflow_run_id = log_ensemble_run(
            result, summary, search, search_dir, tracking_uri, settings, data_root=data_root
        )
    except Exception as error:  # tracking is a record of the result, not the result: keep the submission
        log(
            f"warning: the submission is written but logging the ensemble to MLflow failed "
            f"({type(error).__name__}: {error}); check the tracking URI / MLFLOW_TRACKING_URI"
        )
        return
    report["mlflow_run_id"] = result.mlflow_run_id
    if bundle is not None:
        try:
            from orchestrator.tracking.ensemble_model import log_ensemble_model

            registered = log_ensemble_model(bundle, result.mlflow_run_id, search, tracking_uri, summary)
        except Exception as error:
            log(
                f"warning: the submission and the MLflow run are written but logging the ensemble as an "
                f"MLflow model failed ({type(error).__name__}: {error})"
            )
        else:
            report["registered_model"] = registered.model_uri
            log(f"MLflow model: {registered.model_uri}")
    write_text_atomic(json.dumps(report, indent=2, default=float), result.report_path)
