"""One fold-lockstep k-fold run end to end on generated images (tiny backbone, 2 folds, 2 epochs)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from trainers import cache
from trainers.checkpoint import CheckpointError, load_checkpoint
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.fit import EpochReport, TrainingError, fit
from trainers.folds import make_folds
from trainers.predict import predict_proba
from trainers.resume import ResumeError

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
)


def predict_held_out(loaded, table, image_cache, rel_paths, tta=()) -> np.ndarray:
    """A reloaded fold model's probabilities for the training images ``rel_paths``, from the cache."""
    paths = table.set_index("rel_path").loc[rel_paths, "image_path"].tolist()
    return predict_proba(
        loaded.model,
        loaded.head,
        image_cache.images,
        image_cache.rows(paths),
        loaded.mean,
        loaded.std,
        torch.device("cpu"),
        tta=tta,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory, dataset_builder):
    root = tmp_path_factory.mktemp("fitdata")
    dataset_builder(root, n_persons=12, extensions=(".jpg", ".png", ".jpeg"))
    train = read_train(root)
    return train.table, make_folds(train.table, k=2, seed=0), root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory, count_decodes):
    table, folds, _ = data
    base = tmp_path_factory.mktemp("fit")
    reports: list[EpochReport] = []
    with count_decodes() as counted:
        result = fit(
            TrainConfig(**TINY), table, folds, base / "run", base / "cache", callback=reports.append, log=None
        )
    return result, reports, counted["images"], base


def test_run_writes_every_artifact(trained):
    result, reports, _, _ = trained
    assert result.status == "completed" and result.epochs_trained == 2
    run = result.run_dir
    for name in (
        "config.yaml",
        "folds.csv",
        "metrics/epochs.csv",
        "metrics/per_class_f1.csv",
        "metrics/confusion_fold0.csv",
        "metrics/confusion_oof.csv",
        "plots/confusion.png",
        "plots/per_class_f1.png",
        "checkpoints/fold0.pt",
        "checkpoints/fold1.pt",
        "oof.npz",
        "result.json",
    ):
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    assert not (run / "last.pt").exists()  # the resume state goes once the run has finished
    saved = json.loads((run / "result.json").read_text())
    assert saved["status"] == "completed" and saved["config"]["backbone"] == "resnet10t"
    epochs = pd.read_csv(run / "metrics" / "epochs.csv", dtype={"fold": str})
    assert set(epochs["fold"]) == {"0", "1", "mean"} and sorted(epochs["epoch"].unique()) == [1, 2]


def test_reports_every_epoch_with_fold_and_mean_metrics(trained):
    _, reports, _, _ = trained
    assert [r.epoch for r in reports] == [1, 2]
    for report in reports:
        assert len(report.fold_metrics) == 2
        mean_f1 = np.mean([m["val_f1"] for m in report.fold_metrics])
        assert report.metrics["val_f1"] == pytest.approx(mean_f1)
        flat = report.flat()
        assert {"val_f1", "fold0/val_f1", "fold1/val_age_f1", "val_mask_f1", "best_f1", "epoch"} <= set(flat)


def test_oof_covers_every_training_image_exactly_once(trained, data):
    result, _, _, _ = trained
    table, folds, _ = data
    oof = np.load(result.run_dir / "oof.npz")
    assert sorted(oof["rel_path"].tolist()) == sorted(table["rel_path"].tolist())
    assert len(set(oof["rel_path"].tolist())) == len(table)
    assert np.allclose(oof["probs"].sum(axis=1), 1, atol=1e-4) and np.allclose(
        oof["probs_tta"].sum(axis=1), 1, atol=1e-4
    )
    fold_of = dict(zip(folds["rel_path"], folds["fold"], strict=True))
    assert [fold_of[p] for p in oof["rel_path"]] == oof["fold"].tolist()


def test_checkpoint_reloads_and_reproduces_validation_predictions(trained, data):
    result, _, _, base = trained
    table, _, _ = data
    oof = np.load(result.run_dir / "oof.npz")
    image_cache = cache.open_cache(next((base / "cache").glob("*.npy")))
    for fold in (0, 1):
        loaded = load_checkpoint(result.run_dir / "checkpoints" / f"fold{fold}.pt")
        assert loaded.backbone == "resnet10t" and loaded.meta["fold"] == fold
        in_fold = oof["fold"] == fold
        probs = predict_held_out(loaded, table, image_cache, oof["rel_path"][in_fold])
        np.testing.assert_allclose(probs, oof["probs"][in_fold], atol=1e-5)
        probs_tta = predict_held_out(loaded, table, image_cache, oof["rel_path"][in_fold], tta=("hflip",))
        np.testing.assert_allclose(probs_tta, oof["probs_tta"][in_fold], atol=1e-5)


