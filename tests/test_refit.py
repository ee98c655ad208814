"""``foldtune refit`` end to end on generated images: a real 2-fold trial in a fake search folder, refit.

The trial is a real ``fit`` (tiny backbone, 2 folds, 2 epochs) on 10 of 12 persons; the other two are
written into its ``folds.csv`` with fold -1 afterwards (fit itself refuses -1), as a search that keeps
holdout persons would. One refit is shared by the tests that read it; the others run their own, short one.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.errors import OrchestratorError
from orchestrator.refit import (
    add_refit_command,
    choose_trial,
    read_refit_holdout,
    read_refit_record,
    refit_dir,
    refit_models,
    run_refit,
)
from trainers import refit as refit_module
from trainers.checkpoint import check_checkpoint, load_checkpoint, read_checkpoint
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.fit import fit
from trainers.folds import FoldWarning, make_folds
from trainers.predict import predict_proba

HOLDOUT_PERSONS = ("000011", "000012")
DROPPED_AGE = 18  # person 000001's age (conftest's default_age(0)): kept out of training, as fit does
TINY = dict(
    backbone="resnet10t",
    image_size=(32, 24),
    epochs=2,
    batch_size=16,
    k=2,
    lr=3e-3,
    patience=0,
    seed=7,
    num_workers=0,
    drop_ages=(DROPPED_AGE,),
    tta=("hflip",),
    device="cpu",
)


@pytest.fixture(scope="module")
def search(tmp_path_factory, dataset_builder):
    """A search folder ``runs/s`` with one finished trial ``t1`` (its folds.csv holding holdout rows)."""
    base = tmp_path_factory.mktemp("refit")
    root = base / "data"
    dataset_builder(root, n_persons=12)
    table = read_train(root).table
    holdout = table["person_id"].isin(HOLDOUT_PERSONS)
    trained_on = table[~holdout].reset_index(drop=True)
    run_dir = base / "runs" / "s" / "trials" / "t1"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldWarning)  # 10 persons: some strata smaller than k
        folds = make_folds(trained_on, k=2, seed=0)
    result = fit(TrainConfig(**TINY), trained_on, folds, run_dir, base / "cache", log=None)
    assert result.status == "completed"
    folds = pd.read_csv(run_dir / "folds.csv", dtype={"person_id": str})
    kept_out = table.loc[holdout, [c for c in folds.columns if c != "fold"]].assign(fold=-1)
    pd.concat([folds, kept_out]).to_csv(run_dir / "folds.csv", index=False)
    return base, root, table


@pytest.fixture(scope="module")
def store(tmp_path_factory, store_template) -> str:
    target = tmp_path_factory.mktemp("mlruns") / "mlflow.db"
    shutil.copy(store_template, target)
    return f"sqlite:///{target}"


def refit_now(search, lines=None, **options) -> dict:
    base, root, _ = search
    defaults = dict(storage=base / "runs", trial="t1", device="cpu", cache_dir=base / "cache")
    return run_refit(root, "s", log=(lines.append if lines is not None else None), **{**defaults, **options})


@pytest.fixture(scope="module")
def refitted(search, store):
    lines: list[str] = []
    record = refit_now(search, lines, tracking_uri=store)
    return record, lines


def test_refit_trains_the_mean_best_epoch_and_writes_its_files(search, refitted):
    base, _, table = search
    record, lines = refitted
    trial = base / "runs" / "s" / "trials" / "t1"
    fold_epochs = [int(read_checkpoint(trial / "checkpoints" / f"fold{i}.pt")["epoch"]) for i in (0, 1)]
    assert record["fold_epochs"] == fold_epochs
    assert record["epochs"] == max(1, int(np.floor(np.mean(fold_epochs) + 0.5)))
    folder = refit_dir(base / "runs" / "s", "t1")
    assert refit_models(base / "runs" / "s", "t1") == [folder / "seed0.pt"]
    assert read_refit_record(base / "runs" / "s", "t1") == record
    assert {p.name for p in folder.iterdir()} == {"seed0.pt", "holdout.npz", "refit.json"}
    assert len(record["models"][0]["train_loss"]) == record["epochs"]
    saved = read_checkpoint(folder / "seed0.pt")
    assert saved["fold"] == -1 and saved["epoch"] == record["epochs"]
    assert saved["config"]["epochs"] == record["epochs"] and saved["config"]["seed"] == TINY["seed"] + 1000
    # the checks the ensemble runs on a fold model accept it
    check_checkpoint(folder / "seed0.pt", record["config"], -1, owner="the refit", todo="re-run it")
    printed = "\n".join(lines)
    assert f"epochs: {record['epochs']} (folds: {','.join(map(str, fold_epochs))})" in printed
    assert "train_loss" in printed and "holdout macro F1" in printed and "seed0.pt" in printed


def test_holdout_and_dropped_ages_are_never_trained_on(search, refitted):
    _, _, table = search
    record, _ = refitted
    trainable = ~table["person_id"].isin(HOLDOUT_PERSONS) & (table["age"] != DROPPED_AGE)
    assert 0 < record["rows_trained"] == int(trainable.sum()) < len(table) - 14
    assert record["holdout_rows"] == 14  # two persons, seven images each


def test_training_rows_exclude_holdout_images(search, tmp_path):
    """What the loader is handed: no holdout image's cache row, even for one epoch."""
    base, root, table = search
    shutil.copytree(base / "runs" / "s" / "trials", tmp_path / "s" / "trials")
    seen = []
    real = refit_module.FoldLoader

    def spy(cache_path, rows, labels, *args, **kwargs):
        seen.append((Path(cache_path), np.asarray(rows)))
        return real(cache_path, rows, labels, *args, **kwargs)

    with mock.patch.object(refit_module, "FoldLoader", spy):
        lines: list[str] = []
        record = run_refit(
            root, "s", storage=tmp_path, trial="t1", epochs=1, device="cpu", cache_dir=base / "cache",
            tracking_uri="file:/refused", log=lines.append,
        )  # fmt: skip
    from trainers.cache import open_cache

    cache_path, rows = seen[0]
    cached = open_cache(cache_path)
    holdout_rows = cached.rows(table.loc[table["person_id"].isin(HOLDOUT_PERSONS), "image_path"].tolist())
    assert len(rows) == record["rows_trained"] and not set(rows) & set(holdout_rows)
    assert "mlflow_run_id" not in record  # the store was refused: a warning, the refit stands
    assert any(
        line.startswith("warning: the refit is written but logging it to MLflow failed") for line in lines
    )


