"""The ensemble stage, step by step: from a finished search folder to a checked submission.

``run_ensemble`` reads as the list of its steps: check the arguments, discover the candidate trials,
select the members on out-of-fold (OOF) F1 (with the nested estimate of that selection), check their
checkpoints, predict with them (the eval images and any holdout persons, with refit models if asked),
combine their probabilities, describe the result and its estimates, write the side files and then the
submission, record it in MLflow.

The order is the point: every check that can fail fast runs before the slow predictions, everything is
computed before anything is written, and the submission is written last (atomically, after being re-read
and checked), so on any error no new submission exists and an old one is untouched. MLflow is a record of
the result, not the result: a tracking failure after the submission is a warning, not an error.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.ensemble.arguments import (
    check_device,
    check_folds,
    check_search_dir,
    check_tta,
    train_paths,
)
from orchestrator.ensemble.candidates import (
    PRUNED,
    Candidate,
    check_same_split,
    discover,
    left_out_by_search,
    most_folds,
    read_search_summary,
    shared_class_names,
)
from orchestrator.ensemble.estimates import (
    HOLDOUT_PROBS,
    Estimates,
    Holdout,
    holdout_of,
    write_holdout_probs,
)
from orchestrator.ensemble.members import (
    Predicted,
    check_member_checkpoints,
    predict_member,
    predict_models,
    select_again,
)
from orchestrator.ensemble.recording import record_in_mlflow
from orchestrator.ensemble.refit_mix import FORCED, mixed, refit_members, weigh_refit
from orchestrator.ensemble.result import (
    EnsembleMember,
    EnsembleResult,
    build_report,
    describe_tta,
    format_report,
)
from orchestrator.ensemble.selection import (
    DEFAULT_GREEDY_STEPS,
    Selection,
    macro_f1,
    nested_estimate,
    select,
    soft_vote,
)
from orchestrator.ensemble.submission import write_probs, write_submission
from orchestrator.errors import OrchestratorError
from trainers.io import write_text_atomic
from trainers.metrics import compute_metrics, flat_scalars, plot_confusion

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
    with_refit: bool | None = None,
) -> EnsembleResult:
    """Select members of search ``search`` on OOF F1, predict eval/images, write the submission last.

    ``tta`` None keeps each trial's own TTA views; a sequence (possibly empty) applies those views to every
    member, for the OOF estimate as well as for the submission. ``top`` takes the N best trials with equal
    weights instead of greedy selection. ``folds`` keeps only those fold models of each member (e.g. one
    fold model, to measure what the k-fold average adds); its OOF figures then cover those folds'
    validation images only. Each member's refit models (``foldtune refit``, a planned search's final
    model) join the vote the holdout persons score best (``refit_mix``; ``with_refit`` None); True: every
    model counts once, an error without any; False: left out.
    """
    from trainers.data import read_eval

    # check the arguments, the data and the device before anything slow
    log = log or (lambda message: None)
    data_root = Path(data_root)
    tta = check_tta(tta)
    if top is not None and top < 1:
        raise OrchestratorError(f"--top must be at least 1, got {top}")
    if batch_size < 1:
        raise OrchestratorError(f"--batch-size must be at least 1, got {batch_size}")
    search_dir = check_search_dir(search, storage)
    out = Path(out) if out else search_dir / "submission.csv"
    if cache_dir is None:
        from trainers.cache import default_cache_dir

        cache_dir = default_cache_dir()
    torch_device = check_device(device)
    eval_table = read_eval(data_root)  # fail fast: missing eval images are a DataError naming each one

    # discover the candidates; they must agree on images, folds, labels and classes
    pool = _discover(search_dir, folds)

    # select on stored OOF probabilities, best candidate first (ties: trial id)
    selection = select(pool.candidates, pool.labels, pool.rows, tta, top, greedy_steps)
    if top is not None and top > len(pool.candidates):
        log(f"--top {top}: only {len(pool.candidates)} usable trials, taking all of them")
    estimates = _selection_estimates(pool, selection, tta, top, greedy_steps)
    selection, refit = refit_members(search_dir, selection, with_refit, log)
    holdout = holdout_of(search_dir, pool.candidates, log)
    holdout_paths = train_paths(data_root, holdout.rel_path) if len(holdout) else []

    # fail fast on a bad checkpoint before any prediction
    for i in selection.chosen:
        check_member_checkpoints(selection.candidates[i], pool.folds)
    oof_paths = None
    if any(not selection.exact[i] for i in selection.chosen):
        oof_paths = train_paths(data_root, pool.candidates[0].rel_path)

    # predict (one fold model on the device at a time), combine, describe
    predicting = time.monotonic()
    predicted = _predict_members(
        pool,
        selection,
        tta,
        eval_table["image_path"].tolist(),
        oof_paths,
        Path(cache_dir),
        torch_device,
        batch_size,
        log,
        holdout_paths,
        refit,
    )
    if selection.method == "greedy" and any(m.recomputed for m in predicted.members):
        predicted = select_again(predicted, pool.labels, greedy_steps, log)
        estimates.selection_repeated = True  # the nested figure said which selection it describes
    if predicted.with_refit:
        weigh_refit(predicted, with_refit, holdout, len(eval_table), log)
    predict_s = round(time.monotonic() - predicting, 1)  # part of what a budget has to hold: reported
    log(f"prediction: {predict_s:.0f} s for {len(eval_table)} eval + {len(holdout_paths)} holdout images")
    result, confusion = _combine(pool, selection, predicted, tta, out, eval_table["image_id"].tolist())
    result.estimates = _holdout_estimates(estimates, holdout, predicted, result, len(eval_table))
    settings = {
        "greedy_max_steps": greedy_steps if selection.method == "greedy" else None,
        "top": top,
        "candidates": len(pool.candidates),
        "folds": ",".join(map(str, pool.folds)) if result.folds is not None else None,
        "with_refit": {t: len(paths) for t, paths in refit.items()} if refit else None,
        "refit_mix": predicted.refit_mix,
        "predict_seconds": predict_s,
        "refit_mix_holdout_f1": predicted.refit_mix_holdout,
    }
    candidates_oof_f1 = {
        c.trial_id: f for c, f in zip(selection.candidates, selection.single_f1, strict=True)
    }
    report = build_report(result, search, search_dir, settings, confusion, candidates_oof_f1)

    # everything is computed: write the side files, then the submission last
    _write_outputs(result, report, predicted, confusion, pool.class_names, holdout)

    # after the submission: the model folder `foldtune predict` reads, then the MLflow run and model
    bundle = _write_bundle(result, pool, search, log, refit, predicted.refit_mix)
    # made to compare (one trial alone, some fold models, other TTA), not to submit: not registered
    exploratory = top == 1 or folds is not None or tta is not None
    record_in_mlflow(
        result,
        report,
        pool.summary,
        search,
        search_dir,
        tracking_uri,
        settings,
        log,
        bundle,
        data_root,
        exploratory=exploratory,
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
    pruned: list[Candidate]  # trials whose checkpoints keep_top deleted but whose OOF is kept


def _discover(search_dir: Path, folds: Sequence[int] | None) -> _Pool:
    """The candidates, checked to agree on images, folds, labels and classes, and the rows to judge on."""
    summary = read_search_summary(search_dir)
    found, skipped = most_folds(*discover(search_dir, *left_out_by_search(summary), with_pruned=True))
    candidates = [c for c in found if c.checkpoints_kept]
    check_same_split(candidates)
    pruned = []  # OOF records only; one that does not match the candidates is just left out
    for c in (c for c in found if not c.checkpoints_kept):
        skipped[c.trial_id] = PRUNED
        try:
            check_same_split([candidates[0], c])
        except OrchestratorError:
            continue
        pruned.append(c)
    names = shared_class_names(candidates)
    k = len(candidates[0].checkpoints)
    use_folds = check_folds(folds, k)
    rows = np.isin(candidates[0].fold, use_folds)
    return _Pool(summary, candidates, skipped, names, k, use_folds, rows, candidates[0].label[rows], pruned)


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
    holdout_paths: list[str],
    refit: dict[str, list[Path]],
) -> Predicted:
    """Each member's eval (and holdout) probabilities and, when the stored ones do not match its TTA, its
    OOF again; with ``refit`` models, each counts as one more model in the member's average."""
    k, use_folds, rows, labels = pool.k, pool.folds, pool.rows, pool.labels
    predicted = Predicted(members=[], eval=[], oof=[], oof_plain=[], holdout=[], holdout_kfold=[])
    images = eval_paths + holdout_paths
    n_eval = len(eval_paths)
    for i in selection.chosen:
        candidate = selection.candidates[i]
        views = candidate.own_tta if tta is None else tta
        which = f"{k} folds" if len(use_folds) == k else f"fold(s) {','.join(map(str, use_folds))} of {k}"
        log(
            f"predicting with trial {candidate.trial_id} ({candidate.config.get('backbone')}, "
            f"{which}, TTA {describe_tta(views)})"
        )
        kfold_probs, recomputed = predict_member(
            candidate,
            views,
            not selection.exact[i],
            images,
            train_paths,
            cache_dir,
            device,
            batch_size,
            log,
            use_folds,
        )
        refit_paths, refit_probs = refit.get(candidate.trial_id) or [], None
        if refit_paths:
            predicted.with_refit = True
            log(f"  + {len(refit_paths)} refit model(s) of trial {candidate.trial_id}")
            refit_probs = predict_models(
                refit_paths, candidate.config, views, images, cache_dir, device, batch_size, log
            )
        counts = (len(use_folds), len(refit_paths))
        probs = mixed(kfold_probs, refit_probs, *counts, FORCED)  # until the holdout chooses (refit_mix)
        predicted.kfold_all.append(kfold_probs)
        predicted.refit_all.append(refit_probs)
        predicted.model_counts.append(counts)
        eval_probs = probs[:n_eval]
        predicted.holdout.append(probs[n_eval:])
        predicted.holdout_kfold.append(kfold_probs[n_eval:])
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


