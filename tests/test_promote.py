"""Promotion: a screened run confirmed on all k folds, its screened folds reused, not trained again.

The trainer's side (``trainers.screened`` through ``fit(..., promote=True)``) on a real tiny run, the
plan's arithmetic (``plan.promotion_seconds``, ``plan.promotions_that_fit``), and the search's side
(``search.promote``) on a screened search folder.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import yaml

from orchestrator.plan import (
    PlanError,
    describe_promotions,
    final_seconds,
    parse_plan,
    promotion_seconds,
    promotions_that_fit,
)
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.fit import fit
from trainers.folds import make_folds
from trainers.screened import PromotionError


def _screen(tmp_path, dataset_builder, epochs=2):
    root = tmp_path / "data"
    dataset_builder(root, n_persons=12)
    table = read_train(root).table
    folds = make_folds(table, k=3, seed=0)
    cfg = TrainConfig(
        backbone="resnet10t",
        image_size=(32, 24),
        epochs=epochs,
        batch_size=16,
        k=3,
        train_folds=1,
        patience=0,
    )
    run_dir = tmp_path / "run"
    fit(cfg, table, folds, run_dir, tmp_path / "cache", log=None)
    return cfg, table, folds, run_dir


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_promoted_run_trains_only_the_folds_its_screen_left_and_keeps_the_screened_one(
    tmp_path, dataset_builder
):
    cfg, table, folds, run_dir = _screen(tmp_path, dataset_builder)
    screened_history = pd.read_csv(run_dir / "metrics" / "epochs.csv", dtype={"fold": str})
    fold0 = _digest(run_dir / "checkpoints" / "fold0.pt")
    promoted = TrainConfig(**{**cfg.to_dict(), "train_folds": 0})
    result = fit(promoted, table, folds, run_dir, tmp_path / "cache", log=None, promote=True)

    assert result.status == "completed"
    assert _digest(run_dir / "checkpoints" / "fold0.pt") == fold0  # reused as it was, not retrained
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("fold*.pt")) == [
        "fold0.pt",
        "fold1.pt",
        "fold2.pt",
    ]
    with np.load(run_dir / "oof.npz") as oof:  # every person of the k folds has an out-of-fold prediction
        assert set(oof["fold"].tolist()) == {0, 1, 2}
        assert len(oof["fold"]) == int((folds["fold"] >= 0).sum())
    history = pd.read_csv(run_dir / "metrics" / "epochs.csv", dtype={"fold": str})
    old0 = screened_history[screened_history["fold"] == "0"].set_index("epoch")["val_f1"]
    new0 = history[history["fold"] == "0"].set_index("epoch")["val_f1"]
    pd.testing.assert_series_equal(old0, new0)  # the screened fold's epochs, as it trained them
    means = history[history["fold"] == "mean"]
    per_fold = history[history["fold"].isin(["0", "1", "2"])].groupby("epoch")["val_f1"].mean()
    np.testing.assert_allclose(means["val_f1"].to_numpy(), per_fold.to_numpy())  # the mean is over k
    assert (means["timed_from"] == 1).all()  # its seconds are the two trained folds' only
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["config"]["train_folds"] == 0 and len(saved["extra"]["fold_best_epochs"]) == 3
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_folds"] == 0

    with pytest.raises(PromotionError, match="nothing left to promote"):
        fit(promoted, table, folds, run_dir, tmp_path / "cache", log=None, promote=True)


def test_a_promotion_killed_halfway_leaves_the_screened_run_and_resumes(tmp_path, dataset_builder):
    cfg, table, folds, run_dir = _screen(tmp_path, dataset_builder)
    screened_result = (run_dir / "result.json").read_text()
    promoted = TrainConfig(**{**cfg.to_dict(), "train_folds": 0, "resume_every_epochs": 1})

    def killed(report):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(promoted, table, folds, run_dir, tmp_path / "cache", log=None, promote=True, callback=killed)
    # until a promotion ends the folder is the screened run: its config, its result, its model
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_folds"] == 1
    assert (run_dir / "result.json").read_text() == screened_result
    lines = []
    result = fit(promoted, table, folds, run_dir, tmp_path / "cache", log=lines.append, promote=True)
    assert result.status == "completed" and any("resuming run after epoch 1" in line for line in lines)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_folds"] == 0


def test_only_a_finished_screen_of_the_same_configuration_is_promoted(tmp_path, dataset_builder):
    cfg, table, folds, run_dir = _screen(tmp_path, dataset_builder, epochs=1)
    other = TrainConfig(**{**cfg.to_dict(), "train_folds": 0, "lr": cfg.lr * 2})
    with pytest.raises(PromotionError, match="another configuration"):
        fit(other, table, folds, run_dir, tmp_path / "cache", log=None, promote=True)
    with pytest.raises(PromotionError, match="no finished screen"):
        fit(other, table, folds, tmp_path / "empty", tmp_path / "cache", log=None, promote=True)


def test_promotion_gets_only_what_the_final_model_at_its_cap_leaves():
    # three folds of 100 training / 50 validation images each, 2 epochs, one TTA view, 10 ms per image
    seconds = promotion_seconds(0.01, [(100, 50), (100, 50)], epochs=2, views=1)
    assert seconds == pytest.approx(0.01 * ((200 + 100 / 3) * 2 + 100 / 3 * 2))
    need = final_seconds(0.01, 300, 30, 1, epochs=30)
    assert need == pytest.approx(0.01 * (300 * 30 + 30 / 3 * 2))
    # a CPU budget: the final model is not capped, nothing is promoted
    assert promotions_that_fit(need, [seconds] * 3, need) == 0
    # a night: room for the final at its cap and two promotions in rank order, not a third
    assert promotions_that_fit((need + 2.5 * seconds) / 0.95, [seconds] * 3, need) == 2
    assert promotions_that_fit((need + 2.5 * seconds) / 0.95, [3 * seconds, seconds], need) == 0
    assert "none of the 3" in describe_promotions([], 3, need)
    assert "t1 (resnet, ~" in describe_promotions([("t1", "resnet", seconds)], 3, need)


def test_promote_top_is_part_of_the_plan():
    assert parse_plan({"screen_folds": 1}, k=3).promote_top == 3
    assert parse_plan({"promote_top": 0}, k=3).promote_top == 0  # 0: never promote
    with pytest.raises(PlanError, match="promote_top must be a whole number of at least 0"):
        parse_plan({"promote_top": -1}, k=3)