def test_cache_is_decoded_once_for_the_whole_run(trained, data):
    _, _, decodes, _ = trained
    table, _, _ = data
    assert decodes == len(table)  # 2 folds x 2 epochs x (train + validation), yet each image decoded once


def test_resume_continues_after_the_saved_epoch_and_matches_an_uninterrupted_run(data, tmp_path, trained):
    table, folds, _ = data
    uninterrupted, _, _, _ = trained

    class Interrupt(Exception):
        pass

    def stop_after_first_epoch(report: EpochReport) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        fit(
            TrainConfig(**TINY),
            table,
            folds,
            tmp_path / "run",
            tmp_path / "cache",
            callback=stop_after_first_epoch,
            log=None,
        )
    assert (tmp_path / "run" / "last.pt").exists()
    reports: list[EpochReport] = []
    resumed = fit(
        TrainConfig(**TINY),
        table,
        folds,
        tmp_path / "run",
        tmp_path / "cache",
        callback=reports.append,
        log=None,
    )
    assert [r.epoch for r in reports] == [2]  # epoch 1 was not trained again
    assert resumed.best_f1 == pytest.approx(uninterrupted.best_f1)
    a = np.load(resumed.run_dir / "oof.npz")["probs"]
    b = np.load(uninterrupted.run_dir / "oof.npz")["probs"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_resume_refuses_a_run_folder_of_another_config(data, tmp_path):
    table, folds, _ = data

    def stop(report: EpochReport) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(TrainConfig(**TINY), table, folds, tmp_path / "run", tmp_path / "cache", callback=stop, log=None)
    with pytest.raises(ResumeError, match="another configuration"):
        fit(TrainConfig(**{**TINY, "lr": 1e-4}), table, folds, tmp_path / "run", tmp_path / "cache", log=None)


def test_nan_loss_stops_the_run_with_a_clear_status(data, tmp_path):
    table, folds, _ = data
    result = fit(
        TrainConfig(**{**TINY, "lr": 1e12, "epochs": 3, "loss": "ce"}),
        table,
        folds,
        tmp_path / "run",
        tmp_path / "cache",
        log=None,
    )
    assert result.status == "diverged"
    assert "lower lr" in result.message
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "diverged"


def test_fixed_size_backbone_is_built_for_the_configured_image_size(data, tmp_path):
    # a ViT is built by timm for 224x224; foldtune builds it for (32, 48) and reloads it the same way
    table, folds, root = data
    config = TrainConfig(**{**TINY, "backbone": "vit_tiny_patch16_224", "image_size": (32, 48), "epochs": 1})
    result = fit(config, table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert result.status == "completed"
    oof = np.load(result.run_dir / "oof.npz")
    image_cache = cache.open_cache(next((tmp_path / "cache").glob("*.npy")))
    loaded = load_checkpoint(result.run_dir / "checkpoints" / "fold1.pt")
    assert loaded.model.patch_embed.grid_size == (2, 3)
    in_fold = oof["fold"] == 1
    probs = predict_held_out(loaded, table, image_cache, oof["rel_path"][in_fold])
    np.testing.assert_allclose(probs, oof["probs"][in_fold], atol=1e-5)


def test_drop_ages_leaves_validation_untouched(data, tmp_path):
    table, folds, _ = data
    dropped = sorted(table["age"].unique())[:3]
    result = fit(
        TrainConfig(**{**TINY, "epochs": 1, "drop_ages": tuple(int(a) for a in dropped)}),
        table,
        folds,
        tmp_path / "run",
        tmp_path / "cache",
        log=None,
    )
    oof = np.load(result.run_dir / "oof.npz")
    assert len(oof["rel_path"]) == len(table)  # dropped ages are still scored out of fold


def test_fold_file_of_other_data_is_refused(data, tmp_path):
    table, folds, _ = data
    with pytest.raises(TrainingError, match="no fold"):
        fit(TrainConfig(**TINY), table, folds.iloc[:-7], tmp_path / "run", tmp_path / "cache", log=None)
    with pytest.raises(TrainingError, match="k=3"):
        fit(TrainConfig(**{**TINY, "k": 3}), table, folds, tmp_path / "run", tmp_path / "cache", log=None)


def test_corrupt_checkpoint_is_a_clear_error(trained, tmp_path):
    result, _, _, _ = trained
    broken = tmp_path / "fold0.pt"
    broken.write_bytes((result.run_dir / "checkpoints" / "fold0.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(broken)
