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


SCREENED = {"epochs": 1, "k": 3, "image_size": [32, 24], "batch_size": 16, "pretrained": False}


def screened_trials(tmp_path, dataset_builder, lrs: dict[str, float]):
    """(data root, search folder) with one finished one-fold screen (``SCREENED``) per trial id of ``lrs``
    (its learning rate), as a planned search's screen leaves them in ``<search>/trials/``."""
    root = tmp_path / "data"
    dataset_builder(root, n_persons=12)
    table = read_train(root).table
    folds = make_folds(table, k=3, seed=0)
    search_dir = tmp_path / "runs" / "s"
    for trial_id, lr in lrs.items():
        cfg = TrainConfig(backbone="resnet10t", lr=lr, train_folds=1, patience=0, **SCREENED)
        fit(cfg, table, folds, search_dir / "trials" / trial_id, tmp_path / "cache", log=None)
    return root, search_dir


def final_phase_space(max_final_epochs: int, max_final_seeds: int, **raw):
    """A planned space over ``SCREENED`` trials (one fold screened, no promotion) with the final phase's
    caps; ``raw`` adds or replaces keys (e.g. ``resources``)."""
    from orchestrator.space import parse_space

    plan = {"max_final_epochs": max_final_epochs, "max_final_seeds": max_final_seeds}
    return parse_space(
        {
            "name": "s",
            "fixed": SCREENED,
            "search": {"lr": {"loguniform": [1e-5, 1e-2]}},
            "plan": {"screen_folds": 1, "promote_top": 0, **plan},
            **raw,
        }
    )


def an_hour(tmp_path):
    """A fresh one-hour budget, its record in ``tmp_path``."""
    import time

    from orchestrator.search.budget import BUDGET_FILE, TimeBudget

    return TimeBudget(tmp_path / BUDGET_FILE, total_s=3600.0, used_before_s=0.0, started=time.time())


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
    """Killed after its first epoch, a promotion leaves the folder reading as the screen it was, to the
    planner too (its measured cost), and a search's pruning keeps its resume state; resumed, it ends with the
    screen's epochs intact (the screened fold's rows are the screen's, not the first epoch's repeated)."""
    from orchestrator.search import summary as summary_module
    from orchestrator.search.final import measured_cost
    from trainers.resume import RESUME_STATE, local_resume_dir
    from trainers.screened import SCREEN_HISTORY, promotion_under_way, was_promoted

    cfg, table, folds, run_dir = _screen(tmp_path, dataset_builder)
    screened_result = (run_dir / "result.json").read_text()
    screen_epochs = pd.read_csv(run_dir / "metrics" / "epochs.csv", dtype={"fold": str})
    screen_config = yaml.safe_load((run_dir / "config.yaml").read_text())
    cost = measured_cost(run_dir, screen_config)
    promoted = TrainConfig(**{**cfg.to_dict(), "train_folds": 0, "resume_every_epochs": 1})
    resume_dir = local_resume_dir(run_dir)

    def killed(report):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            promoted, table, folds, run_dir, tmp_path / "cache", log=None, promote=True, callback=killed,
            resume_dir=resume_dir,
        )  # fmt: skip
    # until a promotion ends the folder is the screened run: its config, its result, its model, its cost
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_folds"] == 1
    assert (run_dir / "result.json").read_text() == screened_result
    kept = pd.read_csv(run_dir / "metrics" / SCREEN_HISTORY, dtype={"fold": str})
    pd.testing.assert_frame_equal(kept, screen_epochs)
    assert measured_cost(run_dir, screen_config) == pytest.approx(cost)
    assert promotion_under_way(run_dir) and not was_promoted(run_dir)

    class QuietLog:
        def checkpoints_deleted(self, trial_ids) -> None:
            pass

    row = {"trial_id": "run", "state": "completed", "run_dir": str(run_dir), "config": {}, "best_f1": 0.5}
    summary_module._prune_checkpoints([row], 0, QuietLog())  # a resumed search's summary, before promoting
    assert (resume_dir / RESUME_STATE).is_file() and (run_dir / "checkpoints" / "fold0.pt").is_file()

    lines = []
    result = fit(
        promoted, table, folds, run_dir, tmp_path / "cache", log=lines.append, promote=True,
        resume_dir=resume_dir,
    )  # fmt: skip
    assert result.status == "completed" and any("resuming run after epoch 1" in line for line in lines)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_folds"] == 0
    assert was_promoted(run_dir) and not promotion_under_way(run_dir)
    assert not (resume_dir / RESUME_STATE).exists()
    promoted_epochs = pd.read_csv(run_dir / "metrics" / "epochs.csv", dtype={"fold": str})
    for epochs in (promoted_epochs, screen_epochs):
        epochs.set_index(["epoch", "fold"], inplace=True)
    for epoch in (1, 2):  # the screened fold's rows, both epochs, as the screen wrote them
        assert promoted_epochs.loc[(epoch, "0"), "val_f1"] == pytest.approx(
            screen_epochs.loc[(epoch, "0"), "val_f1"]
        )


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