def test_refit_model_reloads_and_reproduces_its_holdout_predictions(search, refitted):
    base, _, table = search
    record, _ = refitted
    holdout = read_refit_holdout(base / "runs" / "s", "t1")
    assert holdout is not None
    expected = table[table["person_id"].isin(HOLDOUT_PERSONS)]
    assert sorted(holdout["rel_path"].tolist()) == sorted(expected["rel_path"].tolist())
    assert (
        holdout["label"].tolist() == expected.set_index("rel_path").loc[holdout["rel_path"], "label"].tolist()
    )
    loaded = load_checkpoint(refit_dir(base / "runs" / "s", "t1") / "seed0.pt")
    from trainers.cache import build_cache, open_cache

    paths = expected.set_index("rel_path").loc[holdout["rel_path"], "image_path"].tolist()
    cached = open_cache(build_cache(sorted(table["image_path"]), (32, 24), base / "cache", None))
    for tta, key in (((), "probs"), (("hflip",), "probs_tta")):
        again = predict_proba(
            loaded.model, loaded.head, cached.images, cached.rows(paths), loaded.mean, loaded.std,
            torch.device("cpu"), batch_size=64, tta=tta,
        )  # fmt: skip
        np.testing.assert_array_equal(again, holdout[key])
        np.testing.assert_array_equal(holdout[key], holdout[f"{key}_seed0"])  # one seed: its mean is itself
    assert record["holdout_f1"] is not None and 0 <= record["holdout_f1"] <= 1


def test_mlflow_run_nested_in_the_search_experiment(refitted, store):
    from mlflow import MlflowClient

    record, _ = refitted
    client = MlflowClient(store)
    run = client.get_run(record["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["foldtune.kind"] == "refit" and run.data.tags["foldtune.refit_trial"] == "t1"
    assert "foldtune.trial_id" not in run.data.tags  # the search finds trial runs by that tag
    assert run.data.params["refit_epochs"] == str(record["epochs"])
    assert run.data.params["backbone"] == "resnet10t"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, record["epochs"] + 1))
    assert "holdout_f1" in run.data.metrics and "seed0/holdout_f1" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"refit.json", "holdout.npz"}


