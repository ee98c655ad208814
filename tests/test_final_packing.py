"""The final phase's shares when final models train several at once (``plan.pack_final``).

A model its cap stops early (a cheaper backbone) frees its slot; with even shares the model planned beside
it had already been given less than its slot could hold, and that slot idled at the end (the 2-core T=30
run: 5.7 of 17.8 min). The packer places every waiting model knowing the caps and the running models."""

from __future__ import annotations

import types

import pytest
import yaml

from orchestrator.plan import FinalJob, final_cap_seconds, final_epochs, pack_final


def test_a_model_alone_in_its_slot_takes_it_while_the_capped_one_shares_the_other():
    """The 2-core run's three final models (minutes): lite1 chosen, cap 15.8; lite0 cap 9.6; the middle
    cap 10.2; 17.8 min left on two slots. The chosen one gets a slot to itself and reaches its cap; the
    other two share the second slot, each ending with the budget, not 5.7 min early."""
    left = 17.8 * 60
    waiting = [FinalJob(15.8 * 60), FinalJob(9.6 * 60), FinalJob(10.2 * 60)]

    first, share = pack_final(left, [], 2, waiting)
    assert (first, share) == (0, pytest.approx(15.8 * 60))  # the chosen one, to its cap

    second, share = pack_final(left, [15.8 * 60], 2, waiting[1:])  # started at once in the other slot
    assert (second, share) == (0, pytest.approx(left / 2))  # lite0, half of its slot (under its cap)

    third, share = pack_final(left / 2, [15.8 * 60 - left / 2], 2, waiting[2:])
    assert (third, share) == (0, pytest.approx(left / 2))  # the middle, the rest of that slot
    # an even share (17.8 / 1.5 = 11.9 min for the first) left the first slot idle after it


def test_one_slot_gives_a_capped_model_its_cap_first_and_the_rest_to_the_others():
    left = 3600.0
    waiting = [FinalJob(5000.0), FinalJob(500.0), FinalJob(4000.0, seeds=2)]
    pick, share = pack_final(left, [], 1, waiting)
    assert (pick, share) == (1, 500.0)  # it reaches its cap: it starts first, the others are re-planned
    pick, share = pack_final(left - 500.0, [], 1, [waiting[0], waiting[2]])
    assert pick == 0 and share == pytest.approx(3100.0 / 3)  # even per seed: a third, two-thirds


def test_uncapped_models_on_fewer_slots_leave_no_slot_idle_and_the_best_ranked_gets_most():
    """Three models that could each use the whole time on two slots: one takes a slot, the other two
    half of the other each (an even share of 2/3 each would idle a slot for a third of the time)."""
    waiting = [FinalJob(9000.0)] * 3
    assert pack_final(3600.0, [], 2, waiting) == (0, 3600.0)
    assert pack_final(3600.0, [3600.0], 2, waiting[1:]) == (0, 1800.0)


def test_more_slots_than_models_give_each_the_time_left_or_its_cap():
    waiting = [FinalJob(9000.0), FinalJob(1200.0)]
    assert pack_final(3600.0, [], 8, waiting) == (0, 3600.0)
    assert pack_final(3600.0, [3600.0], 8, waiting[1:]) == (0, 1200.0)


def test_a_busy_slot_takes_a_model_when_it_frees():
    """One slot runs for another 3000 s of 3600: the model free now should not share its slot with the
    next one when the busy slot, free in 3000 s, holds that one's cap (500 s)."""
    waiting = [FinalJob(9000.0), FinalJob(500.0)]
    pick, share = pack_final(3600.0, [3000.0], 2, waiting)
    assert (pick, share) == (0, 3600.0)


def test_too_many_placements_fall_back_to_an_even_share():
    waiting = [FinalJob(9000.0)] * 20
    pick, share = pack_final(3600.0, [], 4, waiting)
    assert pick == 0 and share == pytest.approx(4 * 3600.0 / 20)


def test_the_cap_seconds_are_what_final_epochs_needs_for_the_cap():
    need = final_cap_seconds(0.02, 1000, 300, 1, 4)
    assert final_epochs(need, 0.02, 1000, 300, 1, 100) == 4
    assert final_epochs(need * 0.97, 0.02, 1000, 300, 1, 100) < 4
    assert final_cap_seconds(0.02, 1000, 300, 1, 4, seeds=3) == pytest.approx(3 * need)


