"""Quality per compute: estimates that describe the submission, holdout persons, partial trials, the time
budget and keep_top's ranking.

Real files throughout: tiny trials trained with ``trainers.fit`` on a generated data set, the real
ensemble stage and the real search driver (with a stand-in trial where only scheduling is under test).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import yaml

from orchestrator.ensemble import run_ensemble
from orchestrator.ensemble.candidates import discover, selection_f1
from orchestrator.ensemble.estimates import HOLDOUT_PROBS
from orchestrator.ensemble.selection import greedy_selection, macro_f1, nested_estimate
from orchestrator.errors import OrchestratorError
from orchestrator.search import run_search
from orchestrator.search.budget import BudgetStopper, settle_budget
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.fit import fit
from trainers.folds import HOLDOUT_FOLD, make_folds, read_folds, write_folds
from trainers.labels import NUM_CLASSES

pytestmark = pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")

TINY = dict(
    backbone="resnet10t",
    epochs=2,
    k=2,
    image_size=(32, 24),
    batch_size=16,
    pretrained=False,
    augment={},
    tta=("hflip",),
    num_workers=0,
    seed=5,
)


def one_hot(classes: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    probs = np.full((len(classes), NUM_CLASSES), (1 - confidence) / (NUM_CLASSES - 1))
    probs[np.arange(len(classes)), classes] = confidence
    return probs


# --- the nested estimate --------------------------------------------------------------------------------


def test_nested_estimate_sees_through_a_selection_that_only_fits_its_own_rows():
    """A is right on fold 0 and wrong on fold 1, B the reverse: together they are perfect in-sample, but a
    selection made on one fold always picks the trial that is wrong on the other: nested F1 is 0."""
    labels = np.tile(np.arange(NUM_CLASSES), 4)  # every class in both folds
    fold = np.repeat([0, 1], 2 * NUM_CLASSES)
    wrong = (labels + 1) % NUM_CLASSES
    a = np.where((fold == 0)[:, None], one_hot(labels, 0.9), one_hot(wrong, 0.6))
    b = np.where((fold == 1)[:, None], one_hot(labels, 0.9), one_hot(wrong, 0.6))
    counts = greedy_selection([a, b], labels)
    in_sample = macro_f1(labels, counts[0] * a + counts[1] * b)
    nested = nested_estimate([a, b], labels, fold, ["a", "b"], top=None)
    assert counts == [1, 1] and in_sample == pytest.approx(1.0)
    assert nested.f1 == pytest.approx(0.0) and nested.fold_f1 == [0.0, 0.0]
    assert nested.picks == [["b"], ["a"]]  # each outer fold chose on the other fold's rows


def test_nested_estimate_of_one_steady_trial_is_its_own_score():
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(NUM_CLASSES), 6)
    fold = np.tile([0, 1, 2], 2 * NUM_CLASSES)
    right = rng.random(len(labels)) < 0.7
    probs = one_hot(np.where(right, labels, (labels + 3) % NUM_CLASSES))
    nested = nested_estimate([probs], labels, fold, ["only"], top=None)
    assert nested.f1 == pytest.approx(macro_f1(labels, probs))
    top = nested_estimate([probs, probs * 0.5], labels, fold, ["x", "y"], top=1)
    assert top.f1 == pytest.approx(macro_f1(labels, probs)) and top.picks == [["x"]] * 3


# --- holdout persons --------------------------------------------------------------------------------------


def test_holdout_persons_are_in_no_fold_and_never_trained_on(tmp_path, make_dataset, monkeypatch):
    table = read_train(make_dataset(n_persons=30).root).table
    folds = make_folds(table, k=3, seed=1, holdout=0.2)
    held = folds[folds["fold"] == HOLDOUT_FOLD]
    assert held["person_id"].nunique() == 6  # a fifth of the persons, with all their images
    assert not set(held["person_id"]) & set(folds.loc[folds["fold"] >= 0, "person_id"])
    assert sorted(folds.loc[folds["fold"] >= 0, "fold"].unique()) == [0, 1, 2]
    assert make_folds(table, k=3, seed=1, holdout=0.2).equals(folds)  # deterministic
    write_folds(folds, tmp_path / "folds.csv")
    assert read_folds(tmp_path / "folds.csv").equals(folds)  # -1 survives the fold file

    import trainers.fit as fit_module

    seen_rows: list[np.ndarray] = []
    real_loader = fit_module.FoldLoader

    def spying_loader(cache_path, train_rows, *args, **kwargs):
        seen_rows.append(np.asarray(train_rows))
        return real_loader(cache_path, train_rows, *args, **kwargs)

    monkeypatch.setattr(fit_module, "FoldLoader", spying_loader)
    cfg = TrainConfig(**{**TINY, "k": 3, "epochs": 1})
    fit(cfg, table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    from trainers.cache import open_cache

    cache = open_cache(next((tmp_path / "cache").glob("images-*.npy")))
    held_rows = set(cache.rows(table.loc[table["rel_path"].isin(held["rel_path"]), "image_path"].tolist()))
    assert len(seen_rows) == 3 and not any(held_rows & set(rows.tolist()) for rows in seen_rows)
    with np.load(tmp_path / "run" / "oof.npz") as oof:
        assert not set(oof["rel_path"].tolist()) & set(held["rel_path"])
        assert len(oof["rel_path"]) == int((folds["fold"] >= 0).sum())
    written = pd.read_csv(tmp_path / "run" / "folds.csv", dtype={"rel_path": str, "person_id": str})
    assert (written["fold"] == HOLDOUT_FOLD).sum() == len(held) and "label" in written


# --- partial (stopped, cut) trials and the ensemble's estimates ----------------------------------------


@pytest.fixture(scope="module")
def search_with_holdout(tmp_path_factory, dataset_builder):
    """A search folder with a finished trial and one cut by the time budget (no result.json, no oof.npz),
    on folds that hold a fifth of the persons out."""
    base = tmp_path_factory.mktemp("quality")
    data = dataset_builder(base / "data", n_persons=20, n_eval=6)
    table = read_train(data.root).table
    folds = make_folds(table, k=2, seed=0, holdout=0.2)
    trials = base / "runs" / "s" / "trials"
    fit(TrainConfig(**TINY), table, folds, trials / "finished", base / "cache", log=None)
    fit(
        TrainConfig(**{**TINY, "lr": 3e-3, "seed": 9}), table, folds, trials / "cut", base / "cache", log=None
    )
    (trials / "cut" / "result.json").unlink()  # what a trial the budget stopped leaves: no end of fit
    (trials / "cut" / "oof.npz").unlink()
    return {"base": base, "data": data, "storage": base / "runs", "cache": base / "cache", "folds": folds}


def test_a_cut_trial_is_a_candidate_with_the_oof_of_its_best_epoch(search_with_holdout):
    search_dir = search_with_holdout["storage"] / "s"
    candidates, skipped = discover(search_dir, failed={})
    by_id = {c.trial_id: c for c in candidates}
    assert set(by_id) == {"finished", "cut"} and not skipped
    cut = by_id["cut"]
    assert cut.partial and cut.status == "unfinished" and not by_id["finished"].partial
    # the rows are those of every fold (not the holdout), each from its fold's best checkpoint
    assert np.array_equal(cut.rel_path, by_id["finished"].rel_path)
    import torch

    for fold in (0, 1):
        saved = torch.load(cut.checkpoints[fold], weights_only=True)["val_probs"].numpy()
        rows = pd.read_csv(cut.run_dir / "folds.csv", dtype={"rel_path": str})
        rel = rows.loc[rows["fold"] == fold, "rel_path"].to_numpy()
        order = np.searchsorted(cut.rel_path, rel)
        np.testing.assert_array_equal(cut.probs[order], saved)
    assert selection_f1(cut.run_dir) == pytest.approx(macro_f1(cut.label, cut.probs))


def test_a_partial_member_that_adds_nothing_once_predicted_with_tta_is_dropped():
    """Greedy picked a partial trial on its no-TTA OOF; predicted again with TTA it no longer helps: the
    selection repeated on the exact OOF drops it, and the best single member stays first with all votes."""
    from orchestrator.ensemble.members import Predicted, select_again
    from orchestrator.ensemble.result import EnsembleMember

    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, 300)
    good = np.eye(NUM_CLASSES)[np.where(rng.random(300) < 0.8, labels, (labels + 1) % NUM_CLASSES)]
    noise = rng.random((300, NUM_CLASSES))  # the partial trial's OOF with TTA: no signal at all

    def member(trial_id: str, oof: np.ndarray, recomputed: bool) -> EnsembleMember:
        f1 = macro_f1(labels, oof)
        return EnsembleMember(trial_id, Path(trial_id), "b", 1, 0.5, ("hflip",), f1, f1, recomputed)

    def predicted(oofs: list[np.ndarray]) -> Predicted:
        members = [member("partial", oofs[0], True), member("finished", oofs[1], False)]
        evals = [np.full((4, NUM_CLASSES), i) for i in range(2)]
        return Predicted(members, evals, oofs, oofs, evals, evals)

    again = select_again(predicted([noise, good]), labels, 25, log=lambda line: None)
    assert [m.trial_id for m in again.members] == ["finished"] and again.members[0].weight == 1.0
    assert len(again.eval) == len(again.oof) == len(again.holdout) == 1 and (again.eval[0] == 1).all()
    helpful = np.eye(NUM_CLASSES)[labels] * 0.6 + good * 0.4  # better alone: it becomes the first member
    again = select_again(predicted([helpful, good]), labels, 25, log=lambda line: None)
    assert again.members[0].trial_id == "partial" and sum(m.weight for m in again.members) == 1.0


def test_the_summary_says_which_cut_trials_are_candidates():
    from orchestrator.search.summary import cut_line

    assert cut_line(["a", "b", "c"], candidates={"a"}, pruned={"b"}) == (
        "cut by the time budget: a (best fold models and OOF kept: ensemble candidates); "
        "b (outside keep_top: checkpoints deleted, OOF kept as a record); "
        "c (cut before every fold had an epoch: not candidates)"
    )
    assert (
        cut_line(["c"], (), ())
        == "cut by the time budget: c (cut before every fold had an epoch: not candidates)"
    )


def test_ensemble_reports_in_sample_nested_and_holdout_estimates(search_with_holdout, tmp_path):
    world = search_with_holdout
    result = run_ensemble(
        world["data"].root,
        "s",
        storage=world["storage"],
        top=2,
        out=tmp_path / "submission.csv",
        cache_dir=world["cache"],
        log=None,
    )
    estimates = result.estimates
    assert {m.trial_id for m in result.members} == {"finished", "cut"}
    cut = next(m for m in result.members if m.trial_id == "cut")
    assert cut.recomputed  # its stored OOF had no TTA: predicted again with hflip before judging it
    assert estimates.in_sample_f1 == pytest.approx(result.oof_f1)
    assert estimates.nested_f1 is not None and len(estimates.nested_fold_f1) == 2
    held = world["folds"][world["folds"]["fold"] == HOLDOUT_FOLD]
    assert estimates.holdout_images == len(held) and estimates.holdout_persons == held["person_id"].nunique()
    assert estimates.trusted == "holdout" and estimates.trusted_f1 == estimates.holdout_f1

    report = json.loads((tmp_path / "ensemble.json").read_text())
    assert report["estimates"]["trusted"] == "holdout"
    assert report["estimates"]["holdout_f1"] == pytest.approx(estimates.holdout_f1)
    world["holdout_f1"] = estimates.holdout_f1  # for the next test: the same ensemble, other eval images
    with np.load(tmp_path / HOLDOUT_PROBS) as saved:  # the vote label-issues judges holdout persons by
        assert saved["rel_path"].tolist() == sorted(held["rel_path"])
        assert saved["members"].tolist() == [m.trial_id for m in result.members]
        assert macro_f1(saved["label"], saved["probs"]) == pytest.approx(estimates.holdout_f1)
        assert bool(saved["own_tta"]) and bool(saved["all_folds"])


def test_the_holdout_vote_equals_scoring_the_submission_on_those_persons(search_with_holdout, tmp_path):
    """Copy the data with the holdout persons' images (shuffled, among two other eval images) as the eval
    set: the submission's F1 on those images must be the holdout estimate the ensemble printed when its
    eval set was another one (so a mix-up of eval and holdout rows would show)."""
    world = search_with_holdout
    root = tmp_path / "data"
    shutil.copytree(world["data"].root / "train", root / "train")
    held = world["folds"][world["folds"]["fold"] == HOLDOUT_FOLD]
    table = read_train(world["data"].root).table.set_index("rel_path")
    (root / "eval" / "images").mkdir(parents=True)
    ids, answers = [], {}
    shuffled = np.random.default_rng(3).permutation(sorted(held["rel_path"]))
    for i, rel in enumerate(shuffled):
        name = f"h{i:03d}{Path(rel).suffix}"
        shutil.copy(world["data"].root / rel, root / "eval" / "images" / name)
        ids.append(name)
        answers[name] = int(table.loc[rel, "label"])
    extra = sorted((world["data"].root / "eval" / "images").iterdir())[:2]
    for i, path in enumerate(extra):
        shutil.copy(path, root / "eval" / "images" / f"x{i}{path.suffix}")
        ids.insert(3 * i, f"x{i}{path.suffix}")
    pd.DataFrame({"ImageID": ids, "ans": 0}).to_csv(root / "eval" / "info.csv", index=False)
    run_ensemble(
        root,
        "s",
        storage=world["storage"],
        top=2,
        out=tmp_path / "sub.csv",
        cache_dir=world["cache"],
        log=None,
    )
    submitted = pd.read_csv(tmp_path / "sub.csv", dtype={"ImageID": str}).set_index("ImageID")
    names = sorted(answers)
    predicted = submitted.loc[names, "ans"].to_numpy()
    truth = np.array([answers[n] for n in names])
    assert macro_f1(truth, np.eye(NUM_CLASSES)[predicted]) == pytest.approx(world["holdout_f1"])


def test_keep_top_ranks_by_the_ensembles_criterion_and_keeps_pruned_oof(
    search_with_holdout, tmp_path, monkeypatch
):
    from orchestrator.search import summary as summary_module

    storage = tmp_path / "runs"
    shutil.copytree(search_with_holdout["storage"] / "s", storage / "s")
    trials = storage / "s" / "trials"
    rows = [
        {"trial_id": t, "state": state, "run_dir": str(trials / t), "config": {"k": 2}, "best_f1": 0.5}
        for t, state in (("finished", "completed"), ("cut", "cut"))
    ]
    scores = {t: selection_f1(trials / t) for t in ("finished", "cut")}
    best = max(scores, key=scores.get)
    worst = min(scores, key=scores.get)

    recorded = []

    class RecordingLog:  # what the search records in MLflow: only which checkpoints were deleted
        def checkpoints_deleted(self, trial_ids) -> None:
            recorded.extend(trial_ids)

    kept = summary_module._prune_checkpoints(rows, 1, RecordingLog())
    assert kept == {best} and recorded == [worst]
    assert not (trials / worst / "checkpoints").exists() and (trials / worst / "oof.npz").is_file()
    assert selection_f1(trials / worst) == pytest.approx(scores[worst])  # the same figure, kept as a record


def test_a_stale_partial_oof_of_a_restarted_cut_trial_is_replaced_before_pruning(
    search_with_holdout, tmp_path
):
    """A cut trial pruned by an earlier driver kept a partial ``oof.npz``; restarted on a resume it trained
    new fold models. Pruned again, its OOF record must be the new checkpoints', not the stale file
    (issue 24)."""
    from orchestrator.search import summary as summary_module
    from trainers.run_outputs import assemble_out_of_fold

    storage = tmp_path / "runs"
    shutil.copytree(search_with_holdout["storage"] / "s", storage / "s")
    cut = storage / "s" / "trials" / "cut"
    fresh = assemble_out_of_fold(cut, 2)
    stale = {**fresh, "probs": np.roll(fresh["probs"], 1, axis=1), "partial": np.array(True)}
    np.savez(cut / "oof.npz", **stale)  # what the earlier driver kept
    rows = [{"trial_id": "cut", "state": "cut", "run_dir": str(cut), "config": {"k": 2}, "best_f1": 0.5}]

    class QuietLog:
        def checkpoints_deleted(self, trial_ids) -> None:
            pass

    summary_module._prune_checkpoints(rows, 0, QuietLog())
    assert not (cut / "checkpoints").exists()
    with np.load(cut / "oof.npz") as kept:
        np.testing.assert_array_equal(kept["probs"], fresh["probs"])


def test_a_partial_oof_that_cannot_be_kept_before_pruning_is_said(tmp_path, capsys):
    """``_keep_partial_oof`` no longer swallows its failure: the trial is named in one warning (issue 24)."""
    run_dir = tmp_path / "trials" / "t9"
    run_dir.mkdir(parents=True)  # no config.yaml: the partial OOF cannot be written
    import orchestrator.search.summary as summary_module

    summary_module._keep_partial_oof(run_dir, {"trial_id": "t9", "config": None})
    err = capsys.readouterr().err
    assert err.startswith("warning: trial t9: its partial out-of-fold predictions were not kept") and (
        "FileNotFoundError" in err
    )


# --- the time budget ---------------------------------------------------------------------------------------


def test_a_killed_drivers_time_is_billed_on_resume(tmp_path):
    """The stopper writes the seconds used as the search runs, so a driver killed outright (no record at
    its end) does not get its whole budget again on resume; the preparation is recorded beside the budget,
    not billed (issue 24)."""
    budget = settle_budget(tmp_path, "s", 1.0, resuming=False)
    budget.start(prep_s=12.34)
    saved = json.loads((tmp_path / "budget.json").read_text())
    assert saved["prep_s"] == 12.3 and "the preparation took 12 s (not counted)" in budget.describe()
    (tmp_path / "budget.json").write_text(json.dumps({**saved, "deadline": time.time() + 50}))  # 10 s in
    stopper = BudgetStopper(tmp_path / "budget.json")
    assert not stopper.stop_all()
    assert json.loads((tmp_path / "budget.json").read_text())["used_s"] == pytest.approx(10, abs=1)
    resumed = settle_budget(tmp_path, "s", None, resuming=True)  # SIGKILL: the driver never recorded its end
    assert resumed.deadline == pytest.approx(time.time() + 50, abs=2)


def test_budget_is_kept_across_resumes_and_a_spent_one_is_refused(tmp_path):
    budget = settle_budget(tmp_path, "s", 1.0, resuming=False)
    assert budget.total_s == 60 and budget.deadline == pytest.approx(time.time() + 60, abs=2)
    saved = json.loads((tmp_path / "budget.json").read_text())
    (tmp_path / "budget.json").write_text(json.dumps({**saved, "used_s": 45.0}))
    resumed = settle_budget(tmp_path, "s", None, resuming=True)
    assert resumed.total_s == 60 and resumed.deadline == pytest.approx(time.time() + 15, abs=2)
    stopper = BudgetStopper(tmp_path / "budget.json")
    assert not stopper.stop_all()
    (tmp_path / "budget.json").write_text(json.dumps({**saved, "used_s": 61.0}))
    with pytest.raises(OrchestratorError, match=r"used its whole 1-minute time budget; resume with a larger"):
        settle_budget(tmp_path, "s", None, resuming=True)
    assert settle_budget(tmp_path, "s", 2.0, resuming=True).deadline == pytest.approx(time.time() + 59, abs=2)
    restored = BudgetStopper(tmp_path / "budget.json")
    (tmp_path / "budget.json").write_text(
        json.dumps({"total_s": 1, "used_s": 0, "deadline": time.time() - 1})
    )
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)  # no Tune handler: the fallback stop
    try:
        assert restored.stop_all()  # the deadline is read from the file, so a restored copy follows it
        asked = []
        signal.signal(signal.SIGUSR1, lambda signum, frame: asked.append(signum))  # Tune's, during a run
        interrupting = BudgetStopper(tmp_path / "budget.json")
        assert not interrupting.stop_all() and asked == [signal.SIGUSR1]  # Tune's graceful stop instead
        assert not interrupting.stop_all() and len(asked) == 1  # asked once
    finally:
        signal.signal(signal.SIGUSR1, previous)


def endless_trial(record_dir: Path):
    """A stand-in trial that writes a trial folder with a finished first epoch, then runs until stopped."""

    def endless_trial(params, context) -> None:
        trial_id = ray.tune.get_context().get_trial_id()
        with (record_dir / f"{trial_id}.started").open("a") as starts:  # one line per start (resumes too)
            starts.write("start\n")
        for epoch in range(1, 10_000):
            time.sleep(0.5)
            ray.tune.report({"val_f1": 0.1, "epoch": epoch, "epochs_planned": 10_000, "best_f1": 0.1})

    return endless_trial


def budget_space(tmp_path: Path) -> Path:
    raw = {
        "name": "budget",
        "trials": 3,
        "fixed": {"epochs": 1, "k": 2, "image_size": [32, 24], "batch_size": 16, "pretrained": False},
        "search": {"lr": {"loguniform": [1e-4, 1e-1]}},
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent": 1,
        "scheduler": "none",
        "sampler": {"seed": 3, "n_startup_trials": 2},
        "keep_top": 1,
    }
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    return space


def test_the_time_budget_cuts_running_trials_and_starts_no_more(tmp_path, demo_root, tracking_uri, local_ray):
    """A driver outside the main thread (no Tune signal handler there): the stopper's fallback stop."""
    space = budget_space(tmp_path)
    record = tmp_path / "record"
    record.mkdir()
    outcome = {}

    def target() -> None:
        outcome["summary"] = run_search(
            demo_root,
            space,
            storage=tmp_path / "runs",
            tracking_uri=tracking_uri,
            progress=False,
            trial_fn=endless_trial(record),
            time_budget_minutes=1.0,  # room for a trial process to start on a loaded machine
        )

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(180)
    assert not thread.is_alive(), "the time budget did not end the search"
    summary = outcome["summary"]
    assert summary.budget_spent and summary.finished
    assert len(list(record.glob("*.started"))) == 1, summary.leaderboard.to_dict("records")
    assert summary.leaderboard.loc[summary.leaderboard["epochs"] > 0, "state"].tolist() == ["cut"]
    assert "ended by its time budget" in summary.report()
    assert json.loads((tmp_path / "runs" / "budget" / "summary.json").read_text())["budget_spent"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("budget").experiment_id])
    assert runs and all(run.info.status != "RUNNING" for run in runs)

    # a resume of a spent budget is refused before Ray starts
    with pytest.raises(OrchestratorError, match="used its whole"):
        run_search(demo_root, space, storage=tmp_path / "runs", resume=True, progress=False)


