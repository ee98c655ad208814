"""A run killed at any point resumes to exactly the uninterrupted run: same out-of-fold probabilities, same
best epochs, same weights. The hard case: killed inside an epoch, right after a fold wrote a new best
checkpoint and before the epoch's resume state, with dropout drawing from the global random stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import trainers.fit as fit_module
from trainers.checkpoint import read_checkpoint
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.fit import fit
from trainers.folds import make_folds

TINY = dict(
    backbone="resnet10t",
    image_size=(32, 24),
    epochs=3,
    batch_size=16,
    k=2,
    lr=3e-3,
    patience=0,
    seed=11,
    num_workers=0,
    drop_rate=0.3,  # dropout draws from torch's global stream: the resume state must carry it
)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory, dataset_builder):
    root = tmp_path_factory.mktemp("resumedata")
    dataset_builder(root, n_persons=10)
    table = read_train(root).table
    return table, make_folds(table, k=2, seed=0)


def _kill_after_a_best_checkpoint_of_epoch(monkeypatch, epoch_to_kill: int, written: list) -> None:
    real = fit_module.save_fold_checkpoint

    def save_then_die(path, model, cfg, mean, std, fold, epoch, val_f1, val_probs=None):
        real(path, model, cfg, mean, std, fold, epoch, val_f1, val_probs=val_probs)
        written.append((fold, epoch))
        if epoch >= epoch_to_kill:
            raise Killed(f"killed after fold {fold}'s new best checkpoint of epoch {epoch}")

    monkeypatch.setattr(fit_module, "save_fold_checkpoint", save_then_die)


@pytest.mark.parametrize("resume_every_epochs", [1, 2])
def test_killed_after_a_new_best_checkpoint_resumes_to_the_uninterrupted_run(
    data, tmp_path, monkeypatch, resume_every_epochs
):
    table, folds = data
    cfg = TrainConfig(**{**TINY, "resume_every_epochs": resume_every_epochs})
    fit(cfg, table, folds, tmp_path / "whole", tmp_path / "cache", log=None)

    written: list = []
    _kill_after_a_best_checkpoint_of_epoch(monkeypatch, 2, written)
    with pytest.raises(Killed):
        fit(cfg, table, folds, tmp_path / "cut", tmp_path / "cache", log=None)
    assert written[-1][1] >= 2  # the kill came after a best checkpoint of epoch 2 or later
    monkeypatch.undo()
    fit(cfg, table, folds, tmp_path / "cut", tmp_path / "cache", log=None)

    with np.load(tmp_path / "whole" / "oof.npz") as whole, np.load(tmp_path / "cut" / "oof.npz") as cut:
        for key in ("probs", "probs_tta"):
            np.testing.assert_allclose(cut[key], whole[key], atol=1e-6)
    for fold in range(cfg.k):
        a = read_checkpoint(tmp_path / "whole" / "checkpoints" / f"fold{fold}.pt")
        b = read_checkpoint(tmp_path / "cut" / "checkpoints" / f"fold{fold}.pt")
        assert (a["epoch"], a["val_f1"]) == (b["epoch"], b["val_f1"])
        for name, tensor in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][name], tensor, atol=1e-6, rtol=0)
        np.testing.assert_allclose(b["val_probs"].numpy(), a["val_probs"].numpy(), atol=1e-6)


def test_the_checkpoint_holds_its_own_out_of_fold_probabilities(data, tmp_path):
    table, folds = data
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    fit(cfg, table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    with np.load(tmp_path / "run" / "oof.npz") as oof:
        for fold in range(cfg.k):
            payload = read_checkpoint(tmp_path / "run" / "checkpoints" / f"fold{fold}.pt")
            np.testing.assert_array_equal(payload["val_probs"].numpy(), oof["probs"][oof["fold"] == fold])


# --- no usable resume state: a retry on another node, a corrupt or foreign last.pt --------------------------


def _stop_after(epoch: int):
    def callback(report) -> None:
        if report.epoch == epoch:
            raise Killed(f"node lost after epoch {epoch}")

    return callback


def _checkpoint_bytes(run_dir) -> dict[int, bytes]:
    return {fold: (run_dir / "checkpoints" / f"fold{fold}.pt").read_bytes() for fold in range(2)}


def test_a_retry_elsewhere_keeps_the_best_checkpoints_and_never_replaces_them_by_worse(
    data, tmp_path, monkeypatch
):
    """The first node's resume state stays behind on its own disk (node-local); the retry on a second node
    has only the shared run folder. Its epochs score worse here: the better checkpoints must survive."""
    table, folds = data
    cfg, run = TrainConfig(**{**TINY, "epochs": 4}), tmp_path / "shared" / "trial"
    with pytest.raises(Killed):
        fit(
            cfg,
            table,
            folds,
            run,
            tmp_path / "c",
            callback=_stop_after(2),
            log=None,
            resume_dir=tmp_path / "n1",
        )
    best = {f: read_checkpoint(run / "checkpoints" / f"fold{f}.pt") for f in range(2)}
    before = _checkpoint_bytes(run)
    real_validate = fit_module.predict_validation

    def worse(fold, cfg, images, device, mean, std, tta=()):  # every retried epoch is wrong on every image
        probs = real_validate(fold, cfg, images, device, mean, std, tta)
        if tta:
            return probs
        wrong = np.full_like(probs, 0.01 / 17)
        wrong[np.arange(len(probs)), (fold.val_labels + 1) % 18] = 0.99
        return wrong

    monkeypatch.setattr(fit_module, "predict_validation", worse)
    epochs, lines = [], []
    retried = fit(
        cfg,
        table,
        folds,
        run,
        tmp_path / "c",
        callback=lambda report: epochs.append(report.epoch),
        log=lines.append,
        resume_dir=tmp_path / "n2",
    )
    assert epochs == [1, 2, 3, 4] and retried.status == "completed"
    assert any(
        "its best checkpoints (2 of 2 folds) stay unless an epoch beats them" in line for line in lines
    )
    assert _checkpoint_bytes(run) == before  # nothing worse replaced them
    with np.load(run / "oof.npz") as oof:  # the out-of-fold probabilities are the kept models'
        for fold in range(2):
            np.testing.assert_array_equal(oof["probs"][oof["fold"] == fold], best[fold]["val_probs"].numpy())


def test_a_corrupt_or_foreign_resume_state_is_set_aside_with_one_line(data, tmp_path):
    table, folds = data
    cfg, run, local = TrainConfig(**TINY), tmp_path / "run", tmp_path / "local"
    with pytest.raises(Killed):
        fit(cfg, table, folds, run, tmp_path / "c", callback=_stop_after(1), log=None, resume_dir=local)
    state = local / "last.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    lines = []
    result = fit(cfg, table, folds, run, tmp_path / "c", log=lines.append, resume_dir=local)
    assert result.status == "completed" and result.epochs_trained == 3
    said = [line for line in lines if "set aside" in line]
    assert len(said) == 1 and "unreadable" in said[0] and "continuing from the best checkpoints" in said[0]
    assert [p.name.startswith("last.pt.set-aside-") for p in local.iterdir()] == [True] or not local.exists()
    torch.save({"something": "else"}, state.parent.mkdir(parents=True, exist_ok=True) or state)  # foreign
    lines.clear()
    fit(
        TrainConfig(**TINY),
        table,
        folds,
        tmp_path / "run2",
        tmp_path / "c",
        log=lines.append,
        resume_dir=local,
    )
    assert any("not a foldtune resume state of this run" in line for line in lines)