def test_the_search_promotes_in_rank_order_goes_on_past_a_failure_and_never_promotes_twice(
    tmp_path, dataset_builder, monkeypatch
):
    """``promote_screened`` on a search folder of two finished screens: a promotion that fails is recorded
    and the next one goes on; a resumed driver promotes nothing again (the done, the failed), and a promotion
    a killed driver finished without recording it is recorded from its run folder."""
    import time

    from orchestrator.errors import OrchestratorError
    from orchestrator.search import promote as promote_module
    from orchestrator.search.budget import BUDGET_FILE, TimeBudget
    from orchestrator.space import parse_space

    root, search_dir = screened_trials(tmp_path, dataset_builder, {"weak": 1e-5, "strong": 3e-3})
    ranked = [trial_id for trial_id, _ in promote_module.rank_screened(search_dir)]
    assert sorted(ranked) == ["strong", "weak"]
    space = parse_space(
        {
            "name": "s",
            "fixed": SCREENED,
            "search": {"lr": {"loguniform": [1e-5, 1e-2]}},
            "plan": {"screen_folds": 1, "max_final_epochs": 1, "promote_top": 3},
        }
    )
    real = promote_module.promote_trial

    def second_fails(data_root, search_dir, trial_id, *args):
        if trial_id == ranked[1]:
            raise OrchestratorError(f"trial {trial_id}: no space left on the disk")
        return real(data_root, search_dir, trial_id, *args)

    monkeypatch.setattr(promote_module, "promote_trial", second_fails)
    budget = TimeBudget(tmp_path / BUDGET_FILE, total_s=3600.0, used_before_s=0.0, started=time.time())
    told = []
    records = promote_module.promote_screened(
        root, space, search_dir, budget, tmp_path / "cache", False, told.append
    )
    assert [r["trial_id"] for r in records] == ranked and told == records
    assert records[0]["status"] == "completed" and records[0]["oof_f1_tta"] is not None
    assert records[1]["status"] == "failed" and "no space left" in records[1]["error"]
    assert json.loads((search_dir / "promoted.json").read_text()) == json.loads(json.dumps(records))
    config = yaml.safe_load((search_dir / "trials" / ranked[0] / "config.yaml").read_text())
    assert config["train_folds"] == 0  # confirmed on all folds
    # a resumed driver: nothing promoted twice, the failed one not retried
    again = promote_module.promote_screened(root, space, search_dir, budget, tmp_path / "cache", False)
    assert again == json.loads(json.dumps(records))
    # promoted, then killed before the record: the next driver records it from the run folder
    (search_dir / "promoted.json").unlink()
    told.clear()
    recovered = promote_module.settled_promotions(search_dir, told.append)
    assert [r["trial_id"] for r in recovered] == [ranked[0]] and told == recovered
    assert recovered[0]["status"] == "completed" and "after a restart" in recovered[0]["recorded"]


