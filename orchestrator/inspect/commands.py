"""The ``label-issues`` and ``explain`` subcommands, added to ``foldtune``'s parser by ``add_commands``.

Kept here rather than in orchestrator/cli.py so the inspect room owns its own arguments; the CLI adds
them with one call. Imports of the heavy parts (cleanlab, torch, grad-cam) happen when a command runs,
so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_label_issues(args: argparse.Namespace) -> int:
    from orchestrator.inspect.stage import run_label_issues

    run_label_issues(
        data_root=Path(args.data),
        search=args.search,
        storage=Path(args.storage) if args.storage else None,
        out=Path(args.out) if args.out else None,
        trial=args.trial,
        tracking_uri=args.tracking_uri,
        review_rows=args.review_rows,
        min_precision=args.min_precision,
        judge_seeds=args.judge_seeds,
    )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from orchestrator.inspect.explain_stage import run_explain

    run_explain(
        data_root=Path(args.data),
        search=args.search,
        storage=Path(args.storage) if args.storage else None,
        trial=args.trial,
        n=args.n,
        out=Path(args.out) if args.out else None,
        device=args.device,
        tracking_uri=args.tracking_uri,
        seed=args.seed,
    )
    return 0


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="the data root the search was trained on (with train/)")
    p.add_argument("--search", required=True, help="search name")
    p.add_argument("--storage", help="folder holding the searches (default ./runs)")
    p.add_argument(
        "--trial",
        help="judge with this trial alone (default: the ensemble's members as weighted in ensemble.json, "
        "else the best trial by out-of-fold macro F1)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow store to log to (default: the one the search recorded; none recorded: not logged)",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``label-issues`` and ``explain`` to the subparsers of ``foldtune``."""
    p = sub.add_parser(
        "label-issues",
        help="rank likely label errors from a search's out-of-fold predictions (cleanlab); write contact "
        "sheets, review.html and a relabel draft",
    )
    _search_args(p)
    p.add_argument("--out", help="output folder (default <search folder>/label_issues)")
    p.add_argument(
        "--review-rows",
        type=int,
        default=200,
        help="findings shown on contact sheets and review.html (default 200; all are in label_issues.csv)",
    )
    p.add_argument(
        "--min-precision",
        type=float,
        default=0.5,
        help="draft a kind of fix only above the cut where this search's judge, measured on copies of its "
        "labels with known errors, reaches this precision (default 0.5)",
    )
    p.add_argument(
        "--judge-seeds", type=int, default=10, help="seeded copies the judge is measured on (default 10)"
    )
    p.set_defaults(func=cmd_label_issues)

    p = sub.add_parser(
        "explain",
        help="Grad-CAM attention maps of one trial's fold models on its most confident out-of-fold errors "
        "and a sample per class",
    )
    _search_args(p)
    p.add_argument("--n", type=int, default=16, help="images per grid: errors, and class samples (16)")
    p.add_argument("--out", help="output folder (default <search folder>/explain)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--seed", type=int, default=0, help="seed of the class sample (0)")
    p.set_defaults(func=cmd_explain)
