"""The seed-style baseline the k-fold search is measured against: one model, trained on every training
person, no folds, no validation, no TTA, for a fixed number of epochs; its submission scored on eval.

    python -m benchmarks.single_model --data /tmp/aaffull --space search_spaces/cpu.yaml \
        --backbone tf_efficientnet_lite0 --epochs 8 --out /tmp/b14/single --threads 2

The configuration is the space's fixed settings plus the given searched values (the best trial's, for a
like-for-like comparison); ``--epochs`` is chosen so the run takes the search's wall time. It trains with
``trainers.refit`` (one fold of fit's training on all rows), so nothing about the training step differs
from the search's. Prints the wall time and the eval macro F1 (with ``eval/answers.csv``), and writes the
eval probabilities as ``OUT/eval_probs.npz`` (``image_id``, ``probs``: the format of an ensemble's
``submission.npz``) for ``benchmarks.judge_ceiling``. ``--reuse`` predicts with the models already in OUT
(``seed*.pt``, with the configuration recorded in ``single_model.json``) instead of training again.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--space", required=True, type=Path)
    parser.add_argument("--epochs", required=True, type=int)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE (YAML) over the fixed settings")
    parser.add_argument("--reuse", action="store_true", help="predict with OUT/seed*.pt, do not train")
    parser.add_argument(
        "--val-slice",
        type=int,
        default=0,
        metavar="K",
        help="hold 1/K of the persons out as a validation slice and submit the best epoch's model (a "
        "careful user's single model: K=10 is a 10%% slice); 0: every person, the last epoch",
    )
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    import yaml

    from orchestrator.ensemble.members import predict_models
    from orchestrator.ensemble.submission import score_submission_arrays, write_submission
    from orchestrator.space import load_space
    from trainers.cache import default_cache_dir
    from trainers.data import read_eval, read_train
    from trainers.io import atomic_open
    from trainers.labels import AgeBands
    from trainers.refit import refit

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    space = load_space(args.space)
    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.set)}
    params = {name: param.values[0] for name, param in space.search.items()}
    cfg = space.config_for({**params, **{k: v for k, v in overrides.items() if k in space.search}})
    cfg = type(cfg).from_dict({**cfg.to_dict(), **overrides, "epochs": args.epochs})
    cache_dir = default_cache_dir()
    best_epoch = None
    if args.reuse:  # the training run's record decides the configuration, not this command line
        model_paths = sorted(args.out.glob("seed*.pt"))
        record = args.out / "single_model.json"
        if not model_paths or not record.is_file():
            parser.error(
                f"--reuse: no seed*.pt and single_model.json in {args.out}; train first (no --reuse)"
            )
        trained = json.loads(record.read_text())
        cfg, rows_trained = type(cfg).from_dict(trained["config"]), trained["rows_trained"]
    elif args.val_slice:
        cfg, model_paths, rows_trained, best_epoch = _train_with_val_slice(cfg, args, cache_dir)
    else:
        table = read_train(args.data, AgeBands(tuple(cfg.age_edges))).table.assign(fold=0)
        result = refit(cfg, table, args.out, cache_dir, epochs=args.epochs, log=print)
        model_paths, rows_trained = [m.path for m in result.models], result.rows_trained
    trained_s = time.perf_counter() - started

    eval_table = read_eval(args.data)
    device = torch.device("cpu")
    probs = predict_models(
        model_paths,
        cfg.to_dict(),
        (),
        eval_table["image_path"].tolist(),
        cache_dir,
        device,
        128,
        print,
    )
    submission = args.out / "submission.csv"
    write_submission(submission, eval_table["image_id"].tolist(), probs.argmax(axis=1))
    with atomic_open(args.out / "eval_probs.npz", "wb") as handle:
        np.savez(handle, image_id=eval_table["image_id"].to_numpy(dtype=str), probs=probs.astype(np.float32))
    total_s = time.perf_counter() - started
    report = {
        "config": cfg.to_dict(),
        "epochs": cfg.epochs,
        "rows_trained": rows_trained,
        "val_slice": args.val_slice,
        "best_epoch": best_epoch,
        "train_seconds": trained["train_seconds"] if args.reuse else round(trained_s, 1),
        "total_seconds": trained["total_seconds"] if args.reuse else round(total_s, 1),
        "submission": str(submission),
    }
    answers = args.data / "eval" / "answers.csv"
    if answers.is_file():
        scores = score_submission_arrays(submission, answers)
        report["eval"] = {key: scores[key] for key in ("f1", "acc", "mask_f1", "gender_f1", "age_f1")}
    (args.out / "single_model.json").write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps({k: v for k, v in report.items() if k != "config"}, indent=2, default=float))
    return 0


def _train_with_val_slice(cfg, args, cache_dir):
    """One model on (K-1)/K of the persons, its epoch chosen on the other 1/K: ``fit`` with k=K and
    train_folds=1 (person-level, stratified like the search's folds); returns (cfg,
    [best checkpoint], rows trained, best epoch)."""
    from trainers.checkpoint import fold_checkpoint_path, read_checkpoint
    from trainers.data import read_train
    from trainers.fit import fit
    from trainers.folds import make_folds
    from trainers.labels import AgeBands

    cfg = type(cfg).from_dict({**cfg.to_dict(), "k": args.val_slice, "train_folds": 1, "patience": 0})
    table = read_train(args.data, AgeBands(tuple(cfg.age_edges))).table
    folds = make_folds(table, k=cfg.k, seed=cfg.folds_seed)
    fit(cfg, table, folds, args.out / "fit", cache_dir, log=print)
    best = fold_checkpoint_path(args.out / "fit", 0)
    trained = int((folds["fold"] != 0).sum())
    return cfg, [best], trained, int(read_checkpoint(best, mmap=True)["epoch"])


if __name__ == "__main__":
    raise SystemExit(main())