def test_the_final_model_of_a_converged_trial_trains_the_epochs_that_converged_from_scratch(
    tmp_path, dataset_builder, tracking_uri
):
    """The final phase sizes its model by convergence when the chosen trial shows it: the folds' mean best
    epoch, from scratch, the time left on more seeds. Unconverged (a short screen), it continues the
    screened fold model for what the time holds, at most ``max_final_epochs``."""
    import time

    from orchestrator.plan import converged_epochs
    from orchestrator.search.budget import BUDGET_FILE, TimeBudget
    from orchestrator.search.final import train_final
    from orchestrator.space import parse_space

    assert converged_epochs(best_epoch=2, epochs_trained=2, fold_best_epochs=[2]) is None  # still gaining
    assert converged_epochs(best_epoch=11, epochs_trained=12, fold_best_epochs=[11, 12]) is None
    assert converged_epochs(best_epoch=6, epochs_trained=8, fold_best_epochs=[5, 6, 8]) == 6
    root, search_dir = screened_trials(tmp_path, dataset_builder, {"t1": 3e-3})
    run_dir = search_dir / "trials" / "t1"
    space = parse_space(
        {
            "name": "s",
            "fixed": SCREENED,
            "search": {"lr": {"loguniform": [1e-5, 1e-2]}},
            "plan": {"screen_folds": 1, "max_final_epochs": 3, "max_final_seeds": 2},
        }
    )

    def final() -> tuple[dict, dict]:
        budget = TimeBudget(tmp_path / BUDGET_FILE, total_s=3600.0, used_before_s=0.0, started=time.time())
        record = train_final(root, space, search_dir, budget, tmp_path / "cache", tracking_uri, False)
        return record, json.loads((search_dir / "refit" / "t1" / "refit.json").read_text())

    record, refit = final()  # one epoch trained, its best: may still gain
    assert record["epochs"] == 3 and "time left" in record["epochs_from"] and record["seeds"] == 2
    assert refit["continued_from"] == "fold0.pt" and refit["epochs"] == 3
    # the same trial as a run that stopped gaining would record it: best epoch 1 of 3
    result = json.loads((run_dir / "result.json").read_text())
    result.update(best_epoch=1, epochs_trained=3)
    result["extra"]["fold_best_epochs"] = [1]
    (run_dir / "result.json").write_text(json.dumps(result))
    record, refit = final()
    assert record["epochs"] == 1 and record["epochs_from"].startswith("converged") and record["seeds"] == 2
    assert refit["continued_from"] is None and refit["epochs"] == 1 and refit["seeds"] == 2


