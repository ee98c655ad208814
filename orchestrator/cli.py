"""The ``foldtune`` command: thin entry points over trainers/ and orchestrator/.

Every known failure (bad data, bad config, missing weights, a corrupt checkpoint) ends as one readable
``error:`` message and exit code 2, never a traceback from deep inside a library.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.signals import Terminated, on_sigterm, raise_terminated
from trainers.errors import FoldtuneError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def holdout_arg(text: str) -> float | str:
    """``--holdout``: a share of persons, or ``auto`` (``trainers.folds.holdout_share``)."""
    from trainers.folds import HOLDOUT_WANTED, holdout_value

    if (parsed := holdout_value(text)) is None:
        raise argparse.ArgumentTypeError(f"{text!r}: use {HOLDOUT_WANTED}")
    return parsed


def _age_edges(text: str) -> tuple[int, int]:
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--age-edges wants two ages like 30,60, got {text!r}") from None
    return low, high


def cmd_check_data(args: argparse.Namespace) -> int:
    from trainers.data import read_eval, read_train, summarize
    from trainers.labels import AgeBands

    data = read_train(
        Path(args.data), AgeBands(args.age_edges), relabel=args.relabel, decode_images=args.decode
    )
    print(summarize(data))
    if (Path(args.data) / "eval" / "info.csv").exists():
        eval_table = read_eval(Path(args.data), decode_images=args.decode)
        print(f"eval: {len(eval_table)} images listed in eval/info.csv, all present")
    return 0


def cmd_folds(args: argparse.Namespace) -> int:
    from trainers.data import read_train
    from trainers.folds import FoldWarning, fold_summary, make_folds, write_folds
    from trainers.labels import AgeBands

    data = read_train(Path(args.data), AgeBands(args.age_edges), relabel=args.relabel)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FoldWarning)
        folds = make_folds(data.table, k=args.k, seed=args.seed, holdout=args.holdout)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    out = Path(args.out or Path(args.data) / f"folds_k{args.k}_seed{args.seed}.csv")
    write_folds(folds, out)
    print(fold_summary(folds, data.table, data.age_bands))
    print(f"fold file written: {out}\nuse it with: foldtune train|search ... --folds {out}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from orchestrator.demo.data import write_demo_data

    summary = write_demo_data(
        Path(args.out), persons=args.persons, eval_persons=args.eval_persons, seed=args.seed
    )
    print(summary)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from trainers.cache import default_cache_dir
    from trainers.config import ConfigError, TrainConfig
    from trainers.data import read_train
    from trainers.fit import fit
    from trainers.folds import make_folds, read_folds
    from trainers.labels import AgeBands

    config_path = Path(args.config)
    try:
        values = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read config {config_path}: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config {config_path} must be a mapping of TrainConfig keys")
    cfg = TrainConfig.from_dict(values)
    data = read_train(Path(args.data), AgeBands(tuple(cfg.age_edges)), relabel=args.relabel)
    if args.folds:
        folds = read_folds(args.folds)  # fit checks it covers these images with k folds
    else:
        folds = make_folds(data.table, k=cfg.k, seed=cfg.folds_seed)
    run_dir = Path(args.out or Path("runs") / "train" / config_path.stem).absolute()
    result = fit(cfg, data.table, folds, run_dir, Path(args.cache_dir or default_cache_dir()))
    print(f"run folder: {run_dir}")
    return 0 if result.status != "diverged" else 1


def cmd_search(args: argparse.Namespace) -> int:
    """Exit 0 only when the search finished with a usable trial; else 1 with one line on stderr saying why
    (interrupted: how many trials finished and to continue with --resume; every trial failed: the first
    error; nothing finished)."""
    from orchestrator.search import run_search

    try:
        summary = run_search(
            data_root=Path(args.data),
            space_path=args.space,
            trials=args.trials,
            name=args.name,
            resume=args.resume,
            address=args.address,
            storage=Path(args.storage) if args.storage else None,
            cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial,
            relabel=args.relabel,
            tracking_uri=args.tracking_uri,
            folds_file=args.folds,
            hash_images=args.hash_images,
            holdout=args.holdout,
            time_budget_minutes=args.time_budget,
        )
    except KeyboardInterrupt as interrupted:  # SearchInterrupted says what finished; a bare one cannot
        line = str(interrupted) or "search interrupted before its first trial; continue with --resume"
        print(line, file=sys.stderr)
        return 1
    problem = summary.problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from orchestrator.ensemble import run_ensemble

    run_ensemble(
        data_root=Path(args.data),
        search=args.search,
        storage=Path(args.storage) if args.storage else None,
        top=args.top,
        tta=tuple(v for v in args.tta.split(",") if v) if args.tta is not None else None,
        out=Path(args.out) if args.out else None,
        batch_size=args.batch_size,
        folds=_int_list(args.folds, "--folds") if args.folds is not None else None,
        with_refit=args.with_refit,
    )
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OrchestratorError(f"{flag}: expected comma-separated integers like 0,2, got {text!r}") from None


def cmd_score(args: argparse.Namespace) -> int:
    from orchestrator.ensemble import score_submission

    print(score_submission(Path(args.submission), Path(args.answers)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from orchestrator.ensemble.arguments import DEFAULT_STORAGE
    from orchestrator.ensemble.predictor import (
        EnsemblePredictor,
        list_images,
        predictions_frame,
        resolve_bundle,
    )
    from trainers.io import write_csv_atomic

    if args.batch_size < 1:
        raise OrchestratorError(f"--batch-size must be at least 1, got {args.batch_size}")
    tta = tuple(v for v in args.tta.split(",") if v.strip()) if args.tta is not None else None
    images = list_images(args.images)  # before loading any model: a wrong folder fails at once
    if args.model.startswith("models:/"):
        from orchestrator.tracking.ensemble_model import load_registered_predictor

        predictor = load_registered_predictor(args.model, args.tracking_uri, device=args.device)
    else:
        bundle = resolve_bundle(args.model, Path(args.storage) if args.storage else DEFAULT_STORAGE)
        predictor = EnsemblePredictor.from_folder(bundle, device=args.device)
    print(f"{args.model}: {predictor.describe()}", flush=True)
    every, batches = max(1, args.progress_every), [0]

    def progress(done: int, total: int) -> None:  # called after each batch
        batches[0] += 1
        if batches[0] % every == 0 or done == total:
            print(f"predicted {done}/{total} images", flush=True)

    prediction = predictor.predict(images.paths, batch_size=args.batch_size, tta=tta, progress=progress)
    out = Path(args.out)
    write_csv_atomic(predictions_frame(images.names, prediction), out)
    failed = prediction.failed
    note = f"{failed} could not be read (see the error column)" if failed else "none failed"
    print(f"predictions for {len(images.paths)} images written to {out}; {note}")
    return 1 if failed == len(images.paths) else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from orchestrator.doctor import run_doctor, which_space

    if args.which_space:
        print(which_space(args.address))
        return 0
    return run_doctor(
        space=args.space,
        storage=args.storage,
        data=args.data,
        tracking_uri=args.tracking_uri,
        address=args.address,
    )


def cmd_sync_mlflow(args: argparse.Namespace) -> int:
    """Exit 0 when nothing of the search waits for MLflow any more; 1 (one line) while the store does not
    answer."""
    from orchestrator.ensemble.arguments import check_search_dir
    from orchestrator.tracking.search_log import OUTBOX_FILE, sync_search

    search_dir = check_search_dir(args.name, Path(args.storage) if args.storage else None).absolute()
    if not (search_dir / OUTBOX_FILE).is_file():
        print(f"search '{args.name}': no MLflow record waits (nothing to send)")
        return 0
    sent, left, uri = sync_search(search_dir)
    if left:
        print(
            f"MLflow store {uri} does not answer: {left} record(s) of search '{args.name}' still wait in "
            f"{search_dir / OUTBOX_FILE}; run this again when it does ({sent} sent)",
            file=sys.stderr,
        )
        return 1
    print(f"search '{args.name}': {sent} waiting MLflow record(s) sent to {uri}; nothing waits")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from orchestrator.tracking import launch_ui

    return launch_ui(tracking_uri=args.tracking_uri, port=args.port, host=args.host)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="foldtune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, help="data root holding train/ and eval/")
        p.add_argument("--relabel", help="CSV of label fixes applied before splitting")
        p.add_argument("--age-edges", type=_age_edges, default=(30, 60), help="age band edges, default 30,60")

    p = sub.add_parser("check-data", help="validate a data root and print its summary")
    data_args(p)
    p.add_argument(
        "--decode",
        action="store_true",
        help="read every image's compressed data too (finds truncated files; slower than the header check)",
    )
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("folds", help="write the person-level stratified k-fold file")
    data_args(p)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="fold file path (default: DATA/folds_k{K}_seed{SEED}.csv)")
    p.add_argument(
        "--holdout",
        type=holdout_arg,
        default=0.0,
        help="share of persons held out of every fold (fold -1), e.g. 0.1, or auto (500 persons, at most "
        "a fifth)",
    )
    p.set_defaults(func=cmd_folds)

    p = sub.add_parser("demo-data", help="generate the built-in demo data set in the competition layout")
    p.add_argument("out")
    p.add_argument("--persons", type=int, default=300)
    p.add_argument("--eval-persons", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("train", help="train one configuration on all k folds (no Ray)")
    p.add_argument("--data", required=True)
    p.add_argument("--config", required=True, help="YAML of TrainConfig keys")
    p.add_argument("--relabel")
    p.add_argument("--folds", help="fold file from `foldtune folds` (default: made from k and folds_seed)")
    p.add_argument("--out", help="run folder (default runs/train/<config name>)")
    p.add_argument("--cache-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("search", help="Ray Tune + Optuna search over k-fold trials, logged to MLflow")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--space",
        required=True,
        help="search space YAML (see search_spaces/), or auto: default.yaml when the Ray cluster has GPUs, "
        "else cpu.yaml",
    )
    p.add_argument("--trials", type=int)
    p.add_argument("--name", help="search name (default: the space's name)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search of this name")
    p.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"), help="join a Ray cluster (or RAY_ADDRESS)"
    )
    p.add_argument(
        "--storage", help="folder for search results (default ./runs; shared storage on a cluster)"
    )
    p.add_argument("--cpus-per-trial", type=float)
    p.add_argument("--gpus-per-trial", type=float)
    p.add_argument(
        "--relabel", help="CSV of label fixes (id,field,value) applied before splitting; kept with the search"
    )
    p.add_argument(
        "--hash-images",
        action="store_true",
        help="MLflow data digest over the image bytes (default: paths, sizes and mtimes; fast)",
    )
    p.add_argument(
        "--folds",
        help="fold file from `foldtune folds` for all trials (default: from the space's k and folds_seed)",
    )
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlruns/mlflow.db); "
        "a resumed search keeps the store it started with",
    )
    p.add_argument(
        "--holdout",
        type=holdout_arg,
        help="share of persons kept out of every fold (e.g. 0.1, or auto: 500 persons, at most a fifth) so "
        "the ensemble can score the submission itself on them (default: the space's holdout, else none)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="no trial starts after MINUTES and running ones stop there, keeping their best fold models "
        "and OOF predictions; a --resume gets what is left of it",
    )
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("ensemble", help="soft-vote the best fold models with TTA and write the submission")
    p.add_argument("--data", required=True)
    p.add_argument("--search", required=True, help="search name")
    p.add_argument("--storage")
    p.add_argument("--top", type=int, help="take the N best trials instead of greedy selection")
    p.add_argument("--tta", help="comma-separated TTA views (hflip,scale,shift); '' for none")
    p.add_argument("--out", help="submission CSV (default <search folder>/submission.csv)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--folds", help="use only these fold models of each member, e.g. 0 (one fold model, for comparison)"
    )
    refit_choice = p.add_mutually_exclusive_group()
    refit_choice.add_argument(
        "--with-refit",
        action="store_const",
        const=True,
        dest="with_refit",
        help="every member's refit models (`foldtune refit`, a planned search's final model) count once each "
        "beside its fold models (default: the vote the holdout persons score best, see README)",
    )
    refit_choice.add_argument(
        "--without-refit",
        action="store_const",
        const=False,
        dest="with_refit",
        help="leave refit models out of the vote",
    )
    p.set_defaults(func=cmd_ensemble)

    from orchestrator.refit import add_refit_command

    add_refit_command(sub)

    p = sub.add_parser("score", help="score a submission against an answers CSV")
    p.add_argument("submission")
    p.add_argument("answers")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("predict", help="predict new images with an ensemble (CPU or GPU), written as CSV")
    p.add_argument(
        "--model",
        required=True,
        help="a search name under --storage (its ensemble_model/), a model folder, or models:/NAME/VERSION",
    )
    p.add_argument(
        "--images",
        required=True,
        help="a folder of .jpg/.jpeg/.png images, or a CSV with an image_path (or ImageID) column",
    )
    p.add_argument(
        "--out", required=True, help="output CSV (image, class, mask, gender, age, prob_00..17, error)"
    )
    p.add_argument(
        "--tta", help="comma-separated TTA views for every member ('' for none; default: the ensemble's)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--storage", help="folder holding the searches (default ./runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tracking-uri", help="MLflow store for models:/ URIs (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--progress-every", type=int, default=10, help="print progress every N batches (10)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "doctor", help="check this machine before a search: torch/driver, GPUs, Ray, shm, disk"
    )
    p.add_argument("--space", help="the search space to check (default: what --space auto picks)")
    p.add_argument("--storage", default="runs", help="the search results folder (default ./runs)")
    p.add_argument("--data", help="a data root: also check the disk holds its decoded-image cache")
    p.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else mlruns/)")
    p.add_argument(
        "--address", default=os.environ.get("RAY_ADDRESS"), help="a Ray cluster to check (or RAY_ADDRESS)"
    )
    p.add_argument(
        "--which-space", action="store_true", help="only print the space file --space auto picks here"
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser(
        "sync-mlflow",
        help="send a search's MLflow records that waited while the tracking store did not answer",
    )
    p.add_argument("name", help="the search's name (its folder under --storage)")
    p.add_argument("--storage", default="runs", help="the search results folder (default ./runs)")
    p.set_defaults(func=cmd_sync_mlflow)

    p = sub.add_parser("ui", help="start the MLflow UI over the tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--tracking-uri",
        help="the MLflow store (default: MLFLOW_TRACKING_URI, else the one searches use: mlruns/mlflow.db)",
    )
    p.set_defaults(func=cmd_ui)
    from orchestrator.inspect.commands import add_commands

    add_commands(sub)
    return parser


def report_user_error(error: Exception) -> int:
    """Print a user-facing error as one ``error:`` line and return exit code 2; re-raise anything else."""
    if isinstance(error, FoldtuneError):
        print(f"error: {error}", file=sys.stderr)
        return 2
    raise error


def quiet_library_logs() -> None:
    """Console runs show foldtune's own lines; the libraries' routine INFO lines (MLflow creating its tables,
    Optuna creating a study) are hidden. Warnings and errors still show. Library callers keep their config."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import optuna  # sets its own level when first imported, so after the import

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run one command; exit 0 / 1 as the command says, 2 for a user error (one ``error:`` line), 130 after
    Ctrl-C and 143 after SIGTERM (both stop the command where it is and let it clean up)."""
    args = build_parser().parse_args(argv)
    if args.command in ("search", "ensemble", "refit", "label-issues", "explain", "sync-mlflow"):
        quiet_library_logs()
    try:
        with on_sigterm(raise_terminated):
            return args.func(args)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        return report_user_error(error)


if __name__ == "__main__":
    sys.exit(main())
