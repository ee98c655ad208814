"""The planned search against one model of the same compute: both at once, one CPU core each.

    python -m benchmarks.equal_compute --data /tmp/aafmask --minutes 30 --out /tmp/b24/T30   # bench-budget

Two processes start together, each pinned to its own core (``taskset``), so the comparison costs T minutes
of wall clock, not 2T, and neither arm gets more compute than the other:

- **search** (core 0): ``foldtune search --space S --time-budget T`` with ``S`` = ``cpu.yaml`` at one
  1-thread trial at a time (``max_concurrent: 1``), then ``foldtune ensemble`` (its prediction time is
  reported, not part of T) and ``foldtune score`` against ``eval/answers.csv``;
- **single model** (core 1): ``benchmarks.single_model`` with 1 thread on 90% of the persons, stopping at
  its best epoch on the other 10% (``--val-slice 10``), for as many epochs as T holds at the measured
  seconds per epoch (``--epoch-seconds``, 180 s for lite0 at 96x72 on one core here), with the space's
  fixed values and each searched parameter at the middle of its range (what a user would try first).

``--single best`` trains the single model with the search's chosen configuration instead (its
``final.json``; the epochs from the search's measured cost), after the search arm has chosen it. Each arm's
output is in ``OUT/search`` and ``OUT/single_*``; ``OUT/row.json`` has the eval macro F1 of both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
MIDDLE = {"backbone": "tf_efficientnet_lite0", "lr": 3.0e-3, "focal_gamma": 1.25, "freeze_depth": 2}
SEARCHED = tuple(MIDDLE)
LITE0_EPOCH_S = 180.0  # one 1-thread epoch of lite0 at 96x72 on 90% of AAF-Mask's persons, measured here
TRAIN_IMAGES = 19110  # AAF-Mask's training images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--minutes", required=True, type=float)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--space", type=Path, default=ROOT / "search_spaces" / "cpu.yaml")
    parser.add_argument("--seed", type=int, default=42, help="the search's and the single model's seed")
    parser.add_argument(
        "--single",
        choices=("middle", "best", "none"),
        default="middle",
        help="the single-model arm beside the search (none: the search arm alone, e.g. after a change to "
        "the search when the single-model rows of that T and seed are already measured)",
    )
    parser.add_argument(
        "--core", type=int, default=0, help="the search arm's core (the single model: the other)"
    )
    parser.add_argument("--epoch-seconds", type=float, default=LITE0_EPOCH_S)
    parser.add_argument(
        "--folds-seed",
        type=int,
        default=None,
        help="draw the holdout persons and folds with this seed instead of the space's folds_seed (42): "
        "the holdout estimate's error against eval is a property of the persons drawn, so judging it takes "
        "several independent draws",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    foldtune = [python, "-m", "orchestrator.cli"]
    row: dict = {"minutes": args.minutes, "seed": args.seed}
    if args.folds_seed is not None:
        row["folds_seed"] = args.folds_seed

    if args.single == "best":  # the search arm ran before: its chosen configuration, its measured cost
        search_dir = args.out / "search" / "cpu"
        final = json.loads((search_dir / "final.json").read_text())
        config = yaml.safe_load((search_dir / "trials" / final["trial_id"] / "config.yaml").read_text())
        params = {key: config[key] for key in SEARCHED}
        epoch_s = final["seconds_per_image"] * (0.9 * TRAIN_IMAGES + 0.1 * TRAIN_IMAGES / 3)
        row["single_best"] = _single(python, args, params, epoch_s, "single_best")
    else:
        space = _one_at_a_time(args.space, args.out / "space.yaml", args.seed, args.folds_seed)
        started = time.time()
        search = _pinned(
            args.core,
            [
                *foldtune,
                "search",
                "--data",
                str(args.data),
                "--space",
                str(space),
                "--name",
                "cpu",
                "--storage",
                str(args.out / "search"),
                "--time-budget",
                str(args.minutes),
            ],
            args.out / "search.log",
        )
        single = (
            None
            if args.single == "none"
            else _single_process(python, args, MIDDLE, args.epoch_seconds, "single_middle")
        )
        search.wait()
        row["search_s"] = round(time.time() - started, 1)
        began = time.time()
        _pinned(
            args.core,
            [
                *foldtune,
                "ensemble",
                "--data",
                str(args.data),
                "--search",
                "cpu",
                "--storage",
                str(args.out / "search"),
            ],
            args.out / "ensemble.log",
        ).wait()
        row["ensemble_s"] = round(time.time() - began, 1)
        row["search"] = _score(args.out / "search" / "cpu" / "submission.csv", args.data)
        row["estimate"] = _estimate(args.out / "search" / "cpu" / "ensemble.json", row["search"]["f1"])
        if single is not None:
            single.wait()
            row["single_middle"] = json.loads((args.out / "single_middle" / "single_model.json").read_text())
    (args.out / "row.json").write_text(json.dumps(row, indent=2, default=float))
    print(json.dumps(row, indent=2, default=float))
    return 0


def _estimate(report: Path, eval_f1: float) -> dict:
    """The ensemble's trusted figure and intervals beside what eval scored: is the figure within ±0.03 of
    eval, and does each interval cover it."""
    estimates = json.loads(report.read_text())["estimates"]
    figure = estimates.get("trusted_f1")
    row = {"trusted": estimates.get("trusted"), "f1": figure}
    if figure is not None:
        row["minus_eval"] = figure - eval_f1
        row["within_0.03"] = abs(figure - eval_f1) <= 0.03
    for name in ("holdout_interval", "test_interval"):
        if estimates.get(name):
            low, high = estimates[name]
            row[name] = [low, high]
            row[f"{name}_covers_eval"] = low <= eval_f1 <= high
    return row


def _one_at_a_time(space: Path, out: Path, seed: int, folds_seed: int | None = None) -> Path:
    """The space with one 1-thread trial at a time (the search arm's one core), the given seed and, when
    given, the given folds_seed (another draw of holdout persons and folds)."""
    raw = yaml.safe_load(space.read_text())
    raw["max_concurrent"] = 1
    raw["sampler"] = {**(raw.get("sampler") or {}), "seed": seed}
    raw["fixed"] = {**raw["fixed"], "seed": seed}
    if folds_seed is not None:
        raw["fixed"]["folds_seed"] = folds_seed
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


def _pinned(core: int, command: list[str], log: Path) -> subprocess.Popen:
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        ["taskset", "-c", str(core), *command],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env={**os.environ, **env},
    )


def _single_process(python: str, args, params: dict, epoch_s: float, name: str) -> subprocess.Popen:
    epochs = max(1, math.floor(args.minutes * 60 / epoch_s))
    sets = [
        item for key, value in {**params, "seed": args.seed}.items() for item in ("--set", f"{key}={value}")
    ]
    command = [
        python,
        "-m",
        "benchmarks.single_model",
        "--data",
        str(args.data),
        "--space",
        str(args.space),
        *sets,
        "--epochs",
        str(epochs),
        "--threads",
        "1",
        "--val-slice",
        "10",
        "--out",
        str(args.out / name),
    ]
    return _pinned(1 - args.core, command, args.out / f"{name}.log")


def _single(python: str, args, params: dict, epoch_s: float, name: str) -> dict:
    _single_process(python, args, params, epoch_s, name).wait()
    return json.loads((args.out / name / "single_model.json").read_text())


def _score(submission: Path, data: Path) -> dict:
    from orchestrator.ensemble.submission import score_submission_arrays

    scores = score_submission_arrays(submission, data / "eval" / "answers.csv")
    return {key: scores[key] for key in ("f1", "acc", "mask_f1", "gender_f1", "age_f1")}


if __name__ == "__main__":
    raise SystemExit(main())