@pytest.mark.slow  # two time budgets, 4 minutes: `make test-slow`
def test_a_resume_with_a_larger_budget_continues_the_cut_trial(tmp_path, demo_root, tracking_uri, local_ray):
    """In the main thread (as `foldtune search` runs) the budget stops Tune as Ctrl+C does, so the trial it
    cut stays unfinished in Tune's state: a --resume with a larger budget restarts that same trial (its
    stand-in logs a second start) instead of leaving it ended and starting a new one."""
    space = budget_space(tmp_path)
    record = tmp_path / "record"
    record.mkdir()
    search = {"storage": tmp_path / "runs", "tracking_uri": tracking_uri, "progress": False}
    fired = []

    def watchdog_stop() -> None:  # a budget that does not stop: Tune's own graceful stop, then fail
        fired.append(True)
        os.kill(os.getpid(), signal.SIGINT)

    watchdog = threading.Timer(360, watchdog_stop)
    watchdog.start()
    try:
        first = run_search(
            demo_root, space, trial_fn=endless_trial(record), time_budget_minutes=1.0, **search
        )
        assert first.budget_spent and not fired, "the time budget did not end the search"
        (cut,) = first.leaderboard.loc[first.leaderboard["state"] == "cut", "trial_id"]
        assert [p.stem for p in record.glob("*.started")] == [cut]
        assert "(cut before every fold had an epoch: not candidates)" in first.report()
        second = run_search(  # 3 minutes in all: more than a minute left to restart the trial
            demo_root, space, resume=True, trial_fn=endless_trial(record), time_budget_minutes=3.0, **search
        )
    finally:
        watchdog.cancel()
    assert not fired, "the time budget did not end the resumed search"
    assert second.budget_spent
    assert [p.stem for p in record.glob("*.started")] == [cut]  # no new trial: the cut one went on
    assert (record / f"{cut}.started").read_text().count("start") == 2
    assert second.leaderboard.set_index("trial_id").loc[cut, "state"] == "cut"


