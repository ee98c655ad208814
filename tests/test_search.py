"""The search: Optuna's view of stopped trials, resume rules, and real Ray Tune searches on tiny data.

The end-to-end searches run real trials (trainers.fit on CPU) on a local Ray with 2 CPUs; they take tens of
seconds to minutes, so they are marked slow. Unit tests of the pieces run by default.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import optuna
import pandas as pd
import psutil
import pytest
import ray
import torch
import yaml
from mlflow import MlflowClient

from orchestrator.errors import OrchestratorError
from orchestrator.search import run_search
from orchestrator.search.console import progress_table
from orchestrator.search.constants import ASHA_STATE, EXPERIMENT_DIRNAME
from orchestrator.search.optuna_adapter import make_searcher, study_storage
from orchestrator.search.prepare import describe_holdout, settle_folds
from orchestrator.search.settle import settle_space
from orchestrator.search.stopping import EarlyStops, FinishingASHA, make_scheduler
from orchestrator.search.summary import trial_rows
from orchestrator.space import parse_space
from trainers.data import read_train
from trainers.errors import FoldtuneError
from trainers.folds import FoldWarning, make_folds, read_folds, write_folds

GOOD = {"backbone": "resnet10t", "lr": 3e-3, "focal_gamma": 1.0, "freeze_depth": 0}
STALLED = {"backbone": "resnet10t", "lr": 1e-9, "focal_gamma": 1.0, "freeze_depth": 0}  # learns nothing
EXPLODING = {"backbone": "lcnet_050", "lr": 1e6, "focal_gamma": 1.0, "freeze_depth": 0}  # NaN at once


def resume_states(search_dir: Path) -> list[str]:
    """Trials with a resume state (``last.pt``, on node-local disk, see trainers.resume)."""
    from trainers.resume import RESUME_STATE, local_resume_dir

    trials = search_dir / "trials"
    if not trials.is_dir():
        return []
    return [d.name for d in trials.iterdir() if (local_resume_dir(d) / RESUME_STATE).exists()]


def space_dict(epochs: int = 2, **changes) -> dict:
    """A tiny search over the four core parameters; trials run one at a time so ASHA's view is fixed."""
    raw = {
        "name": "tiny",
        "trials": 3,
        "fixed": {"epochs": epochs, "k": 2, "image_size": [32, 24], "batch_size": 16, "pretrained": False},
        "search": {
            "backbone": {"choice": ["resnet10t", "lcnet_050"]},
            "lr": {"loguniform": [1e-9, 1e6]},
            "focal_gamma": {"uniform": [0.0, 3.0]},
            "freeze_depth": {"int": [0, 1]},
        },
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent": 1,
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        "sampler": {"seed": 3, "n_startup_trials": 2},
        "keep_top": 1,
        "max_failures": 0,
    }
    raw.update(changes)
    return raw


def write_space(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(space_dict(**changes), sort_keys=False))
    return path


def load_study(search_dir: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=study_storage(search_dir))


def by_ray_id(study: optuna.Study) -> dict[str, optuna.trial.FrozenTrial]:
    """The study's trials by their Ray trial id (the later one when a resume re-attached a trial); trials
    not yet proposed to Ray (points to evaluate still WAITING) have none."""
    return {t.user_attrs["ray_trial_id"]: t for t in study.trials if "ray_trial_id" in t.user_attrs}


# --- pieces -----------------------------------------------------------------------------------------------


def record_early_stops(search_dir: Path, *trial_ids: str) -> None:
    """What FinishingASHA writes when it stops trials before their last epoch (see the scheduler tests)."""
    state = search_dir / ASHA_STATE
    saved = json.loads(state.read_text()) if state.exists() else {"num_stopped": 0, "brackets": []}
    state.write_text(json.dumps({**saved, "stopped_early": sorted(trial_ids)}))


def test_optuna_is_told_stopped_trials_were_pruned(tmp_path):
    space = parse_space(space_dict(trials=4, points_to_evaluate=[GOOD, STALLED]))
    searcher = make_searcher(space, tmp_path).searcher
    assert (
        searcher.suggest("good") == GOOD and searcher.suggest("stalled") == STALLED
    )  # tried first, in order
    sampled = searcher.suggest("sampled")
    assert set(sampled) == set(GOOD) and 1e-9 <= sampled["lr"] <= 1e6
    searcher.suggest("broken")
    for trial_id, value in (("good", 0.30), ("stalled", 0.05), ("sampled", 0.20)):
        searcher.on_trial_result(trial_id, {"val_f1": value, "training_iteration": 1, "epoch": 1})
    searcher.on_trial_complete("good", {"val_f1": 0.40, "training_iteration": 2, "epoch": 2, "done": True})
    stopped = {"val_f1": 0.04, "training_iteration": 2, "epoch": 2, "done": True}  # no mark in it
    record_early_stops(tmp_path, "stalled")  # the scheduler's record says it was stopped
    searcher.on_trial_complete("stalled", stopped)
    searcher.on_trial_complete("sampled", {"val_f1": 0.25, "training_iteration": 2, "epoch": 2, "done": True})
    searcher.on_trial_complete("broken", error=True)

    trials = by_ray_id(load_study(tmp_path))
    state = optuna.trial.TrialState
    assert trials["good"].state == state.COMPLETE and trials["good"].value == 0.40
    assert trials["stalled"].state == state.PRUNED
    assert trials["stalled"].intermediate_values == {1: 0.05, 2: 0.04}
    assert trials["sampled"].state == state.COMPLETE and trials["broken"].state == state.FAIL
    searcher.on_trial_complete("stalled", stopped)  # told twice (e.g. after a resume): no change, no error
    assert by_ray_id(load_study(tmp_path))["stalled"].state == state.PRUNED


