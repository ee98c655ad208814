"""A search that plans its budget: screen on few folds, then the best configuration trained to the end.

The arithmetic (``orchestrator.plan``), the pieces that carry it (``train_folds`` in fit and in the ensemble's
candidates, the screen's end in the stopper and the searcher, the refit mix chosen on the holdout), and one
real planned search on the demo data followed by its ensemble.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.search import Searcher

from orchestrator.ensemble.estimates import (
    Estimates,
    Holdout,
    person_bootstrap,
    persons_of_test_set,
    prediction_interval,
)
from orchestrator.ensemble.refit_mix import choose_mix, mixed
from orchestrator.ensemble.selection import macro_f1
from orchestrator.ensemble.stage import run_ensemble
from orchestrator.plan import (
    FINAL_MARGIN,
    Plan,
    PlanError,
    describe_plan,
    final_epochs,
    final_seeds,
    parse_plan,
    seconds_per_image,
    split_budget,
)
from orchestrator.search.budget import BUDGET_FILE, BudgetStopper, TimeBudget, close_screen
from orchestrator.search.driver import run_search
from orchestrator.search.optuna_adapter import PrunedAwareOptunaSearch, full_trial_seconds
from orchestrator.space import SpaceError, parse_space
from trainers.checkpoint import read_checkpoint
from trainers.config import ConfigError, TrainConfig
from trainers.data import read_train
from trainers.fit import fit
from trainers.folds import make_folds

# --- the arithmetic -------------------------------------------------------------------------------------


def test_the_plan_section_is_checked_and_names_what_to_fix():
    assert parse_plan(None, 3) is None and parse_plan("none", 3) is None
    assert parse_plan({}, 3) == Plan(screen_folds=1, final_share=0.5, max_final_epochs=30, max_final_seeds=3)
    assert parse_plan({"screen_folds": 2, "final_share": 0.7}, 5) == Plan(2, 0.7)
    with pytest.raises(PlanError, match="screen_folds must be a whole number from 1 to k-1=2"):
        parse_plan({"screen_folds": 3}, 3)
    with pytest.raises(PlanError, match="final_share must be a share"):
        parse_plan({"final_share": 1.0}, 3)
    with pytest.raises(PlanError, match="keys"):
        parse_plan({"screen_epochs": 1}, 3)
    raw = {"name": "p", "fixed": {"k": 3, "train_folds": 1}, "search": {"lr": {"uniform": [0.1, 0.2]}}}
    with pytest.raises(SpaceError, match="'plan': sets train_folds for the screen itself"):
        parse_space({**raw, "plan": {"screen_folds": 1}})
    space = parse_space({**raw, "fixed": {"k": 3}, "plan": {"screen_folds": 1}})
    assert space.config_for({"lr": 0.1}).folds_trained == 3  # the file's space trains every fold
    assert space.screening().config_for({"lr": 0.1}).folds_trained == 1  # the screen trains one
    assert parse_space(space.to_dict()).plan == space.plan  # space.yaml keeps it


def test_train_folds_is_checked_against_k():
    assert TrainConfig(k=5, train_folds=0).folds_trained == 5
    assert TrainConfig(k=5, train_folds=2).folds_trained == 2
    with pytest.raises(ConfigError, match="train_folds"):
        TrainConfig.from_dict({"k": 3, "train_folds": 4})


def test_the_final_epochs_are_what_the_time_left_holds_at_the_measured_cost():
    phases = split_budget(Plan(1, 0.6), 1800)
    assert phases.screen_s == pytest.approx(720) and phases.final_s == pytest.approx(1080)
    # a screened fold: 1,000 training + 600 validation images (a third of the cost each) in 110 s
    per_image = seconds_per_image(110.0, 1000, 600)
    assert per_image == pytest.approx(110 / 1200)
    # 2,000 training images per final epoch: 183 s each; 1,000 s left, 300 holdout images with 1 TTA view
    holdout_s = per_image * 300 / 3 * 2
    expected = math.floor(10 * (1000 * (1 - FINAL_MARGIN) - holdout_s) / (per_image * 2000)) / 10
    assert final_epochs(1000, per_image, 2000, 300, views=1) == expected == 5.0
    assert final_epochs(1100, per_image, 2000, 300, views=1) == 5.6  # tenths of an epoch, not floored to 5
    assert final_epochs(100, per_image, 2000, 300, views=1) == 0  # not half an epoch fits
    # a GPU node's night: the final model stops at max_final_epochs; the time left trains more seeds of it
    assert final_epochs(1e6, per_image, 2000, 300, views=1, max_epochs=30) == 30
    assert final_seeds(1e6, per_image, 2000, 300, 1, epochs=30, max_seeds=3) == 3
    assert final_seeds(1000, per_image, 2000, 300, 1, epochs=expected, max_seeds=3) == 1
    assert final_seeds(2 * 30 * per_image * 2000 + 60, per_image, 2000, 300, 1, epochs=30, max_seeds=5) == 1
    assert final_seeds(2.2 * 30 * per_image * 2000 + 60, per_image, 2000, 300, 1, 30, max_seeds=5) == 2
    with pytest.raises(PlanError, match="max_final_seeds must be a whole number"):
        parse_plan({"max_final_seeds": 0}, 3)
    assert final_epochs(1000, float("nan"), 2000, 0, views=0) == 0
    line = describe_plan(Plan(1, 0.6), phases, k=3)
    assert "1 fold of 3 for 12.0 min" in line and "last 18.0 min" in line and "past 30 epochs" in line


# --- the screen's end -----------------------------------------------------------------------------------


def test_past_the_screen_end_each_trial_stops_at_its_epoch_end_and_a_long_epoch_is_cut(tmp_path):
    path = tmp_path / BUDGET_FILE
    budget = TimeBudget(path, total_s=600.0, used_before_s=0.0, started=time.time())
    phases = budget.start(prep_s=1.0, plan=Plan(1, 0.5))
    assert phases.screen_s == pytest.approx(300, abs=1)
    record = json.loads(path.read_text())
    assert record["screen_until"] == pytest.approx(record["deadline"] - 300, abs=1)
    stopper = BudgetStopper(path)
    assert not stopper.stop_all() and not stopper("t1", {})  # the screen has 5 minutes left

    record["screen_until"] = time.time() - 1  # the screen is over; the final has 300 s
    path.write_text(json.dumps(record))
    stopper = BudgetStopper(path)
    assert (
        not stopper.stop_all()
    )  # a running epoch may end: it is kept (grace: a quarter of the final's time)
    assert stopper("t1", {"training_iteration": 2})  # the trial stops at the epoch it reports
    assert json.loads(path.read_text())["screen_closed"] and budget.stopped()  # ended by the plan
    assert stopper._deadline == pytest.approx(record["deadline"])  # billing still counts to the budget

    # the screen ended 100 s ago and the budget ends in 100 s: a quarter of that final phase is 50 s
    record["screen_until"], record["deadline"] = time.time() - 100, time.time() + 100
    path.write_text(json.dumps(record))
    stopper = BudgetStopper(path)
    stopper.stop_all()  # outside the main thread's Tune: it asks Tune or stops the trials itself
    assert json.loads(path.read_text())["stopped"]


def test_the_searcher_starts_no_configuration_the_screen_cannot_finish(tmp_path):
    searcher = PrunedAwareOptunaSearch.__new__(PrunedAwareOptunaSearch)  # only the screen check runs
    searcher._search_dir = str(tmp_path)
    budget = TimeBudget(tmp_path / BUDGET_FILE, total_s=600.0, used_before_s=0.0, started=time.time())
    budget.start(plan=Plan(1, 0.5))  # the screen ends in 300 s
    assert not searcher._screen_closed()  # nothing measured yet: start
    result = {"time_total_s": 100.0, "training_iteration": 1, "epochs_planned": 2}
    assert full_trial_seconds(result) == 200.0  # stopped by ASHA after 1 of 2 epochs: counted in full
    searcher._screen_costs.append(200.0)
    assert not searcher._screen_closed()  # 200 s fit in the 300 s left
    searcher._screen_costs[:] = [400.0, 350.0]
    assert searcher._screen_closed()  # not even the cheapest fits
    assert searcher.suggest("t9") == Searcher.FINISHED
    assert TimeBudget(tmp_path / BUDGET_FILE, 600.0, 0.0, 0.0).stopped()  # the driver reads: plan's end
    close_screen(tmp_path / BUDGET_FILE)  # twice is harmless
    assert full_trial_seconds({"time_total_s": 5.0}) is None


def test_the_final_phase_is_billed_while_it_trains(tmp_path, monkeypatch):
    """No Tune stopper runs during the final model: the seconds used are still written every few seconds,
    so a driver killed there has its time billed on resume."""
    from orchestrator.search import final as final_module

    monkeypatch.setattr(final_module, "BILL_EVERY_S", 0.05)
    budget = TimeBudget(tmp_path / BUDGET_FILE, total_s=600.0, used_before_s=0.0, started=time.time())
    budget.start()
    before = json.loads((tmp_path / BUDGET_FILE).read_text())["used_s"]
    with final_module.billed(budget):
        time.sleep(0.5)
        during = json.loads((tmp_path / BUDGET_FILE).read_text())["used_s"]
    assert before < 0.2 and during >= 0.3


# --- train_folds in fit and in the ensemble --------------------------------------------------------------


def test_a_run_with_train_folds_trains_and_predicts_only_its_folds(tmp_path, dataset_builder):
    root = tmp_path / "data"
    dataset_builder(root, n_persons=12)
    table = read_train(root).table
    folds = make_folds(table, k=3, seed=0)
    cfg = TrainConfig(
        backbone="resnet10t", image_size=(32, 24), epochs=1, batch_size=16, k=3, train_folds=1, patience=0
    )
    result = fit(cfg, table, folds, tmp_path / "run", tmp_path / "cache", log=None)
    assert result.status == "completed"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["fold0.pt"]
    with np.load(tmp_path / "run" / "oof.npz") as oof:
        assert set(oof["fold"].tolist()) == {0}
        assert len(oof["fold"]) == int((folds["fold"] == 0).sum())
    history = pd.read_csv(tmp_path / "run" / "metrics" / "epochs.csv", dtype={"fold": str})
    assert history.loc[history["fold"] == "mean", "epoch_seconds"].iloc[0] > 0
    assert history["fold"].tolist() == ["0", "mean"]


def test_a_final_model_ends_its_schedule_within_its_last_epoch(tmp_path, dataset_builder, monkeypatch):
    """1.5 epochs: the second epoch trains half its batches, and the cosine schedule ends there."""
    import trainers.refit as refit_module

    root = tmp_path / "data"
    dataset_builder(root, n_persons=12)
    data = read_train(root).table.assign(fold=0)
    cfg = TrainConfig(backbone="resnet10t", image_size=(32, 24), batch_size=8, warmup_epochs=0, lr=1e-3)
    steps, lrs = [], []
    real = refit_module.train_one_epoch

    def counting(fold, cfg, batches, *args):
        batches = list(batches)
        steps.append(len(batches))
        result = real(fold, cfg, batches, *args)
        lrs.append(fold.optimizer.param_groups[0]["lr"])
        return result

    monkeypatch.setattr(refit_module, "train_one_epoch", counting)
    result = refit_module.refit(cfg, data, tmp_path / "out", tmp_path / "cache", epochs=1.5, log=None)
    per_epoch = len(data) // cfg.batch_size  # the loader drops the last partial batch
    assert steps == [per_epoch, round(1.5 * per_epoch) - per_epoch] and result.epochs == 1.5
    assert lrs[-1] < 0.05 * cfg.lr < lrs[0]  # the schedule ran (nearly) to its end, not to 2 epochs' end


def test_mixing_refit_and_fold_models_is_decided_on_the_holdout():
    labels = np.array([0, 1, 2, 0, 1, 2])
    right = np.eye(18)[labels]
    wrong = np.eye(18)[(labels + 1) % 3]
    n_eval = 2
    kfold = [np.vstack([right[:2], wrong])]  # the fold models: wrong on every holdout image
    refit = [np.vstack([right[:2], right])]  # the refit model: right on every one
    assert mixed(kfold[0], None, 3, 0, "refit") is kfold[0]  # a member without refit models
    np.testing.assert_allclose(
        mixed(kfold[0], refit[0], 3, 1, "folds+refit"), 0.75 * kfold[0] + 0.25 * refit[0]
    )
    mix, scores = choose_mix(np.ones(1), kfold, refit, [(3, 1)], labels, n_eval)
    assert mix == "refit" and scores["refit"] > 0 == scores["folds"] == scores["folds+refit"]
    mix, _ = choose_mix(np.ones(1), refit, refit, [(3, 1)], labels, n_eval)
    assert mix == "folds"  # a tie: the simpler vote


def test_a_trial_with_refit_models_that_greedy_left_out_joins_the_vote(tmp_path):
    """A planned search's final models of a runner-up are most of its compute: greedy selection, which
    judged only its screened fold model, does not get to leave them out (but --top and --without-refit do)."""
    from orchestrator.ensemble.refit_mix import join_refit_trials
    from orchestrator.ensemble.selection import Selection

    search_dir = tmp_path / "s"
    for trial_id in ("b", "c"):  # b: a finished refit; c: a killed one (no refit.json), not a model
        folder = search_dir / "refit" / trial_id
        folder.mkdir(parents=True)
        (folder / "seed0.pt").write_bytes(b"model")
    (search_dir / "refit" / "b" / "refit.json").write_text(
        json.dumps({"models": [{"index": 0, "file": "seed0.pt"}]})
    )
    candidates = [type("C", (), {"trial_id": t})() for t in ("a", "b", "c")]
    selection = Selection(candidates, [], [True] * 3, [0.6, 0.5, 0.4], "greedy", counts=[3, 0, 0])
    lines: list[str] = []
    joined = join_refit_trials(search_dir, selection, None, lines.append)
    assert joined.counts == [3, 1, 0] and joined.chosen == [0, 1] and selection.counts == [3, 0, 0]
    assert len(lines) == 1 and "trial b joins the vote" in lines[0]
    assert join_refit_trials(search_dir, selection, False, lines.append).counts == [3, 0, 0]
    top = Selection(candidates, [], [True] * 3, [0.6, 0.5, 0.4], "top", counts=[1, 0, 0])
    assert join_refit_trials(search_dir, top, None, lines.append).counts == [1, 0, 0]


def test_the_holdout_figure_comes_with_an_interval_from_resampling_its_persons():
    rng = np.random.default_rng(0)
    person = np.repeat(np.arange(60).astype(str), 7)
    labels = rng.integers(0, 3, len(person))
    guess = np.where(rng.random(len(person)) < 0.7, labels, (labels + 1) % 3)  # 70% right
    probs = np.eye(18)[guess]
    low, high = person_bootstrap(labels, probs, person)
    assert low < macro_f1(labels, probs) < high and high - low < 0.2
    assert person_bootstrap(labels, probs, person) == (low, high)  # seeded: the same every run
    few_low, few_high = person_bootstrap(labels[:70], probs[:70], person[:70])  # 10 persons: wider
    assert few_high - few_low > high - low
    assert person_bootstrap(labels[:7], probs[:7], person[:7]) is None  # one person: no interval


def test_the_test_set_gets_a_prediction_interval_that_holds_its_own_sampling_error_too():
    rng = np.random.default_rng(0)
    person = np.repeat(np.arange(60).astype(str), 7)
    labels = rng.integers(0, 3, len(person))
    guess = np.where(rng.random(len(person)) < 0.7, labels, (labels + 1) % 3)
    probs = np.eye(18)[guess]
    holdout = Holdout(np.arange(len(person)).astype(str), labels, 60, person)
    assert persons_of_test_set(6090, holdout) == 870  # the competition layout: 7 images per person
    assert persons_of_test_set(6090, Holdout(np.array([], dtype=str), labels[:0], 0)) == 0

    confidence = person_bootstrap(labels, probs, person)
    same_size = prediction_interval(labels, probs, person, 60)
    bigger_set = prediction_interval(labels, probs, person, 600)
    width = {
        name: high - low
        for name, (low, high) in {"confidence": confidence, "same": same_size, "bigger": bigger_set}.items()
    }
    # a new 60-person set adds its own error: about sqrt(2) wider; a 600-person set adds little
    assert 1.2 < width["same"] / width["confidence"] < 1.7
    assert width["confidence"] < width["bigger"] < width["same"]
    assert prediction_interval(labels, probs, person, 60) == same_size  # seeded
    assert prediction_interval(labels[:7], probs[:7], person[:7], 60) is None

    estimates = Estimates(in_sample_f1=0.5, nested_f1=None)
    estimates.score_holdout(holdout, probs, test_images=140)  # 20 persons' images
    assert estimates.holdout_f1 == pytest.approx(macro_f1(labels, probs))
    assert estimates.test_persons == 20 and estimates.test_interval == prediction_interval(
        labels, probs, person, 20
    )
    low, high = estimates.test_interval
    assert any(line.startswith(f"  on the test set  {low:.3f}-{high:.3f}") for line in estimates.lines())
    assert estimates.as_dict()["test_interval"] == (low, high)
    assert (estimates.metrics()["estimate/test_low"], estimates.metrics()["estimate/test_high"]) == (
        low,
        high,
    )


# --- a real planned search and its ensemble ------------------------------------------------------------


def planned_space(tmp_path: Path) -> Path:
    raw = {
        "name": "planned",
        "trials": 6,
        "holdout": 0.2,
        "fixed": {"epochs": 2, "k": 3, "image_size": [32, 24], "batch_size": 16, "pretrained": False},
        "search": {"backbone": {"choice": ["resnet10t", "lcnet_050"]}, "lr": {"loguniform": [1e-3, 1e-2]}},
        "resources": {"cpu": 1, "gpu": 0},
        "max_concurrent": 1,
        "scheduler": {"asha": {"grace_period": 1, "reduction_factor": 2}},
        "sampler": {"seed": 3, "n_startup_trials": 2},
        "keep_top": 6,
        "plan": {"screen_folds": 1, "final_share": 0.4},
    }
    path = tmp_path / "planned.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_planned_search_screens_on_one_fold_then_trains_the_best_to_the_end_of_its_budget(
    tmp_path, demo_root, tracking_uri, local_ray
):
    storage = tmp_path / "runs"
    summary = run_search(
        demo_root,
        planned_space(tmp_path),
        storage=storage,
        tracking_uri=tracking_uri,
        cache_dir=tmp_path / "cache",
        progress=False,
        time_budget_minutes=2.0,  # a 72 s screen: room for Ray and a trial to start on a loaded machine
    )
    search_dir = storage / "planned"
    budget = json.loads((search_dir / BUDGET_FILE).read_text())
    assert summary.finished and summary.final is not None, summary.report()
    # every screened trial trained fold 0 only; tiny models cap the final model, so the time it leaves
    # promotes the best screens to all 3 folds, their screened fold model reused (``test_promote``)
    promoted = {p["trial_id"]: p for p in json.loads((search_dir / "promoted.json").read_text())}
    assert promoted and summary.promoted and "promoted: trial" in summary.report()
    trials = [d for d in (search_dir / "trials").iterdir() if (d / "config.yaml").is_file()]
    assert len(trials) > len(promoted)
    for run_dir in trials:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        fold1 = list((run_dir / "checkpoints").glob("fold[12].pt"))
        if run_dir.name in promoted:
            assert config["train_folds"] == 0 and len(fold1) == 2 and promoted[run_dir.name]["status"]
            fold0 = read_checkpoint(run_dir / "checkpoints" / "fold0.pt")
            assert fold0["config"]["train_folds"] == 1  # the screen's model, not trained again
        else:
            assert config["train_folds"] == 1 and not fold1
    # MLflow has each promotion: the trial's child run carries its k-fold figures beside the screen's
    client = MlflowClient(tracking_uri)
    children = {
        r.data.tags["foldtune.trial_id"]: r
        for r in client.search_runs([client.get_experiment_by_name("planned").experiment_id])
        if "foldtune.trial_id" in r.data.tags  # the trials' runs (not the final model's refit run)
    }
    for trial_id, record in promoted.items():
        run = children[trial_id]
        assert run.data.tags["foldtune.promoted"] == "true" and run.data.tags["foldtune.folds_trained"] == "3"
        assert run.data.metrics["final/oof_f1_tta"] == pytest.approx(record["oof_f1_tta"])
        assert run.data.metrics["screen/oof_f1_tta"] == pytest.approx(record["screened_oof_f1_tta"])
        # and each new fold's per-epoch series, the k-fold mean beside the screen's own val_f1
        epochs = pd.read_csv(search_dir / "trials" / trial_id / "metrics" / "epochs.csv", dtype={"fold": str})
        for series, fold in (("fold1/val_f1", "1"), ("fold2/val_f1", "2"), ("kfold/val_f1", "mean")):
            rows = epochs[epochs["fold"] == fold]
            logged = client.get_metric_history(run.info.run_id, series)
            assert [m.step for m in logged] == rows["epoch"].tolist() and rows["epoch"].tolist()
            assert [m.value for m in logged] == pytest.approx(rows["val_f1"].tolist())
    screens = [children[d.name] for d in trials if d.name not in promoted]
    assert screens and not any("foldtune.promoted" in run.data.tags for run in screens)
    # the final model: the chosen trial refit on every training person, epochs from the measured cost
    final = json.loads((search_dir / "final.json").read_text())
    refit = json.loads((search_dir / "refit" / final["trial_id"] / "refit.json").read_text())
    assert refit["epochs"] == final["epochs"] > 0 and refit["epochs_from"] == "--epochs"
    # tiny models: the epochs reach max_final_epochs, so the time left is shared by up to max_final_seeds
    # final models: the chosen trial's and the next finished (here promoted) trials', or more seeds
    assert refit["seeds"] == final["seeds"] and 1 <= sum(m["seeds"] for m in final["models"]) <= 3
    assert final["models"][0]["trial_id"] == final["trial_id"]
    assert {m["trial_id"] for m in final["models"]} <= set(promoted)
    assert refit["chosen_by"].startswith("the screen: the best OOF macro F1")
    assert refit["continued_from"] == "fold0.pt"  # the screened model goes on, its epochs reused
    assert refit["holdout_rows"] > 0 and refit["rows_trained"] == final["train_images"]
    assert final["seconds"] <= final["left_s"]  # it ended inside the budget
    assert final["trained"] == "in the driver, one after another"  # as the one trial at a time ran
    assert budget["used_s"] <= budget["total_s"] + 15  # the whole budget accounted, the final included
    assert summary.report().count("final model: trial") == len(final["models"])  # one line each

    # the ensemble finds the final model and lets the holdout decide how it votes
    result = run_ensemble(
        data_root=demo_root,
        search="planned",
        storage=storage,
        cache_dir=tmp_path / "cache",
        device="cpu",
        log=None,
    )
    report = json.loads(result.report_path.read_text())
    settings = report  # the selection's settings are top-level fields of ensemble.json
    assert settings["with_refit"] == {m["trial_id"]: m["seeds"] for m in final["models"]}  # each votes
    scores = settings["refit_mix_holdout_f1"]
    assert set(scores) == {"folds", "folds+refit", "refit"}
    assert settings["refit_mix"] == max(scores, key=lambda m: (scores[m], -list(scores).index(m)))
    assert result.estimates.holdout_f1 == pytest.approx(scores[settings["refit_mix"]])
    low, high = result.estimates.holdout_interval
    assert low <= result.estimates.holdout_f1 <= high
    assert settings["predict_seconds"] > 0
    # the vote is among the promoted trials (every person's OOF); the screens not promoted lost that rung
    assert {m["trial_id"] for m in report["members"]} <= set(promoted)
    assert final["trial_id"] in promoted
