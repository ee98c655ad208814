"""``foldtune label-issues`` step by step: from a search folder to a ranked list, a relabel draft, contact
sheets and a review page.

The order is the ensemble stage's: check the arguments and the data root, find the OOF probabilities,
read and match the training table, find the issues, build the draft, render the sheets and the page, and
only then write the files (each atomically; stale sheets of an earlier run removed), so an error at any
step leaves the previous output whole. The data root is only read. MLflow is a copy of the result: a
tracking failure is a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from orchestrator.errors import OrchestratorError
from orchestrator.inspect.draft import build_draft
from orchestrator.inspect.judge import DEFAULT_MIN_PRECISION, DEFAULT_SEEDS, JudgeReport, measure_judge
from orchestrator.inspect.label_issues import KINDS, counts_by_kind, find_issues
from orchestrator.inspect.oof import check_data_root, load_search_oof, read_matching_train, with_holdout
from orchestrator.inspect.review import (
    ROWS_PER_SHEET,
    SHEETS_DIR,
    render_sheets,
    review_page,
    sheet_name,
)
from trainers.io import atomic_write_bytes, write_csv_atomic, write_text_atomic

DEFAULT_REVIEW_ROWS = 200  # findings on contact sheets (the rest are in label_issues.csv)
ARTIFACT_PATH = "label_issues"


@dataclass
class LabelIssuesResult:
    """What was found and where it was written."""

    out: Path
    issues: pd.DataFrame
    draft: pd.DataFrame
    counts: dict[str, int]  # flagged findings per kind
    files: list[Path] = field(default_factory=list)
    source: str = ""
    conflicts: int = 0  # new swaps overlapping one of the search's own overlay swaps in one image
    no_overlay_form: int = 0  # flagged findings the overlay cannot express
    unjudged_holdout: int = 0  # holdout persons without the ensemble's vote on them
    judge: JudgeReport | None = None  # the judge measured on this search (the draft's cuts)
    mlflow_run_id: str | None = None

    @property
    def review(self) -> Path:
        return self.out / "review.html"

    @property
    def draft_path(self) -> Path:
        return self.out / "relabel_draft.csv"


def summary_lines(result: LabelIssuesResult, persons: int, images: int) -> list[str]:
    """The short printed summary (also at the top of review.html): the judge, what it reaches per kind
    (measured on this search), what was flagged for review and what was drafted."""
    counts = ", ".join(f"{kind} {result.counts[kind]}" for kind in KINDS)
    lines = [
        f"judged {persons} persons / {images} images with the out-of-fold probabilities of {result.source}",
        f"flagged for review at the default cut (cleanlab; swaps from a likelihood ratio of 10): {counts}",
    ]
    if result.judge is not None:
        target = result.judge.min_precision
        lines.append(
            f"the judge measured on this search ({result.judge.seeds} seeded copies with known errors; "
            f"the draft keeps a kind above the cut where its precision reaches {target:g}):"
        )
        drafted = result.issues[result.issues["drafted"]]
        for kind, judged in result.judge.kinds.items():
            line = f"  {judged.line(result.judge.min_precision)}"
            if judged.cut is None:
                line += (
                    f"; {result.counts[kind]} listed for review - a longer search or `foldtune refit` "
                    "makes a stronger judge"
                )
            else:
                line += f"; {int((drafted['kind'] == kind).sum())} drafted"
            lines.append(line)
    lines.append(f"drafted fixes: {len(result.draft)} line(s) in {result.draft_path}")
    if result.unjudged_holdout:
        lines.append(
            f"{result.unjudged_holdout} holdout persons were not judged (they have no out-of-fold "
            "probabilities): run `foldtune ensemble` (without --tta/--folds) first, whose vote on them "
            "label-issues then uses (not with --trial)"
        )
    if result.no_overlay_form:
        lines.append(
            f"{result.no_overlay_form} flagged finding(s) have no overlay form (the overlay only swaps two "
            "pictures of one person): fix them in the data by hand"
        )
    if result.conflicts:
        lines.append(
            f"{result.conflicts} drafted swap(s) overlap a swap of the search's own label fixes in one "
            "picture and were left out: decide those by hand"
        )
    return lines


def run_label_issues(
    data_root: Path,
    search: str,
    storage: Path | None = None,
    out: Path | None = None,
    trial: str | None = None,
    tracking_uri: str | None = None,
    review_rows: int = DEFAULT_REVIEW_ROWS,
    min_precision: float = DEFAULT_MIN_PRECISION,
    judge_seeds: int = DEFAULT_SEEDS,
    log: Callable[[str], None] | None = print,
) -> LabelIssuesResult:
    """Find the likely label errors of search ``search``'s training data and write them for review."""
    log = log or (lambda message: None)
    if review_rows < 0:
        raise OrchestratorError(f"--review-rows must be 0 or more, got {review_rows}")
    if not 0 < min_precision <= 1:
        raise OrchestratorError(f"--min-precision must be in (0, 1], got {min_precision:g}")
    if judge_seeds < 1:
        raise OrchestratorError(f"--judge-seeds must be at least 1, got {judge_seeds}")
    data_root = check_data_root(Path(data_root))
    oof, unjudged = with_holdout(load_search_oof(search, storage, trial))
    out = Path(out) if out else oof.search_dir / "label_issues"
    table = read_matching_train(data_root, oof)
    issues = find_issues(table, oof.probs, oof.age_bands)
    judge = measure_judge(table, oof.probs, oof.age_bands, judge_seeds, min_precision)
    precision = {kind: judged.precision for kind, judged in judge.kinds.items()}
    draft, conflicts, used = build_draft(issues, judge.cuts, precision, oof.relabel)
    issues["drafted"] = issues.index.isin(used)
    flagged = issues[issues["flagged"].astype(bool)]
    result = LabelIssuesResult(
        out=out,
        issues=issues,
        draft=draft,
        counts=counts_by_kind(issues),
        source=oof.source,
        conflicts=conflicts,
        no_overlay_form=int((flagged["fix"] == "").sum()),
        unjudged_holdout=unjudged,
        judge=judge,
    )

    # render everything before writing anything; the sheets show the strongest evidence first, drafted
    # findings before the ones only listed for review
    listed = issues[issues["flagged"].astype(bool) | issues["drafted"]]
    listed = listed.sort_values(["drafted", "score"], ascending=[False, False], kind="mergesort")
    shown = listed.head(review_rows) if len(listed) else issues.head(min(review_rows, ROWS_PER_SHEET))
    sheets = render_sheets(shown, table, data_root.resolve())
    lines = summary_lines(result, table["person_id"].nunique(), len(table))
    page = review_page(shown, len(sheets), [*lines, apply_hint(result)], len(issues))

    # write: sheets, the lists, the page last (it links the rest); then stale sheets go
    written = [atomic_write_bytes(png, out / sheet_name(i)) for i, png in enumerate(sheets)]
    written.append(write_csv_atomic(issues.round(6), out / "label_issues.csv"))
    written.append(write_csv_atomic(judge.curves().round(6), out / "judge.csv"))
    written.append(write_csv_atomic(draft, result.draft_path))
    written.append(write_text_atomic(page, result.review))
    keep = {path.name for path in written}
    for stale in sorted((out / SHEETS_DIR).glob("sheet_*.png")):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    result.files = written

    for line in lines:
        log(line)
    log(f"review page: {result.review}")
    log(apply_hint(result))
    result.mlflow_run_id = _log_to_mlflow(oof, tracking_uri, out, written, log)
    return result


def apply_hint(result: LabelIssuesResult) -> str:
    return (
        f"after reviewing (delete the lines you reject), apply the fixes with: foldtune search ... "
        f"--relabel {result.draft_path}"
    )


def _log_to_mlflow(oof, tracking_uri: str | None, out: Path, files: list[Path], log) -> str | None:
    """Copy the output to the search's MLflow parent run under ``label_issues/``; a failure only warns."""
    try:
        from orchestrator.tracking.inspect_run import log_to_search_run

        run_id = log_to_search_run(
            oof.search_dir, oof.summary, oof.search, tracking_uri, out, files, ARTIFACT_PATH
        )
    except Exception as error:  # tracking is a copy of the result, not the result
        log(f"warning: the files are written but not logged to MLflow ({type(error).__name__}: {error})")
        return None
    if run_id is None:
        log("not logged to MLflow: the search recorded no tracking store (pass --tracking-uri to log)")
    else:
        log(f"logged to the search's MLflow run {run_id} under {ARTIFACT_PATH}/")
    return run_id