class StandInTrial:
    """What a scheduler, searcher and callbacks read of Ray's Trial: id, config, status, last result."""

    def __init__(self, trial_id: str, config: dict | None = None, status: str = "RUNNING"):
        self.trial_id, self.config, self.status = trial_id, config or {}, status
        self.last_result: dict = {}
        self.error_file = None

    def get_pickled_error(self):
        return None


def asha(state_path: Path | None, max_t: int = 3) -> FinishingASHA:
    scheduler = FinishingASHA(
        time_attr="epoch",
        max_t=max_t,
        grace_period=1,
        reduction_factor=2,
        stop_last_trials=False,
        state_path=str(state_path) if state_path else None,
    )
    scheduler.set_search_properties("val_f1", "max")
    return scheduler


def test_the_scheduler_records_the_trials_it_stops_before_their_last_epoch(tmp_path):
    """A STOP before the planned last epoch is recorded (set and state file); a STOP turned into CONTINUE
    at the last epoch is not; a trial that reports again (continued by a resume) leaves the record."""
    from ray.tune.schedulers import TrialScheduler

    state = tmp_path / ASHA_STATE
    scheduler = asha(state)
    good, weak, last = StandInTrial("good"), StandInTrial("weak"), StandInTrial("last")
    for trial in (good, weak, last):
        scheduler.on_trial_add(None, trial)

    def result(epoch, f1, planned=3):
        return {"epoch": epoch, "val_f1": f1, "epochs_planned": planned}

    assert scheduler.on_trial_result(None, good, result(1, 0.9)) == TrialScheduler.CONTINUE
    assert scheduler.on_trial_result(None, weak, result(1, 0.1)) == TrialScheduler.STOP
    assert scheduler.on_trial_result(None, last, result(1, 0.05, planned=1)) == TrialScheduler.CONTINUE
    assert scheduler.stopped_early == {"weak"} and EarlyStops(state).ids() == {"weak"}
    assert json.loads(state.read_text())["stopped_early"] == ["weak"]

    # the driver is rebuilt (resume): a new scheduler reads the record back with its rungs
    rebuilt = asha(state)
    rebuilt.on_trial_add(None, weak)  # Ray adds the restored trials to the rebuilt scheduler
    assert rebuilt.stopped_early == {"weak"} and "weak" in EarlyStops(state)
    # Ray continued "weak" after all (its stop was not in the last snapshot): it is no longer stopped
    assert rebuilt.on_trial_result(None, weak, result(2, 0.95)) == TrialScheduler.CONTINUE
    assert rebuilt.stopped_early == set() and "weak" not in EarlyStops(state)
    assert "x" not in EarlyStops(None) and "x" not in EarlyStops(tmp_path / "missing.json")


def test_early_stops_do_not_depend_on_ray_passing_one_result_dict_around(tmp_path, tracking_uri):
    """Each party gets its own deep copy of every result, as Ray versions other than 2.60 hand callbacks a
    copy: the scheduler's record alone tells the searcher (PRUNED), MLflow (KILLED), the live table and
    the leaderboard (stopped_early) which trial was stopped."""
    from ray.tune.schedulers import TrialScheduler

    from orchestrator.tracking import MlflowTrialCallback, SearchTracking
    from orchestrator.tracking.search_log import SearchLog

    space = parse_space(space_dict(epochs=3, trials=2, points_to_evaluate=[GOOD, STALLED]))
    scheduler = make_scheduler(space, tmp_path / ASHA_STATE)
    scheduler.set_search_properties("val_f1", "max")
    searcher = make_searcher(space, tmp_path).searcher
    stops = EarlyStops(tmp_path / ASHA_STATE)
    tracking = SearchTracking(tracking_uri, "tiny")
    parent = tracking.start_parent(tmp_path)
    callback = MlflowTrialCallback(SearchLog(tracking, parent, tmp_path), space.config_for, stops)
    good, stalled = StandInTrial("good", GOOD), StandInTrial("stalled", STALLED)
    for trial in (good, stalled):
        assert searcher.suggest(trial.trial_id) == trial.config
        scheduler.on_trial_add(None, trial)
        callback.on_trial_start(0, [good, stalled], trial)

    def report(trial, epoch, f1) -> str:
        result = {"val_f1": f1, "epoch": epoch, "epochs_planned": 3, "training_iteration": epoch}
        sent = copy.deepcopy(result)
        decision = scheduler.on_trial_result(None, trial, copy.deepcopy(result))
        if decision != TrialScheduler.STOP:
            searcher.on_trial_result(trial.trial_id, copy.deepcopy(result))
        callback.on_trial_result(0, [good, stalled], trial, copy.deepcopy(result))
        trial.last_result = copy.deepcopy(result)
        assert result == sent  # nobody could have marked it: every party had its own copy
        return decision

    assert report(good, 1, 0.5) == TrialScheduler.CONTINUE
    assert report(stalled, 1, 0.01) == TrialScheduler.STOP
    for epoch in (2, 3):
        assert report(good, epoch, 0.5 + epoch / 10) == TrialScheduler.CONTINUE
    (tmp_path / "trials" / "good").mkdir(parents=True, exist_ok=True)
    fit_result = {"status": "completed", "best_f1": 0.8, "best_epoch": 3, "epochs_trained": 3}
    (tmp_path / "trials" / "good" / "result.json").write_text(json.dumps(fit_result))
    for trial in (stalled, good):
        trial.status = "TERMINATED"
        searcher.on_trial_complete(trial.trial_id, copy.deepcopy(trial.last_result))
        callback.on_trial_complete(0, [good, stalled], trial)

    assert stops.ids() == {"stalled"}
    study = by_ray_id(load_study(tmp_path))
    assert study["good"].state == optuna.trial.TrialState.COMPLETE and study["good"].value == 0.8
    assert study["stalled"].state == optuna.trial.TrialState.PRUNED
    assert study["stalled"].intermediate_values == {1: 0.01}
    runs = {r.data.tags["foldtune.trial_id"]: r for r in tracking.child_runs(parent)}
    assert runs["good"].info.status == "FINISHED" and runs["stalled"].info.status == "KILLED"
    assert runs["stalled"].data.tags["foldtune.stopped_early"] == "true"
    table = progress_table([good, stalled], ["lr"], stops.ids()).splitlines()
    assert table[0] == "trials: 1 done, 1 stopped"
    results = [
        SimpleNamespace(metrics={**t.last_result, "trial_id": t.trial_id}, error=None, config=t.config)
        for t in (good, stalled)
    ]
    rows = {r["trial_id"]: r["state"] for r in trial_rows(results, space, tmp_path, stops)}
    assert rows == {"good": "completed", "stalled": "stopped_early"}