def _selection_estimates(
    pool: _Pool, selection: Selection, tta: tuple[str, ...] | None, top: int | None, greedy_steps: int
) -> Estimates:
    """The nested estimate of the selection (on the stored OOF probabilities it selected on), and the
    pruned trials selection would have picked had keep_top kept them; the in-sample and holdout figures
    are filled in once the members are predicted."""
    fold = pool.candidates[0].fold[pool.rows]
    nested = None
    if len(np.unique(fold)) > 1:
        ids = [c.trial_id for c in selection.candidates]
        nested = nested_estimate(selection.probs, pool.labels, fold, ids, top, greedy_steps)
    would_pick = []
    if pool.pruned:
        everything = select(pool.candidates + pool.pruned, pool.labels, pool.rows, tta, top, greedy_steps)
        would_pick = [
            everything.candidates[i].trial_id
            for i in everything.chosen
            if not everything.candidates[i].checkpoints_kept
        ]
    return Estimates(
        in_sample_f1=float("nan"),
        nested_f1=nested.f1 if nested else None,
        nested_fold_f1=nested.fold_f1 if nested else [],
        pruned_would_pick=would_pick,
    )


def _holdout_estimates(
    estimates: Estimates, holdout: Holdout, predicted: Predicted, result: EnsembleResult, test_images: int
) -> Estimates:
    """The in-sample figure, and the submission's vote scored on the holdout persons (when any)."""
    estimates.in_sample_f1 = result.oof_f1
    if not len(holdout):
        return estimates
    weights = np.array([m.weight for m in predicted.members], dtype=np.float64)
    estimates.score_holdout(holdout, soft_vote(weights, predicted.holdout), test_images)
    if predicted.with_refit:
        estimates.holdout_f1_kfold = macro_f1(holdout.label, soft_vote(weights, predicted.holdout_kfold))
    estimates.holdout_best_single_f1 = macro_f1(holdout.label, predicted.holdout_kfold[0])
    return estimates