def test_past_max_final_epochs_the_final_time_is_shared_by_the_best_finished_screens(
    tmp_path, dataset_builder, tracking_uri, monkeypatch
):
    """Unconverged, a final phase that holds more than ``max_final_epochs`` of the chosen trial is shared
    evenly by ``final_models`` models: the chosen trial's and the next finished screen's, each continued
    from its own screened fold model, the chosen one taking the seeds no other finished screen can; a
    screen the budget cut (not finished) is never a final model."""

    from orchestrator.plan import final_models
    from orchestrator.search.final import train_final

    assert final_models(3.9, max_epochs=4, max_models=3) == 1  # within the cap: one model, as before
    assert final_models(7.5, max_epochs=4, max_models=3) == 2  # T=60 on one core: two of ~3.6 epochs
    assert final_models(1e6, max_epochs=4, max_models=3) == 3
    assert final_models(float("nan"), max_epochs=4) == 1
    root, search_dir = screened_trials(tmp_path, dataset_builder, {"t1": 3e-3, "t2": 1e-3, "t3": 2e-3})
    (search_dir / "trials" / "t3" / "result.json").unlink()  # as a screen the budget cut is: unfinished
    import orchestrator.refit

    ranked = orchestrator.refit.ranked_trials(search_dir)
    assert [finished for trial, _, finished in ranked if trial == "t3"] == [False]
    finished = [entry for entry in ranked if entry[0] != "t3"]
    cut = next(entry for entry in ranked if entry[0] == "t3")
    # the cut screen ranked second (its rebuilt OOF may rank anywhere): it must be passed over
    monkeypatch.setattr(orchestrator.refit, "ranked_trials", lambda _: [finished[0], cut, finished[1]])
    space, budget = final_phase_space(max_final_epochs=1, max_final_seeds=3), an_hour(tmp_path)
    record = train_final(root, space, search_dir, budget, tmp_path / "cache", tracking_uri, False)

    models = {model["trial_id"]: model for model in record["models"]}
    assert set(models) == {"t1", "t2"}, "the two finished screens; the cut one is not a final model"
    assert record["trial_id"] == record["models"][0]["trial_id"] == finished[0][0]  # the chosen one first
    assert models[record["trial_id"]]["seeds"] == 2 and sum(m["seeds"] for m in models.values()) == 3
    for trial_id, model in models.items():
        refit = json.loads((search_dir / "refit" / trial_id / "refit.json").read_text())
        assert refit["continued_from"] == "fold0.pt" and refit["epochs"] == model["epochs"] == 1
        assert refit["seeds"] == model["seeds"] and "share" in model["epochs_from"]
    assert not (search_dir / "refit" / "t3").exists()
    assert record["seconds"] == pytest.approx(sum(m["seconds"] for m in models.values()), abs=0.2)


def test_a_shared_final_phase_trains_first_the_models_its_cap_stops_so_their_time_goes_on(
    tmp_path, dataset_builder, tracking_uri, monkeypatch
):
    """In the driver (one at a time) the final model its cap stops (a cheaper backbone) trains first and
    takes only what its cap needs, not an even half; the next one is re-planned from what it really took
    and gets the rest (T=60 on one core left 4.6 min idle with even shares); the record still lists the
    chosen trial first."""

    import orchestrator.refit
    import orchestrator.search.final as final_module

    root, search_dir = screened_trials(tmp_path, dataset_builder, {"t1": 3e-3, "t2": 1e-3})
    ranked = [("t1", 0.5, True), ("t2", 0.4, True)]  # t1 is chosen
    monkeypatch.setattr(orchestrator.refit, "ranked_trials", lambda _: ranked)
    # seconds per image, training images, holdout images: t1 fits ~4.1 epochs in 3600 s (past the cap of 4:
    # two final models), but not 4 beside t2's cap; t2 fits ~68
    costs = {"t1": (0.83, 1000, 0), "t2": (0.05, 1000, 0)}
    monkeypatch.setattr(final_module, "measured_cost", lambda run_dir, config: costs[run_dir.name])
    trained: list[tuple[str, float, float]] = []

    def refit_job(self, model):
        def took_ten_minutes():  # t2 stops at its cap after 4 x 50 s; say it took 10 min
            trained.append((model.trial_id, model.epochs, model.left_s))
            self.budget.used_before_s += 600.0
            return {"holdout_f1": 0.5}

        return final_module.Job(took_ten_minutes)

    monkeypatch.setattr(final_module._Phase, "_job", refit_job)
    space, budget = final_phase_space(max_final_epochs=4, max_final_seeds=2), an_hour(tmp_path)
    record = final_module.train_final(root, space, search_dir, budget, None, tracking_uri, False)

    assert [trial for trial, _, _ in trained] == ["t2", "t1"], "the capped model first"
    (_, t2_epochs, t2_share), (_, t1_epochs, t1_share) = trained
    t2_cap_s = final_module.final_cap_seconds(*costs["t2"], 0, 4)
    assert t2_epochs == 4 and t2_share == pytest.approx(t2_cap_s, abs=1)  # what its cap needs, no more
    assert t1_share == pytest.approx(3000, abs=5)  # all that is left after t2 really took 10 min
    assert t1_epochs > final_module.final_epochs(1800, *costs["t1"], 0, 4)  # more than an even half held
    assert [model["trial_id"] for model in record["models"]] == ["t1", "t2"] and record["trial_id"] == "t1"


