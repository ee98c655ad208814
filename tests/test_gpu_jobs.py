"""Promotions and final models on the cluster's GPUs without a GPU: a local Ray that declares two GPUs.

``orchestrator.search.gpu_jobs`` runs a planned search's promotions and final models one per GPU at once as
Ray tasks (on a cluster without GPUs: in the driver, one after another, as the CPU presets measured). The
jobs here are recording stand-ins (closures, so Ray ships them by value), the final phase's arithmetic is
the real one: on two GPUs two final models train at once, each with the whole time left.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import ray

from orchestrator.plan import promotions_that_fit
from orchestrator.search.gpu_jobs import Job, JobFailed, Workers, run_jobs, workers_for
from orchestrator.space import parse_space
from trainers.data import DataError
from trainers.data_checks import Problem

SPACE = {
    "name": "s",
    "fixed": {"epochs": 1, "k": 3, "image_size": [32, 24], "batch_size": 16, "pretrained": False},
    "search": {"lr": {"loguniform": [1e-5, 1e-2]}},
    "resources": {"cpu": 1, "gpu": 0.5},
    "plan": {"screen_folds": 1, "max_final_epochs": 4, "max_final_seeds": 2, "promote_top": 0},
}


@pytest.fixture
def two_gpu_ray():
    """Two GPUs and four CPUs declared on a machine with no GPU."""
    ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def recording_job(record_dir: Path, name: str, together: int, hold_s: float = 1.0):
    """A job that records where it ran, after waiting (at most 60 s) until ``together`` jobs started:
    jobs run at once overlap, jobs run one after another wait in vain and do not."""

    def job() -> dict:
        import torch

        started = time.time()
        (record_dir / f"{name}.started").touch()
        deadline = time.monotonic() + 60
        while len(list(record_dir.glob("*.started"))) < together and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(hold_s)
        return {
            "name": name,
            "pid": os.getpid(),
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()] if ray.is_initialized() else [],
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": torch.get_num_threads(),
            "start": started,
            "end": time.time(),
        }

    return job


def test_without_gpus_the_jobs_run_in_the_driver_one_after_another(tmp_path):
    assert workers_for(parse_space({**SPACE, "resources": {"cpu": 1, "gpu": 0}})) == Workers()
    calls: list[str] = []
    results: dict[int, dict] = {}

    def start(index: int) -> Job | None:
        calls.append(f"start {index}")
        return None if index == 1 else Job(recording_job(tmp_path, f"j{index}", together=1, hold_s=0.1))

    def done(index: int, outcome) -> None:
        calls.append(f"done {index}")
        results[index] = outcome

    run_jobs(Workers(), 3, start, done)
    assert calls == ["start 0", "done 0", "start 1", "start 2", "done 2"]  # job 1 skipped
    assert {r["pid"] for r in results.values()} == {os.getpid()}
    assert results[0]["end"] <= results[2]["start"]


def test_on_two_gpus_two_jobs_run_at_once_each_on_its_own_gpu_and_the_third_is_planned_when_one_ends(
    tmp_path, two_gpu_ray
):
    workers = workers_for(parse_space(SPACE))
    assert workers == Workers(at_once=2, cpus=2, on_gpus=True)  # 4 CPUs / 2 GPUs; a 0.5 GPU trial had 1
    calls: list[str] = []
    results: dict[int, dict] = {}

    def start(index: int) -> Job:
        calls.append(f"start {index}")
        return Job(recording_job(tmp_path, f"j{index}", together=2), device="cpu")

    def done(index: int, outcome) -> None:
        calls.append(f"done {index}")
        results[index] = outcome

    run_jobs(workers, 3, start, done)
    assert calls[:2] == ["start 0", "start 1"] and calls[2].startswith("done")
    assert calls.index("start 2") > 2, "the third job is planned only when a GPU is free again"
    first, second, third = results[0], results[1], results[2]
    assert max(first["start"], second["start"]) < min(first["end"], second["end"])  # at once
    assert third["start"] >= min(first["end"], second["end"]) - 0.05
    assert {first["gpu_ids"][0], second["gpu_ids"][0]} == {"0", "1"}
    for result in results.values():
        assert result["pid"] != os.getpid() and len(result["gpu_ids"]) == 1
        assert result["cuda_visible_devices"] == result["gpu_ids"][0] and result["threads"] == 2


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        ([(16, 8)], Workers(8, 2, True)),  # 2 CPUs per GPU (a 0.5-GPU trial had 1, so 2 per GPU at most)
        ([(4, 8)], Workers(8, 0.5, True)),  # fewer CPUs than GPUs: half a CPU each, all 8 start at once
        ([(64, 8), (8, 0)], Workers(8, 2, True)),  # the trial's share caps it; a CPU-only node adds nothing
        ([(8, 0.5)], Workers()),  # no whole GPU: the driver
    ],
)
def test_workers_get_one_whole_gpu_each_and_a_share_of_its_nodes_cpus(nodes, expected, monkeypatch):
    import orchestrator.search.gpu_jobs as gpu_jobs
    from orchestrator.search.capacity import Node

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # the nodes below stand for the cluster
    monkeypatch.setattr(gpu_jobs, "cluster_nodes", lambda: [Node(float(c), float(g)) for c, g in nodes])
    assert workers_for(parse_space(SPACE)) == expected


CPU_SPACE = {**SPACE, "resources": {"cpu": 1, "gpu": 0}}


@pytest.mark.parametrize(
    ("max_concurrent", "nodes", "expected"),
    [
        (2, [(2, 0)], Workers(2, 1)),  # cpu.yaml on 2 cores: two jobs at once, a trial's one thread each
        (1, [(2, 0)], Workers()),  # one trial at a time: the driver, as the one-core benchmarks ran
        (4, [(2, 0)], Workers(2, 1)),  # no more than the cluster holds
        ("auto", [(4, 0), (2, 8)], Workers(6, 1)),  # what every node holds
    ],
)
def test_cpu_trials_that_ran_several_at_once_get_as_many_jobs_at_once_each_with_a_trials_cpus(
    max_concurrent, nodes, expected, monkeypatch
):
    import orchestrator.search.gpu_jobs as gpu_jobs
    from orchestrator.search.capacity import Node

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(gpu_jobs, "cluster_nodes", lambda: [Node(float(c), float(g)) for c, g in nodes])
    assert workers_for(parse_space({**CPU_SPACE, "max_concurrent": max_concurrent})) == expected


def test_on_cpus_two_jobs_run_at_once_in_tasks_with_one_thread_each_and_no_gpu(tmp_path, two_gpu_ray):
    workers = Workers(2, 1)
    assert not workers.in_driver and "2 at once, 1 CPU(s) each" in workers.describe()
    results: dict[int, dict] = {}
    jobs = [Job(recording_job(tmp_path, f"c{i}", together=2), device="cpu") for i in range(2)]
    run_jobs(workers, 2, lambda i: jobs[i], results.__setitem__)
    first, second = results[0], results[1]
    assert max(first["start"], second["start"]) < min(first["end"], second["end"])  # at once
    for result in results.values():
        assert result["pid"] != os.getpid() and result["gpu_ids"] == [] and result["threads"] == 1
        assert result["cuda_visible_devices"] == ""  # kept off the node's GPUs (Ray leaves them visible)


def failing_job():
    """A job raising foldtune's error (a closure: Ray ships it by value, the test module is not importable
    in its workers)."""

    def fails():
        raise DataError(Problem("error", "fold0.pt", "unreadable checkpoint; rerun the trial"))

    return fails


def test_a_job_failure_and_a_gpu_torch_cannot_use_come_back_as_one_line(tmp_path, two_gpu_ray):
    outcomes: dict[int, object] = {}
    jobs = [Job(failing_job(), device="cpu"), Job(recording_job(tmp_path, "gpu", 1), device="auto")]
    run_jobs(Workers(2, 1, True), 2, lambda i: jobs[i], outcomes.__setitem__)
    assert isinstance(outcomes[0], JobFailed) and "fold0.pt" in outcomes[0].line
    assert "unreadable checkpoint" in outcomes[0].line and "\n" not in outcomes[0].line
    # this machine's torch cannot use the GPU Ray hands the task: it fails at once, never trains on the CPU
    assert isinstance(outcomes[1], JobFailed) and "holds a GPU" in outcomes[1].line, outcomes[1]


def test_promotions_that_fit_count_the_gpus_they_run_on():
    need, cost = 100.0, 10.0
    left = (need + 2 * cost) / 0.95  # 20 s spare after the final model
    assert promotions_that_fit(left, [cost] * 4, need) == 2  # one after another
    assert promotions_that_fit(left, [cost] * 4, need, at_once=2) == 4  # two rounds of two
    assert promotions_that_fit(left, [15.0, 15.0, 15.0], need, at_once=2) == 2


def test_on_two_gpus_the_final_models_train_at_once_each_with_the_whole_time_left(
    tmp_path, dataset_builder, tracking_uri, monkeypatch, two_gpu_ray
):
    from test_promote import an_hour, final_phase_space, screened_trials

    import orchestrator.refit
    import orchestrator.search.final as final_module

    root, search_dir = screened_trials(tmp_path, dataset_builder, {"t1": 3e-3, "t2": 1e-3})
    monkeypatch.setattr(orchestrator.refit, "ranked_trials", lambda _: [("t1", 0.5, True), ("t2", 0.4, True)])
    # 3 epochs of t1 fit in the hour: under the cap of 4 on one GPU, but two GPUs hold two models
    costs = {"t1": (1.1, 1000, 0), "t2": (1.0, 1000, 0)}
    monkeypatch.setattr(final_module, "measured_cost", lambda run_dir, config: costs[run_dir.name])
    records = tmp_path / "records"
    records.mkdir()

    def job(self, model):
        where = recording_job(records, model.trial_id, together=2)

        def refit() -> dict:
            (records / f"{model.trial_id}.json").write_text(json.dumps({**where(), "left_s": model.left_s}))
            return {"holdout_f1": 0.5}

        return final_module.Job(refit, device="cpu")

    monkeypatch.setattr(final_module._Phase, "_job", job)
    space = final_phase_space(max_final_epochs=4, max_final_seeds=2, resources={"cpu": 1, "gpu": 0.5})
    budget = an_hour(tmp_path)
    record = final_module.train_final(root, space, search_dir, budget, None, tracking_uri, False)

    ran = {name: json.loads((records / f"{name}.json").read_text()) for name in ("t1", "t2")}
    assert [m["trial_id"] for m in record["models"]] == ["t1", "t2"]
    assert max(r["start"] for r in ran.values()) < min(r["end"] for r in ran.values())  # at once
    assert {r["gpu_ids"][0] for r in ran.values()} == {"0", "1"}
    assert all(r["left_s"] == pytest.approx(3600, abs=30) for r in ran.values())  # each the whole hour
    for model in record["models"]:  # each what the whole hour holds at its cost (t1 3.1, t2 3.4 epochs)
        whole = final_module.final_epochs(3600, *costs[model["trial_id"]], 0, 4)
        assert model["epochs"] == pytest.approx(whole, abs=0.1) and 3 < whole < 4


def test_on_a_cpu_node_whose_trials_ran_two_at_once_the_real_final_models_train_two_at_once(
    tmp_path, dataset_builder, tracking_uri, monkeypatch, local_ray
):
    """The real refits (not stand-ins) as Ray tasks on a 2-CPU Ray: a space of two 1-thread trials at once
    gets two final models at once, each with one thread, recorded where they ran."""
    from test_promote import an_hour, final_phase_space, screened_trials

    import orchestrator.refit
    import orchestrator.search.final as final_module

    root, search_dir = screened_trials(tmp_path, dataset_builder, {"t1": 3e-3, "t2": 1e-3})
    monkeypatch.setattr(orchestrator.refit, "ranked_trials", lambda _: [("t1", 0.5, True), ("t2", 0.4, True)])
    space = final_phase_space(max_final_epochs=1, max_final_seeds=2, max_concurrent=2)
    workers = workers_for(space)
    assert workers == Workers(2, 1)
    record = final_module.train_final(
        root, space, search_dir, an_hour(tmp_path), tmp_path / "cache", tracking_uri, False
    )
    assert record["trained"] == "2 at once, 1 CPU(s) each, as the trials ran"
    assert [m["trial_id"] for m in record["models"]] == ["t1", "t2"]
    for model in record["models"]:
        refit = json.loads((search_dir / "refit" / model["trial_id"] / "refit.json").read_text())
        assert refit["continued_from"] == "fold0.pt" and refit["epochs"] == model["epochs"] == 1
        assert (search_dir / "refit" / model["trial_id"] / "seed0.pt").is_file()