def _simulated_final_phase(tmp_path, monkeypatch, costs, at_once=2, total_s=1000.0, progress=False):
    """``search.final.train_final`` over stand-in trials t1, t2, ... (ranked in that order, each with
    ``costs[trial]``: seconds per image, training images, holdout images), its jobs run on a simulated
    clock, ``at_once`` at a time, each taking its planned epochs at its cost. (final.json's record,
    {trial: (start, end, share)})."""
    import orchestrator.refit
    import orchestrator.search.budget as budget_module
    import orchestrator.search.final as final_module
    from orchestrator.search.gpu_jobs import Workers
    from orchestrator.space import parse_space

    search_dir = tmp_path / "runs" / "s"
    for trial in costs:
        (search_dir / "trials" / trial).mkdir(parents=True)
        config = {"backbone": "resnet10t", "tta": [], "device": "cpu"}
        (search_dir / "trials" / trial / "config.yaml").write_text(yaml.safe_dump(config))
    ranked = [(trial, 0.5 - 0.05 * n, True) for n, trial in enumerate(costs)]
    monkeypatch.setattr(orchestrator.refit, "ranked_trials", lambda _: ranked)
    monkeypatch.setattr(final_module, "measured_cost", lambda run_dir, config: costs[run_dir.name])
    clock = [0.0]  # the simulated seconds: the budget's clock and the phase's (no real time counts)
    monkeypatch.setattr(final_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(budget_module, "time", types.SimpleNamespace(time=lambda: 1e9 + clock[0]))
    budget = budget_module.TimeBudget(
        tmp_path / budget_module.BUDGET_FILE, total_s=total_s, used_before_s=0.0, started=1e9
    )
    trained: dict[str, tuple[float, float, float]] = {}

    def simulated_job(self, model):
        def trains_its_epochs():
            per_image_s, images, _ = costs[model.trial_id]
            took = model.epochs * per_image_s * images
            trained[model.trial_id] = (clock[0], clock[0] + took, model.left_s)
            return {"holdout_f1": 0.5, "took": took}

        return final_module.Job(trains_its_epochs)

    def run_on_a_clock(workers, count, start, done):
        ends: dict[int, tuple[float, dict]] = {}
        index = 0
        while index < count or ends:
            while index < count and len(ends) < workers.at_once:
                job = start(index)
                if job is not None:
                    outcome = job.fn()
                    ends[index] = (clock[0] + outcome["took"], outcome)
                index += 1
            if ends:
                ended = min(ends, key=lambda i: ends[i][0])
                clock[0], outcome = ends.pop(ended)
                done(ended, outcome)

    monkeypatch.setattr(final_module._Phase, "_job", simulated_job)
    monkeypatch.setattr(final_module, "run_jobs", run_on_a_clock)
    plan = {"screen_folds": 1, "promote_top": 0, "max_final_epochs": 4, "max_final_seeds": 3}
    space = parse_space(
        {"name": "s", "fixed": {"k": 3}, "search": {"lr": {"loguniform": [1e-5, 1e-2]}}, "plan": plan}
    )
    workers = Workers(at_once=at_once, cpus=1)
    record = final_module.train_final(tmp_path, space, search_dir, budget, None, None, progress, workers)
    return record, trained


def test_two_slots_train_three_final_models_without_idling_one(tmp_path, monkeypatch):
    """The shared final phase end to end on two slots, with the jobs simulated on a clock (each takes
    its planned epochs at its measured cost): the chosen trial trains to its cap alone, the capped
    runner-up and the third share the other slot, every model ends inside the budget, and the two slots
    train 1,842 of their 2,000 s (even shares trained 1,590: t1 got 2.8 epochs, then idled its slot)."""
    # seconds per image on 1,000 training images, no holdout: an epoch of 220, 120 and 130 s
    costs = {"t1": (0.22, 1000, 0), "t2": (0.12, 1000, 0), "t3": (0.13, 1000, 0)}
    record, trained = _simulated_final_phase(tmp_path, monkeypatch, costs)

    assert [model["trial_id"] for model in record["models"]] == ["t1", "t2", "t3"]
    t1, t2, t3 = trained["t1"], trained["t2"], trained["t3"]
    assert t1[0] == t2[0] == 0 and t3[0] == t2[1], "t1 and t2 at once, t3 in t2's slot when it ends"
    assert record["models"][0]["epochs"] == 4, "the chosen one alone in its slot, to its cap"
    assert max(end for _, end, _ in trained.values()) <= 1000, "inside the budget"
    busy = sum(end - begin for begin, end, _ in trained.values())
    assert busy == pytest.approx(1842, abs=1), "92% of the two slots' 2,000 s trained"
    assert [model["epochs"] for model in record["models"]] == [4, 3.9, 3.8]


def test_a_runner_up_without_a_usable_cost_is_skipped_with_a_line(tmp_path, monkeypatch, capsys):
    costs = {"t1": (0.22, 1000, 0), "t2": (float("nan"), 1000, 0), "t3": (0.13, 1000, 0)}
    record, trained = _simulated_final_phase(tmp_path, monkeypatch, costs, progress=True)
    assert set(trained) == {"t1", "t3"} and [m["trial_id"] for m in record["models"]] == ["t1", "t3"]
    assert "final: trial t2 has no measured epoch; skipped" in capsys.readouterr().out