HOLD_PROMOTIONS = """
import time
import trainers.fit

real_fit = trainers.fit.fit


def held_after_one_promoted_epoch(*args, **kwargs):  # a promotion that never ends: the driver is killed
    if kwargs.get("promote"):
        kwargs["callback"] = lambda report: time.sleep(3600) if report.epoch >= 1 else None
    return real_fit(*args, **kwargs)


trainers.fit.fit = held_after_one_promoted_epoch
"""  # put before test_faults_search's driver program: its promotions wait after their first epoch


@pytest.mark.slow
def test_a_driver_killed_mid_promotion_resumes_it_and_promotes_nothing_twice(
    tmp_path, demo_root, tracking_uri, capsys
):
    """A planned search's driver SIGKILLed while it promotes a screen (after the promotion's first epoch,
    its resume state saved). ``--resume`` with a larger budget finishes that promotion from its resume
    state, its screened fold model untouched, records every promotion once, and trains the final model."""
    import ray
    from test_faults_search import SUBPROCESS_DRIVER, search_argv, sigkill_driver, start_driver, wait_for
    from test_plan import planned_space

    from orchestrator.search import run_search
    from orchestrator.search.trial import run_trial
    from trainers.resume import RESUME_STATE, local_resume_dir
    from trainers.screened import SCREEN_HISTORY, promotion_under_way

    space_file = planned_space(tmp_path)
    search_dir = tmp_path / "runs" / "planned"
    argv = [*search_argv(demo_root, space_file, tmp_path, tracking_uri), "--time-budget", "2"]
    driver, _, err = start_driver(tmp_path, run_trial, argv, script=HOLD_PROMOTIONS + SUBPROCESS_DRIVER)

    def held() -> list:
        trials = search_dir / "trials"
        kept = trials.glob(f"*/metrics/{SCREEN_HISTORY}") if trials.is_dir() else ()
        return [p.parents[1] for p in kept if (local_resume_dir(p.parents[1]) / RESUME_STATE).is_file()]

    try:
        wait_for(lambda: held(), 400, "a promotion held after its first epoch", driver, err)
        sigkill_driver(driver)
    finally:
        if driver.poll() is None:
            driver.kill()
    (run_dir,) = held()
    screened_fold0 = _digest(run_dir / "checkpoints" / "fold0.pt")
    assert promotion_under_way(run_dir)  # the folder still reads as its screen
    before = (
        {r["trial_id"] for r in json.loads((search_dir / "promoted.json").read_text())}
        if (search_dir / "promoted.json").is_file()
        else set()
    )
    assert run_dir.name not in before

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_search(
            demo_root,
            space_file,
            storage=tmp_path / "runs",
            tracking_uri=tracking_uri,
            cache_dir=tmp_path / "cache",
            progress=True,
            resume=True,
            time_budget_minutes=4.0,
        )
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    assert f"resuming {run_dir.name} after epoch 1" in printed  # epoch 1 of the promotion not redone
    records = json.loads((search_dir / "promoted.json").read_text())
    ids = [r["trial_id"] for r in records]
    assert len(ids) == len(set(ids)) and run_dir.name in ids and summary.final is not None
    assert not promotion_under_way(run_dir) and not (local_resume_dir(run_dir) / RESUME_STATE).exists()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train_folds"] == 0
    assert _digest(run_dir / "checkpoints" / "fold0.pt") == screened_fold0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and len(result["extra"]["fold_best_epochs"]) == 3