def test_the_in_sample_figure_is_never_the_trusted_one():
    """One fold and no holdout (``--folds 0``): the only figure was selected and scored on the same rows;
    the report trusts none and says what is missing (issue 24)."""
    from orchestrator.ensemble.estimates import Estimates

    alone = Estimates(in_sample_f1=0.61, nested_f1=None)
    assert alone.trusted is None and alone.trusted_f1 is None
    (line, holdout_line) = alone.lines()
    assert "trust this one" not in line and "biased, not an estimate" in line and "more than one fold" in line
    assert "no holdout persons" in holdout_line
    assert "estimate/trusted_f1" not in alone.metrics() and alone.as_dict()["trusted"] is None

    nested = Estimates(in_sample_f1=0.61, nested_f1=0.55, nested_fold_f1=[0.5, 0.6])
    assert nested.trusted == "nested" and nested.trusted_f1 == 0.55
    assert "trust this one" in nested.lines()[1] and "biased" not in nested.lines()[0]


def test_the_holdout_is_read_from_the_first_candidate_that_has_its_folds_and_a_missing_one_is_said(tmp_path):
    """The holdout figure no longer disappears when the first candidate's run folder lacks folds.csv; when
    none has one but the search's split holds holdout persons, the report says so (issue 24)."""
    from types import SimpleNamespace

    from orchestrator.ensemble.estimates import holdout_of

    rows = pd.DataFrame(
        {
            "rel_path": ["p1/a.jpg", "p2/b.jpg", "p3/c.jpg"],
            "person_id": ["p1", "p2", "p3"],
            "fold": [0, 1, -1],
            "label": [0, 4, 7],
        }
    )
    search_dir = tmp_path / "runs" / "s"
    first, second = search_dir / "trials" / "t1", search_dir / "trials" / "t2"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    rows.to_csv(search_dir / "folds.csv", index=False)
    rows.to_csv(second / "folds.csv", index=False)
    said: list[str] = []
    candidates = [SimpleNamespace(run_dir=first), SimpleNamespace(run_dir=second)]
    held = holdout_of(search_dir, candidates, said.append)
    assert list(held.rel_path) == ["p3/c.jpg"] and list(held.label) == [7] and held.persons == 1 and not said

    (second / "folds.csv").unlink()
    held = holdout_of(search_dir, candidates, said.append)
    assert len(held) == 0
    assert (
        len(said) == 1 and "holds holdout persons but no candidate's run folder has its folds.csv" in said[0]
    )


def test_the_nested_figure_says_what_it_nests_and_which_selection_it_describes():
    """The nested figure nests the ensemble selection only; after ``select_again`` it describes the first
    selection, and the report says so (issue 24)."""
    from orchestrator.ensemble.estimates import Estimates

    estimates = Estimates(in_sample_f1=0.5, nested_f1=0.45, nested_fold_f1=[0.4, 0.5])
    text = "\n".join(estimates.lines())
    assert "it nests the selection only: each trial's epochs, keep_top and the search saw every fold" in text
    assert "first selection" not in text
    estimates.selection_repeated = True
    assert "it describes the first selection, which was then repeated" in "\n".join(estimates.lines())