def _combine(
    pool: _Pool,
    selection: Selection,
    predicted: Predicted,
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
    predicted: Predicted,
    confusion: np.ndarray,
    names: list[str],
    holdout: Holdout,
) -> None:
    """The holdout vote, ensemble.json, the probabilities and the confusion plot, then the submission, each
    atomically."""
    result.submission.parent.mkdir(parents=True, exist_ok=True)
    if len(holdout):  # label-issues judges the holdout persons by the k-fold vote (no model trained on them)
        write_holdout_probs(
            result.report_path.parent / HOLDOUT_PROBS,
            holdout,
            soft_vote(np.array([m.weight for m in result.members]), predicted.holdout_kfold),
            [m.trial_id for m in result.members],
            own_tta=result.tta is None,
            all_folds=result.folds is None,
        )
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
    result: EnsembleResult,
    pool: _Pool,
    search: str,
    log: Callable[[str], None],
    refit: dict[str, list[Path]] | None = None,
    mix: str | None = None,
) -> Path | None:
    """The ensemble's model folder next to the submission (members' used fold checkpoints + spec, the refit
    models as the vote ``mix`` used them); after the submission, so a failure only warns (and leaves no
    stale model: the folder is replaced or removed)."""
    from orchestrator.ensemble.bundle import BUNDLE_DIR, member_from_config, write_bundle

    target = result.submission.parent / BUNDLE_DIR
    try:
        candidates = {c.trial_id: c for c in pool.candidates}
        refit = {} if mix == "folds" else (refit or {})
        members = [
            member_from_config(
                m.trial_id,
                m.weight,
                m.tta,
                candidates[m.trial_id].config,
                [] if mix == "refit" and refit.get(m.trial_id) else pool.folds,
                m.oof_f1,
                refit=len(refit.get(m.trial_id) or []),
            )
            for m in result.members
        ]
        sources = {
            m.trial_id: {
                **dict(enumerate(candidates[m.trial_id].checkpoints)),
                **{f"refit{i}": path for i, path in enumerate(refit.get(m.trial_id) or [])},
            }
            for m in result.members
        }
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