def test_progress_table_shows_state_epoch_and_f1():
    class Trial:
        def __init__(self, trial_id, status, result, config):
            self.trial_id, self.status, self.last_result, self.config = trial_id, status, result, config

    trials = [
        Trial("a1", "TERMINATED", {"epoch": 2, "val_f1": 0.41234, "best_f1": 0.5}, {"lr": 0.001}),
        Trial("b2", "TERMINATED", {"epoch": 1, "val_f1": 0.1}, {"lr": 1e-9}),
        Trial("c3", "RUNNING", {"epoch": 1, "val_f1": 0.2}, {"lr": 0.01}),
        Trial("d4", "PENDING", {}, {"lr": 0.02}),
    ]
    text = progress_table(trials, ["lr"], stopped={"b2"})  # the scheduler's record of early stops
    lines = text.splitlines()
    assert lines[0] == "trials: 1 done, 1 pending, 1 running, 1 stopped"
    assert lines[2].split() == ["a1", "done", "2", "0.4123", "0.5", "0.001"]
    assert lines[3].split()[:2] == ["b2", "stopped"] and lines[5].split() == ["d4", "pending", "0.02"]


def test_new_and_resumed_searches_are_told_apart(tmp_path):
    space_file = write_space(tmp_path / "tiny.yaml")
    storage = tmp_path / "runs"
    space, search_dir, restoring = settle_space(space_file, storage, 5, "renamed", False, None, None)
    assert (space.name, space.trials, search_dir, restoring) == ("renamed", 5, storage / "renamed", False)

    search_dir = storage / "tiny"
    (search_dir / EXPERIMENT_DIRNAME).mkdir(parents=True)
    (search_dir / "summary.json").write_text("{}")
    with pytest.raises(OrchestratorError, match=r"'tiny' already exists in .*: pass --resume"):
        settle_space(space_file, storage, None, None, False, None, None)
    with pytest.raises(OrchestratorError, match=r"nothing to resume: .*space.yaml does not exist"):
        settle_space(None, storage, None, "tiny", True, None, None)
    (search_dir / "space.yaml").write_text(parse_space(space_dict()).to_yaml())
    changed = write_space(tmp_path / "changed.yaml", max_concurrent=2)
    with pytest.raises(OrchestratorError, match=r"different space \(max_concurrent differ"):
        settle_space(changed, storage, None, "tiny", True, None, None)
    resumed, _, restoring = settle_space(None, storage, None, "tiny", True, None, None)
    assert (
        resumed.to_dict() == parse_space(space_dict()).to_dict() and restoring is False
    )  # no Tune state yet
    _, _, _ = settle_space(space_file, storage, None, None, True, 2, None)  # other resources are fine


@pytest.fixture(scope="module")
def demo_table(demo_root) -> pd.DataFrame:
    return read_train(demo_root, check_images=False).table