def test_two_seeds_give_two_models_and_a_later_refit_replaces_them(search, tmp_path):
    base, _, _ = search
    storage = tmp_path / "runs"
    shutil.copytree(base / "runs" / "s" / "trials", storage / "s2" / "trials")
    options = dict(storage=storage, epochs=1, tracking_uri=f"sqlite:///{tmp_path / 'unused.db'}")
    with mock.patch("orchestrator.refit._record_in_mlflow", return_value=None):
        record = run_refit(base / "data", "s2", trial="t1", seeds=2, device="cpu", log=None, **options)
        models = refit_models(storage / "s2", "t1")
        assert [p.name for p in models] == ["seed0.pt", "seed1.pt"]
        assert [m["seed"] for m in record["models"]] == [TINY["seed"] + 1000, TINY["seed"] + 2000]
        first, second = (read_checkpoint(p)["state_dict"] for p in models)
        assert any(not torch.equal(first[k], second[k]) for k in first)
        holdout = read_refit_holdout(storage / "s2", "t1")
        np.testing.assert_allclose(
            holdout["probs"], (holdout["probs_seed0"] + holdout["probs_seed1"]) / 2, rtol=1e-6
        )
        run_refit(base / "data", "s2", trial="t1", seeds=1, device="cpu", log=None, **options)
    assert [p.name for p in refit_models(storage / "s2", "t1")] == ["seed0.pt"]
    assert not (refit_dir(storage / "s2", "t1") / "seed1.pt").exists()


def test_trial_choice_ensemble_first_member_else_best_oof(search, tmp_path):
    base, _, _ = search
    search_dir = tmp_path / "s"
    shutil.copytree(base / "runs" / "s" / "trials", search_dir / "trials")
    assert choose_trial(search_dir)[0] == "t1"
    (search_dir / "ensemble.json").write_text(json.dumps({"members": [{"trial_id": "t9"}]}))
    assert choose_trial(search_dir) == ("t9", "the first member of the ensemble (ensemble.json)")


def test_clear_errors_before_any_training(search, tmp_path, make_dataset):
    base, root, _ = search
    storage = tmp_path / "runs"
    trials = storage / "s" / "trials"
    shutil.copytree(
        base / "runs" / "s" / "trials" / "t1", trials / "t1", ignore=shutil.ignore_patterns("*.pt")
    )
    common = dict(storage=storage, device="cpu", log=None)
    with pytest.raises(OrchestratorError, match=r"search folder .*nope not found; run `foldtune search"):
        run_refit(root, "nope", **common)
    with pytest.raises(OrchestratorError, match=r"trial 't7' is not in search s .*its trials: t1"):
        run_refit(root, "s", trial="t7", **common)
    with pytest.raises(OrchestratorError, match=r"trial t1 has no fold checkpoints .*pruned"):
        run_refit(root, "s", trial="t1", **common)
    shutil.copytree(
        base / "runs" / "s" / "trials" / "t1" / "checkpoints",
        trials / "t1" / "checkpoints",
        dirs_exist_ok=True,
    )
    other = make_dataset(n_persons=6, seed=3)
    with pytest.raises(OrchestratorError, match=r"lacks \d+ of the 84 images trial t1 was trained on"):
        run_refit(other.root, "s", trial="t1", **common)
    with pytest.raises(OrchestratorError, match="--seeds must be at least 1"):
        run_refit(root, "s", trial="t1", seeds=0, **common)
    assert not (storage / "s" / "refit").exists()  # nothing written by any of them


def test_command_line_runs_the_refit(search, tmp_path):
    """What ``foldtune refit`` parses and runs, through the subcommand ``build_parser`` adds."""
    import argparse

    parser = argparse.ArgumentParser(prog="foldtune")
    add_refit_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["refit", "--data", str(search[1]), "--search", "s", "--storage", str(tmp_path)])
    assert (args.trial, args.seeds, args.epochs, args.device, args.cache_dir) == (None, 1, None, "auto", None)
    with pytest.raises(OrchestratorError, match=r"search folder .*s not found"):
        args.func(args)