def split(table: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """A fold split of the tiny demo data (whose strata are too small for k folds: FoldWarning, ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldWarning)
        return make_folds(table, k=k, seed=seed)


def test_a_given_fold_file_becomes_the_search_fold_file(tmp_path, demo_root, demo_table):
    given = split(demo_table, 2, 5).sample(frac=1, random_state=0)  # any row order
    write_folds(given, tmp_path / "mine.csv")
    folds_path = tmp_path / "search" / "folds.csv"
    folds_path.parent.mkdir()
    folds_path.write_text("left by an abandoned start")  # a new search: the given file wins
    folds = settle_folds(folds_path, demo_table, 2, 42, demo_root, folds_file=tmp_path / "mine.csv")
    assert folds.equals(read_folds(tmp_path / "mine.csv"))
    assert read_folds(folds_path).equals(folds)

    # on resume the saved file stays; the same split in another order is the same split
    write_folds(given.sort_values("rel_path"), tmp_path / "sorted.csv")
    resumed = settle_folds(folds_path, demo_table, 2, 42, demo_root, tmp_path / "sorted.csv", resuming=True)
    assert resumed.equals(folds)
    person = given["person_id"].iloc[0]
    moved = given.assign(fold=given["fold"].where(given["person_id"] != person, 1 - given["fold"]))
    write_folds(moved, tmp_path / "other.csv")  # one person in the other fold
    with pytest.raises(OrchestratorError, match=r"^--folds .*other.csv differs from the folds this search"):
        settle_folds(folds_path, demo_table, 2, 42, demo_root, tmp_path / "other.csv", resuming=True)
    assert read_folds(folds_path).equals(folds)  # untouched by the refused resume


@pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")  # strata of the tiny data < k
def test_without_a_fold_file_the_search_splits_the_data_or_keeps_its_split(
    tmp_path, demo_root, demo_table, capsys
):
    folds_path = tmp_path / "folds.csv"
    made = settle_folds(folds_path, demo_table, 2, 42, demo_root)
    assert made.equals(split(demo_table, 2, 42)) and read_folds(folds_path).equals(made)
    saved = read_folds(folds_path)
    assert settle_folds(folds_path, demo_table, 2, 42, demo_root).equals(saved)  # same settings: kept
    # an abandoned start's split made with another folds_seed or holdout share is not silently kept
    write_folds(split(demo_table, 2, 9), folds_path)
    again = settle_folds(folds_path, demo_table, 2, 42, demo_root)
    assert again.equals(made) and read_folds(folds_path).equals(made)
    out = capsys.readouterr().out
    assert "of the abandoned start was made with other settings" in out and "folds_seed 42" in out
    held = settle_folds(folds_path, demo_table, 2, 42, demo_root, holdout=0.25)
    assert (held["fold"] == -1).any() and read_folds(folds_path).equals(held)
    persons = demo_table["person_id"].nunique()
    assert (
        describe_holdout(held, 0.25) == f"holdout: {persons // 4} of {persons} persons kept out of every fold"
    )
    auto = settle_folds(folds_path, demo_table, 2, 42, demo_root, holdout="auto")  # few persons: a fifth
    held_auto = auto.loc[auto["fold"] == -1, "person_id"].nunique()
    assert auto.equals(settle_folds(tmp_path / "fifth.csv", demo_table, 2, 42, demo_root, holdout=0.2))
    assert describe_holdout(auto, "auto") == (
        f"holdout: {held_auto} of {persons} persons kept out of every fold (auto: 500 persons, at most 20%)"
    )
    assert describe_holdout(made, 0.0).startswith("holdout: none")
    write_folds(split(demo_table, 2, 9), folds_path)  # on resume the saved split stays, whatever it is
    assert settle_folds(folds_path, demo_table, 2, 42, demo_root, resuming=True).equals(
        read_folds(folds_path)
    )
    with pytest.raises(OrchestratorError, match=r"folds.csv does not match the data .* \(or k=3\)"):
        settle_folds(folds_path, demo_table, 3, 42, demo_root, resuming=True)


def test_a_fold_file_that_does_not_fit_the_data_or_k_is_refused(tmp_path, demo_root, demo_table):
    folds_path = tmp_path / "search" / "folds.csv"
    short = tmp_path / "short.csv"
    write_folds(split(demo_table, 2, 5).iloc[1:], short)
    with pytest.raises(OrchestratorError, match=r"^--folds .*short.csv does not cover the images in .*data "):
        settle_folds(folds_path, demo_table, 2, 42, demo_root, folds_file=short)
    with pytest.raises(OrchestratorError, match=r"\(0 only in the fold file, 1 only in the data\)"):
        settle_folds(folds_path, demo_table, 2, 42, demo_root, folds_file=short)
    three = tmp_path / "three.csv"
    write_folds(split(demo_table, 3, 5), three)
    with pytest.raises(OrchestratorError, match=r"three.csv has 3 folds but the space has k=2: set k: 3"):
        settle_folds(folds_path, demo_table, 2, 42, demo_root, folds_file=three)
    with pytest.raises(FoldtuneError, match=r"none.csv"):  # read_folds names a missing file
        settle_folds(folds_path, demo_table, 2, 42, demo_root, folds_file=tmp_path / "none.csv")
    assert not folds_path.exists()  # nothing written for a refused file


# --- real searches ----------------------------------------------------------------------------------------


def test_smoke_search_asha_failure_and_mlflow(tmp_path, demo_root, demo_table, tracking_uri, local_ray):
    """Three trials in a fixed order: one learns, one stalls (ASHA stops it), one explodes (fails)."""
    space_file = write_space(tmp_path / "tiny.yaml", points_to_evaluate=[GOOD, STALLED, EXPLODING])
    # a label fix: the first person's gender flipped, for every trial of the search
    person = pd.read_csv(demo_root / "train" / "train.csv", dtype=str).iloc[0]
    flipped = "male" if person["gender"] == "female" else "female"
    relabel = tmp_path / "fixes.csv"
    relabel.write_text(f"id,field,value\n{person['id']},gender,{flipped}\n")
    # the user's own split (not the one the space's seed would make) is the split of every trial
    given_folds = tmp_path / "my_folds.csv"
    write_folds(split(demo_table, 2, 5), given_folds)
    summary = run_search(
        demo_root,
        space_file,
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=False,
        relabel=relabel,
        folds_file=given_folds,
    )
    search_dir = tmp_path / "runs" / "tiny"
    board = summary.leaderboard.set_index("trial_id")
    assert summary.finished and summary.search_dir == search_dir and len(board) == 3
    ids = {t.params["lr"]: ray_id for ray_id, t in by_ray_id(load_study(search_dir)).items()}
    good, stalled, exploding = ids[GOOD["lr"]], ids[STALLED["lr"]], ids[EXPLODING["lr"]]
    assert board.loc[good, "state"] == "completed" and board.loc[good, "epochs"] == 2
    assert board.loc[stalled, "state"] == "stopped_early" and board.loc[stalled, "epochs"] == 1
    assert board.loc[exploding, "state"] == "failed" and board.loc[exploding, "error"]
    assert summary.best_trial_id == good and summary.best_config["lr"] == GOOD["lr"]
    # ASHA's rungs are on disk for a resume: both trials that reported epoch 1 are in the first rung
    rungs = json.loads((search_dir / "asha_state.json").read_text())["brackets"][0]
    assert set(next(r for r in rungs if r["milestone"] == 1)["recorded"]) == {good, stalled}
    # trials run one after another in one reused process (no ~9 s start-up per trial)
    pids = {
        path.parent.name.split("_")[2]: json.loads(path.read_text().splitlines()[-1])["pid"]
        for path in (search_dir / EXPERIMENT_DIRNAME).glob("run_trial_*/result.json")
        if path.read_text().strip()
    }
    assert pids[good] == pids[stalled]
    assert summary.best_config["k"] == 2 and summary.best_config["image_size"] == [32, 24]

    # Optuna: the stopped trial is PRUNED (not COMPLETE with its truncated score), the failure is FAIL
    study = by_ray_id(load_study(search_dir))
    state = optuna.trial.TrialState
    assert [study[i].state for i in (good, stalled, exploding)] == [state.COMPLETE, state.PRUNED, state.FAIL]

    # the search folder: one fold file for all trials, summary files, bounded disk
    folds = pd.read_csv(search_dir / "folds.csv", dtype=str)
    assert folds.equals(pd.read_csv(given_folds, dtype=str))
    for trial_id in (good, stalled):
        trial_folds = pd.read_csv(search_dir / "trials" / trial_id / "folds.csv", dtype=str)
        assert trial_folds.drop(columns="label").equals(folds)  # plus the label each image trained on
    assert (search_dir / "trials" / good / "oof.npz").exists()
    with np.load(search_dir / "trials" / good / "oof.npz") as oof:  # trained and judged on the fixed labels
        mine = np.char.find(oof["rel_path"].astype(str), f"/{person['path']}/") >= 0
        assert mine.sum() == 7 and set((oof["label"][mine] % 6) // 3) == {1 if flipped == "female" else 0}
    assert (search_dir / "relabel.csv").read_text() == relabel.read_text()
    assert sorted(p.name for p in (search_dir / "trials" / good / "checkpoints").iterdir()) == [
        "fold0.pt",
        "fold1.pt",
    ]
    assert not (search_dir / "trials" / stalled / "checkpoints").exists()  # keep_top 1
    assert not resume_states(search_dir)  # the trials' node-local resume states are gone too
    assert pd.read_csv(search_dir / "leaderboard.csv", dtype={"trial_id": str})["trial_id"].tolist() == [
        good,
        stalled,
        exploding,
    ]
    saved = json.loads((search_dir / "summary.json").read_text())
    assert saved["best_trial_id"] == good and saved["parent_run_id"] == summary.parent_run_id
    records = {t["trial_id"]: t for t in saved["trials"]}
    assert records[good]["run_dir"] == str(search_dir / "trials" / good) and records[good]["best_f1"] > 0
    assert records[stalled]["status"] == "stopped_early" and records[exploding]["status"] == "failed"
    assert records[good]["config"]["backbone"] == "resnet10t" and records[good]["checkpoints_kept"]
    on_disk = sum(f.stat().st_size for f in search_dir.rglob("*") if f.is_file())
    assert 0 < summary.disk_bytes <= on_disk < summary.disk_bytes + 500_000  # + summary files and plots

    # MLflow: a parent run per search, a nested child per trial, per-epoch metrics, statuses
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("foldtune.role") == "search")
    assert parent.info.run_id == summary.parent_run_id and parent.info.status == "FINISHED"
    children = {r.data.tags["foldtune.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert set(children) == {good, stalled, exploding} and len(runs) == 4
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert children[good].info.status == "FINISHED"
    assert children[stalled].info.status == "KILLED"
    assert children[stalled].data.tags["foldtune.stopped_early"] == "true"
    assert children[stalled].data.tags["foldtune.checkpoints_deleted"] == "true"
    assert children[exploding].info.status == "FAILED" and children[exploding].data.tags["foldtune.error"]
    good_run = children[good].info.run_id
    assert [m.step for m in client.get_metric_history(good_run, "val_f1")] == [1, 2]
    assert [m.step for m in client.get_metric_history(good_run, "fold1/val_f1")] == [1, 2]
    assert children[good].data.params["lr"] == str(GOOD["lr"]) and children[good].data.params["epochs"] == "2"
    assert children[good].data.tags["foldtune.run_dir"] == str(search_dir / "trials" / good)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {
        "space.yaml",
        "folds.csv",
        "relabel.csv",
        "leaderboard.csv",
        "summary.json",
        "best_config.yaml",
    } <= (artifacts)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    assert parent.data.tags["foldtune.best_trial"] == good and parent.data.metrics["trials_failed"] == 1
    # what the UI shows: where each run came from, and the leaderboard in the search's description
    assert parent.data.tags["mlflow.source.name"] == "foldtune search"
    assert {c.data.tags["mlflow.source.name"] for c in children.values()} == {"foldtune search (trial)"}
    note = parent.data.tags["mlflow.note.content"]
    assert f"best trial `{good}`" in note and "| rank | trial | state | epochs | best val F1 |" in note
    assert all(f"`{trial_id}`" in note for trial_id in children)
    assert "Plan: 3 trials, 1 at a time (1 CPU each); scheduler asha" in note  # what it set out to do
    assert "searched: backbone, lr, focal_gamma, freeze_depth." in note
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.note.content"] == note

    # resuming with other label fixes is refused before anything runs
    other = tmp_path / "other.csv"
    other.write_text(f"id,field,value\n{person['id']},age,33\n")
    with pytest.raises(OrchestratorError, match="differs from the label fixes this search started with"):
        run_search(
            demo_root, space_file, resume=True, storage=tmp_path / "runs", relabel=other, progress=False
        )

    # ... and so is resuming with another fold file, before any trial runs
    other_folds = tmp_path / "other_folds.csv"
    write_folds(read_folds(given_folds).assign(fold=lambda f: 1 - f["fold"]), other_folds)
    with pytest.raises(OrchestratorError, match="differs from the folds this search started with"):
        run_search(
            demo_root,
            space_file,
            resume=True,
            storage=tmp_path / "runs",
            folds_file=other_folds,
            progress=False,
        )
    assert pd.read_csv(search_dir / "folds.csv", dtype=str).equals(folds)

    # starting it again without --resume is refused with advice
    with pytest.raises(OrchestratorError, match="pass --resume to continue it"):
        run_search(
            demo_root, space_file, storage=tmp_path / "runs", tracking_uri=tracking_uri, progress=False
        )


# --- real searches with a stand-in trial ------------------------------------------------------------------
#
# ``run_search(trial_fn=...)`` runs the real driver, Tune, ASHA, Optuna and MLflow with a stand-in for
# ``run_trial``: seconds per trial instead of a training run, with the score and the faults a test picks.

STRONG, WEAK = {"lr": 0.9}, {"lr": 0.002}  # a stand-in trial's val_f1 is its lr: strong beats weak


def standin_space(path: Path, epochs: int = 4, **changes) -> Path:
    """A search over ``lr`` alone (the stand-in's score); one trial at a time so ASHA's view is fixed."""
    raw = {
        "name": "tiny",
        "trials": 2,
        "fixed": {"epochs": epochs, "k": 2, "image_size": [32, 24], "batch_size": 16, "pretrained": False},
        "search": {"lr": {"loguniform": [1e-3, 1.0]}},
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent": 1,
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        "sampler": {"seed": 3, "n_startup_trials": 2},
        "points_to_evaluate": [STRONG, WEAK],
        "keep_top": 2,
        "max_failures": 0,
    }
    raw.update(changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def standin_trial(
    epoch_s: float = 0.0,
    crash_lr: float | None = None,
    raise_lr: float | None = None,
    raise_all: bool = False,
    hold_file: str | None = None,
    hold_from: int = 1,
    full_flag: str | None = None,
    full_at: int = 2,
):
    """A stand-in for ``run_trial``: reports val_f1 = lr for each planned epoch with a marker checkpoint,
    continues from that checkpoint when Ray resumes it, and writes fit's ``result.json`` at the end.

    ``epoch_s`` seconds per epoch. After its first epoch a trial with ``lr == crash_lr`` kills its own
    process (``os._exit``), one with ``lr == raise_lr`` (every one with ``raise_all``) raises, and with
    ``hold_file`` the ``hold_from``-th trial to start and later ones wait until that file exists. With
    ``full_flag``, the first trial to reach epoch ``full_at`` finds the disk full there (ENOSPC, as
    ``trainers.io`` meets it), once: the flag file says it happened. A
    closure, so Ray ships it by value to the trial processes (this module is not importable there)."""

    def standin(params, context) -> None:
        import errno
        import json
        import os
        import tempfile
        import time
        from pathlib import Path

        from ray import tune

        trial_id = tune.get_context().get_trial_id()
        run_dir = Path(context.trials_dir) / trial_id
        run_dir.mkdir(parents=True, exist_ok=True)
        planned = context.space.config_for(params).epochs
        lr = float(params["lr"])
        holds = hold_file is not None and len(list(Path(context.trials_dir).iterdir())) >= hold_from
        done = 0
        checkpoint = tune.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                done = json.loads((Path(folder) / "foldtune_marker.json").read_text())["epoch"]
        for epoch in range(done + 1, planned + 1):
            time.sleep(epoch_s)
            if full_flag is not None and epoch == full_at and not Path(full_flag).exists():
                Path(full_flag).touch()
                raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "last.pt"))
            with open(run_dir / "epochs.log", "a") as log:
                log.write(f"{epoch}\n")
            metrics = {
                "val_f1": lr,
                "epoch": epoch,
                "epochs_planned": planned,
                "best_f1": lr,
                "best_epoch": epoch,
            }
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "foldtune_marker.json").write_text(json.dumps({"epoch": epoch}))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
            if epoch == 1 and crash_lr is not None and lr == crash_lr:
                os._exit(1)  # the trial process dies mid-trial, as on a segfault or the OOM killer
            if epoch == 1 and (raise_all or (raise_lr is not None and lr == raise_lr)):
                raise RuntimeError(f"stand-in trial failed on purpose (lr {lr})")
            while holds and not Path(hold_file).exists():
                time.sleep(0.05)
        fit_result = {"status": "completed", "best_f1": lr, "best_epoch": planned, "epochs_trained": planned}
        (run_dir / "result.json").write_text(json.dumps(fit_result))

    return standin


def child_runs(tracking_uri: str, name: str = "tiny") -> tuple[object, dict[str, object]]:
    """(the search's parent run, its child runs by trial id) in the MLflow store."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("foldtune.role") == "search")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return parent, {r.data.tags["foldtune.trial_id"]: r for r in children}


@pytest.mark.filterwarnings("ignore::trainers.folds.FoldWarning")  # strata of the tiny data < k
def test_asha_stops_reach_optuna_mlflow_and_the_summary_through_a_real_search(
    tmp_path, demo_root, tracking_uri, local_ray
):
    """Real Tune + ASHA with a stand-in trial: the weak trial is stopped after epoch 1 of 4. Optuna has it
    PRUNED (the strong one COMPLETE), MLflow KILLED (FINISHED), the summary stopped_early (completed), and
    the search counts as finished; all from the scheduler's record in asha_state.json. Tune's own Ctrl+C
    handlers are gone afterwards: the caller's are back."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGUSR1)}
    summary = run_search(
        demo_root,
        standin_space(tmp_path / "tiny.yaml"),
        storage=tmp_path / "runs",
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=False,
        trial_fn=standin_trial(),
    )
    search_dir = tmp_path / "runs" / "tiny"
    ids = {t.params["lr"]: ray_id for ray_id, t in by_ray_id(load_study(search_dir)).items()}
    strong, weak = ids[STRONG["lr"]], ids[WEAK["lr"]]
    assert json.loads((search_dir / ASHA_STATE).read_text())["stopped_early"] == [weak]
    board = summary.leaderboard.set_index("trial_id")
    assert board.loc[strong, "state"] == "completed" and board.loc[strong, "epochs"] == 4
    assert board.loc[weak, "state"] == "stopped_early" and board.loc[weak, "epochs"] == 1
    assert summary.finished and summary.problem() is None
    study = by_ray_id(load_study(search_dir))
    assert study[strong].state == optuna.trial.TrialState.COMPLETE and study[strong].value == STRONG["lr"]
    assert study[weak].state == optuna.trial.TrialState.PRUNED
    parent, children = child_runs(tracking_uri)
    assert children[strong].info.status == "FINISHED" and children[weak].info.status == "KILLED"
    assert children[weak].data.tags["foldtune.stopped_early"] == "true"
    assert parent.info.status == "FINISHED" and parent.data.tags["foldtune.finished"] == "true"
    saved = json.loads((search_dir / "summary.json").read_text())["trials"]
    assert {t["trial_id"]: t["status"] for t in saved} == {strong: "completed", weak: "stopped_early"}
    assert {number: signal.getsignal(number) for number in handlers} == handlers


DRIVER = """
import sys
import ray
from orchestrator.search import run_search

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
data, space, storage, tracking, cache = sys.argv[1:6]
run_search(data, space, storage=storage, tracking_uri=tracking, cache_dir=cache, progress=False)
"""


def snapshot_statuses(experiment_dir: Path) -> dict[str, str]:
    """Trial statuses in Ray Tune's latest experiment snapshot (what a restore starts from)."""
    for path in experiment_dir.glob("experiment_state-*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):  # being replaced right now
            return {}
        states = [json.loads(t[0]) if isinstance(t[0], str) else t[0] for t in data["trial_data"]]
        return {s["trial_id"]: s["status"] for s in states}
    return {}


def test_resume_after_the_driver_is_killed(tmp_path, demo_root, tracking_uri):
    """SIGKILL the driver once a trial has finished and the next is mid-way; resume finishes the search
    without re-running the finished trial, continuing the interrupted one, with Optuna's history intact."""
    # learning rates that train (the default range reaches 1e6 on purpose, and which sampled rate diverges
    # on the tiny data depends on the torch version: this test is about resuming, not diverging)
    search = {**space_dict()["search"], "lr": {"loguniform": [1e-3, 1e-2]}}
    space_file = write_space(
        tmp_path / "tiny.yaml", epochs=3, scheduler="none", points_to_evaluate=[GOOD], search=search
    )
    storage, search_dir = tmp_path / "runs", tmp_path / "runs" / "tiny"
    arguments = [str(demo_root), str(space_file), str(storage), tracking_uri, str(tmp_path / "c")]
    with open(tmp_path / "driver.log", "w") as log:  # the child keeps its own handle
        driver = subprocess.Popen(
            [sys.executable, "-c", DRIVER, *arguments], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    deadline = time.monotonic() + 300
    try:
        while True:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no finished trial plus a half-done one within 300 s"
            done = [
                i for i, s in snapshot_statuses(search_dir / EXPERIMENT_DIRNAME).items() if s == "TERMINATED"
            ]
            midway = resume_states(search_dir)
            if done and midway:
                break
            time.sleep(0.1)
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    # Ray's reaper takes the driver's local cluster down; its idle agents linger, so end those ourselves
    _, lingering = psutil.wait_procs(ray_processes, timeout=20)
    for process in lingering:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(lingering, timeout=20)
    finished, interrupted = done[0], midway[0]
    assert not (search_dir / "trials" / interrupted / "result.json").exists()
    finished_result = search_dir / "trials" / finished / "result.json"
    finished_stamp = finished_result.stat().st_mtime_ns
    before = by_ray_id(load_study(search_dir))
    assert before[finished].state == optuna.trial.TrialState.COMPLETE

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_search(
            demo_root,
            space_file,
            resume=True,
            storage=storage,
            tracking_uri=tracking_uri,
            cache_dir=tmp_path / "c",
            progress=False,
        )
    finally:
        ray.shutdown()
    board = summary.leaderboard.set_index("trial_id")
    assert summary.finished and len(board) == 3 and set(board["state"]) == {"completed"}
    assert finished_result.stat().st_mtime_ns == finished_stamp  # not trained again
    progress = pd.read_csv(next((search_dir / EXPERIMENT_DIRNAME).glob(f"*{interrupted}*/progress.csv")))
    assert (
        progress["epoch"].is_monotonic_increasing and progress["epoch"].is_unique
    )  # continued, not restarted
    assert progress["epoch"].iloc[-1] == 3

    after = by_ray_id(load_study(search_dir))
    assert set(after) == set(board.index) and len(load_study(search_dir).trials) == 3
    assert (
        after[finished].value == before[finished].value and after[finished].params == before[finished].params
    )
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in after.values())

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [r for r in runs if r.data.tags.get("foldtune.role") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and parents[0].info.run_id == summary.parent_run_id
    assert sorted(r.data.tags["foldtune.trial_id"] for r in children) == sorted(board.index)  # no duplicates
    assert all(r.info.status == "FINISHED" for r in children) and parents[0].info.status == "FINISHED"
    resumed_child = next(r for r in children if r.data.tags["foldtune.trial_id"] == interrupted)
    assert [m.step for m in client.get_metric_history(resumed_child.info.run_id, "val_f1")] == [1, 2, 3]


@pytest.mark.slow
def test_search_survives_losing_a_node(tmp_path, demo_root, tracking_uri):
    """Two-node local Ray cluster, each node with its own node-local FOLDTUNE_CACHE (as two machines have);
    the worker node dies mid-search; its trial is retried on the head without its resume state (left on
    the lost node), keeps the best checkpoints of the shared run folder unless it beats them, and all
    finish."""
    from ray.cluster_utils import Cluster

    space_file = write_space(
        tmp_path / "tiny.yaml", epochs=4, scheduler="none", trials=3, max_concurrent=2, max_failures=2
    )
    caches = {"head": tmp_path / "head-cache", "worker": tmp_path / "worker-cache"}
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": False,
            "env_vars": {"FOLDTUNE_CACHE": str(caches["head"])},
        },
    )
    worker = cluster.add_node(num_cpus=1, env_vars={"FOLDTUNE_CACHE": str(caches["worker"])})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    search_dir = tmp_path / "runs" / "tiny"
    killed = threading.Event()
    best_before: dict[str, float] = {}

    def states_on(node: str) -> list[Path]:
        return list((caches[node] / "resume").glob("*/last.pt")) if (caches[node] / "resume").is_dir() else []

    def kill_worker_when_both_trials_train() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed.is_set():
            if states_on("head") and states_on("worker"):
                for checkpoint in search_dir.glob("trials/*/checkpoints/fold*.pt"):
                    best_before[str(checkpoint)] = float(torch.load(checkpoint, weights_only=True)["val_f1"])
                cluster.remove_node(worker)
                killed.set()
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_worker_when_both_trials_train, daemon=True)
    killer.start()
    try:
        summary = run_search(
            demo_root,
            space_file,
            storage=tmp_path / "runs",
            tracking_uri=tracking_uri,
            cache_dir=tmp_path / "c",
            progress=False,
        )
    finally:
        killed.set()
        ray.shutdown()
        cluster.shutdown()
    assert killer.is_alive() is False
    assert summary.finished and len(summary.leaderboard) == 3
    assert set(summary.leaderboard["state"]) == {"completed"}, summary.leaderboard
    assert all((Path(d) / "result.json").exists() for d in summary.leaderboard["run_dir"])
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    retried = [r for r in runs if r.data.tags.get("foldtune.retries")]
    assert retried and all(r.info.status == "FINISHED" for r in runs)
    assert best_before  # the worker's trial had best checkpoints on the shared folder when it was lost
    for path, score in best_before.items():  # never replaced by a worse model (pruned trials: gone)
        if Path(path).exists():
            assert float(torch.load(path, weights_only=True)["val_f1"]) >= score, path


def test_asha_never_kills_a_trial_at_its_last_epoch():
    """A rung at the last epoch must not kill the trial before fit writes its OOF predictions."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class StandIn:
        def __init__(self, trial_id: str):
            self.trial_id = trial_id
            self.config = {}

    def decisions(scheduler_class) -> list[str]:
        scheduler = scheduler_class(
            time_attr="epoch",
            metric="val_f1",
            mode="max",
            max_t=2,
            grace_period=1,
            reduction_factor=2,
            stop_last_trials=False,
        )
        trials = [StandIn(f"t{i}") for i in range(4)]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        out = []
        for epoch in (1, 2):
            for score, trial in zip((0.9, 0.8, 0.7, 0.6), trials, strict=True):
                result = {"epoch": epoch, "val_f1": score, "epochs_planned": 2}
                out.append(scheduler.on_trial_result(None, trial, result))
        return out

    assert TrialScheduler.STOP in decisions(ASHAScheduler)[4:]  # plain ASHA kills at the final rung
    assert TrialScheduler.STOP not in decisions(FinishingASHA)[4:]
    assert decisions(FinishingASHA)[:4] == decisions(ASHAScheduler)[:4]  # earlier rungs decide as before


def test_asha_rungs_survive_a_restarted_scheduler(tmp_path):
    """Ray rebuilds the scheduler empty on resume; ours reads its rungs back, so later trials are judged."""
    from ray.tune.schedulers import TrialScheduler

    class StandIn:
        def __init__(self, trial_id: str):
            self.trial_id = trial_id
            self.config = {}

    def scheduler(state_path) -> FinishingASHA:
        return FinishingASHA(
            time_attr="epoch",
            metric="val_f1",
            mode="max",
            max_t=4,
            grace_period=1,
            reduction_factor=2,
            stop_last_trials=False,
            state_path=state_path,
        )

    state = tmp_path / "asha_state.json"
    before = scheduler(str(state))
    for name, score in (("a", 0.4), ("b", 0.5)):  # each at least as good as those before: both continue
        before.on_trial_add(None, StandIn(name))
        result = {"epoch": 1, "val_f1": score, "epochs_planned": 4}
        assert before.on_trial_result(None, StandIn(name), result) == TrialScheduler.CONTINUE
    assert state.is_file()

    weak = {"epoch": 1, "val_f1": 0.1, "epochs_planned": 4}
    forgetful, remembering = scheduler(None), scheduler(str(state))  # what a resumed driver builds
    for rebuilt in (forgetful, remembering):
        rebuilt.on_trial_add(None, StandIn("c"))
    assert (
        forgetful.on_trial_result(None, StandIn("c"), dict(weak)) == TrialScheduler.CONTINUE
    )  # judged alone
    assert remembering.on_trial_result(None, StandIn("c"), dict(weak)) == TrialScheduler.STOP  # below a and b
