"""``make bench`` at a toy size: every section runs for real and its JSON holds every field with sane values.

No timed assertions (the machine is shared); the checks are on structure, on figures that follow from the
data (cache bytes, image counts) and on the relations between figures (a ratio is the ratio of its parts).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_device
from benchmarks import run as bench_driver
from benchmarks.checkpoint_io import bench_checkpoint
from benchmarks.data import choose_persons, resolve_data_root, subset_data_root
from benchmarks.gpu import bench_gpu
from benchmarks.input import TimedBatches
from benchmarks.reference import PUBLISHED_SOURCE, PUBLISHED_TRAIN_RATES, default_space
from benchmarks.report import format_report
from benchmarks.run import main
from benchmarks.search import SearchBench, bench_asha, bench_overhead
from benchmarks.settings import (
    BENCH_FORMAT,
    DATA_ENV,
    DEFAULT_SECTIONS,
    SECTIONS,
    BenchError,
    BenchSettings,
    parse_sections,
    parse_size,
    summarize_runs,
)
from trainers.data import read_train
from trainers.errors import FoldtuneError

TOY_FLAGS = [
    "--image-size", "32x24",
    "--batch-size", "4",
    "--train-batches", "2",
    "--loader-batches", "3",
    "--memory-size", "32x24",
    "--repeats", "2",
    "--threads", "1",
    "--persons", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory, dataset_builder) -> Path:
    root = tmp_path_factory.mktemp("benchdata")
    dataset_builder(root, n_persons=8, size=(64, 48))
    return root


def toy_settings(**overrides) -> BenchSettings:
    values = dict(
        image_size=(32, 24),
        batch_size=4,
        train_batches=2,
        loader_batches=3,
        repeats=2,
        persons=None,
        memory_size=(32, 24),
        search_backbone="resnet10t",
        search_weights="none",
        search_freeze=0,
        search_size=(32, 24),
        search_batch_size=8,
        search_trials=2,
        search_epochs=2,
        gpu_backbone="resnet10t",
        gpu_size=(32, 24),
        gpu_batch_size=4,
        gpu_workers=0,
        gpu_batches=2,
        threads=1,
    )
    return BenchSettings(**{**values, **overrides})


def positive(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def assert_figure(figure: dict, repeats: int) -> None:
    """A quoted figure: the median of `repeats` positive runs."""
    assert set(figure) == {"median", "runs"}
    assert len(figure["runs"]) == repeats and all(positive(v) for v in figure["runs"])
    assert min(figure["runs"]) <= figure["median"] <= max(figure["runs"])


@pytest.fixture(scope="module")
def bench_run(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("benchout") / "results" / "bench.json"
    ceiling = ["--ceiling-size", "32x24", "--ceiling-batch-size", "4", "--ceiling-batches", "2"]
    code = main(
        [
            "--data",
            str(toy_root),
            "--only",
            "input,memory,ceiling,gpu",
            "--out",
            str(out),
            *TOY_FLAGS,
            *ceiling,
        ]
    )
    return code, json.loads(out.read_text()), out


def test_main_writes_strict_json_with_every_section(bench_run, toy_root):
    code, results, out = bench_run
    assert code == 0
    json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert results["format"] == BENCH_FORMAT
    assert results["data"] == {
        "root": str(toy_root.absolute()),
        "source": "--data",
        "persons": 8,
        "images": 56,
        "persons_used": 8,
        "images_used": 56,
    }
    assert results["settings"]["image_size"] == [32, 24] and results["settings"]["threads"] == 1
    assert set(results["sections"]) == {"input", "memory", "ceiling", "gpu"}
    assert all(positive(s["seconds"]) for s in results["sections"].values())
    assert positive(results["seconds"]) and results["host"]["cpus"] >= 1
    assert not list(out.parent.glob(".*.tmp")), "the JSON is written atomically"


def test_input_section_figures(bench_run):
    section = bench_run[1]["sections"]["input"]
    assert section["config"] == {
        "backbone": "resnet10t",
        "image_size": [32, 24],
        "batch_size": 4,
        "num_workers": 0,
        "augment": {"hflip": 0.5, "shift_scale_rotate": 0.5, "color_jitter": 0.5},
        "torch_threads": 1,
        "train_images_per_measurement": 8,
        "loader_images_per_measurement": 12,
    }
    speeds = section["images_per_second"]
    assert set(speeds) == {"compute_only", "cached_train", "seed_train", "cached_loader", "seed_loader"}
    for figure in speeds.values():
        assert_figure(figure, 2)
    for ratio, (top, bottom) in {
        "cached_vs_compute": ("cached_train", "compute_only"),
        "cached_vs_seed_train": ("cached_train", "seed_train"),
        "cached_vs_seed_loader": ("cached_loader", "seed_loader"),
    }.items():
        assert_figure(section[ratio], 2)
        expected = [t / b for t, b in zip(speeds[top]["runs"], speeds[bottom]["runs"], strict=True)]
        assert section[ratio]["runs"] == pytest.approx(expected)  # paired per repeat
    assert_figure(section["cached_input_wait_share"], 2)
    assert all(share < 1 for share in section["cached_input_wait_share"]["runs"])
    cache = section["cache"]
    pixels = 56 * 32 * 24 * 3
    assert pixels <= cache["bytes"] <= pixels + 4096  # uint8 (N, H, W, 3) plus the .npy header
    assert cache["bytes_per_image"] == pytest.approx(cache["bytes"] / 56)
    assert cache["images"] == 56 and positive(cache["source_bytes"])
    assert_figure(cache["build_seconds"], 2)
    assert_figure(cache["build_images_per_second"], 2)


def test_memory_section_shows_the_cache_shared_by_both_processes(bench_run):
    section = bench_run[1]["sections"]["memory"]
    cache_bytes = section["cache_bytes"]
    assert section["images"] == 56 and section["image_size"] == [32, 24]
    assert len(section["processes"]) == 2
    for process in section["processes"]:
        assert process["images"] == 56  # each streamed the whole cache
        assert process["cache_rss_bytes"] >= cache_bytes - 4096  # every page of it mapped in
        assert process["pss_bytes"] <= process["rss_bytes"] <= process["peak_rss_bytes"]
        assert positive(process["pss_bytes"])
    total = section["sum"]
    assert total["cache_pss_bytes"] == sum(p["cache_pss_bytes"] for p in section["processes"])
    # two processes map it, yet it is in memory once: PSS sums to one cache, RSS counts it twice
    assert 0.8 <= section["cache_pss_sum_over_cache_bytes"] <= 1.3
    assert 1.6 <= section["cache_rss_sum_over_cache_bytes"] <= 2.6
    assert positive(section["cache_build_seconds"])


def test_gpu_section_skips_with_a_note_without_cuda(bench_run):
    section = bench_run[1]["sections"]["gpu"]
    if torch.cuda.is_available():
        assert section["sharing"]["2"]["processes"] == 2
    else:
        assert "no CUDA device" in section["skipped"]


def test_targets_and_table(bench_run, capsys):
    results = bench_run[1]
    names = [t["name"] for t in results["targets"]]
    # (b)/(a), its input-wait form, (b)/(c) loaders, cache sharing, two ceilings; no searches
    assert len(names) == 6
    for target in results["targets"]:
        assert set(target) == {"name", "value", "target", "met"} and isinstance(target["met"], bool)
    report = format_report(results)
    texts = (
        "(a) compute only",
        "(b)/(a)",
        "cache-mapping PSS",
        "loader aug: CPU side",
        "SKIPPED",
        "targets:",
    )
    for text in texts:
        assert text in report or (text == "SKIPPED" and torch.cuda.is_available())


def test_ceiling_section_figures_and_ratios(bench_run):
    """The null-model loop per core, both augmentation placements, against the published GPU rates."""
    section = bench_run[1]["sections"]["ceiling"]
    space = default_space()
    config = section["config"]
    assert config["image_size"] == [32, 24] and config["batch_size"] == 4
    assert config["images_per_measurement"] == 8
    assert (config["torch_threads"], config["num_workers"]) == (1, 0)  # per core: everything on one core
    assert (config["trial_cpus"], config["gpu_share"]) == (space.trial_cpus, space.gpu_share)
    per_core = section["images_per_second_per_core"]
    assert set(per_core) == {"loader_cpu_side", "loader_total", "device_cpu_side", "device_total"}
    for figure in per_core.values():
        assert_figure(figure, 2)
    assert_figure(section["epoch_write_seconds"], 4)  # one per placement and repeat
    published = section["published"]
    assert published["source"]["file"] == PUBLISHED_SOURCE["file"]
    assert "benchmark-train-amp" in published["note"] and "RTX 3090" in published["note"]
    assert set(section["ratios"]) == set(space.backbones) & set(PUBLISHED_TRAIN_RATES)
    for backbone, ratios in section["ratios"].items():
        rate, _, size = PUBLISHED_TRAIN_RATES[backbone]
        gpu = rate * space.gpu_share * size * size / (32 * 24)
        assert ratios["gpu_images_per_second_per_trial"] == pytest.approx(gpu)
        for name, figure in per_core.items():
            assert ratios[name] == pytest.approx(figure["median"] * space.trial_cpus / gpu)
    targets = [t for t in bench_run[1]["targets"] if t["name"].startswith("pipeline ceiling")]
    assert [t["target"] for t in targets] == [">= 3", ">= 3"]
    for target, placement in zip(targets, ("loader", "device"), strict=True):
        worst = min(r[f"{placement}_cpu_side"] for r in section["ratios"].values())
        assert target["value"] == pytest.approx(worst) and target["met"] == (worst >= 3)


def test_checkpoint_section_old_vs_new_resume_state(tmp_path):
    """One fold written per kind; the new state leaves the frozen parameters out; per epoch = x k / N."""
    settings = toy_settings(
        checkpoint_backbones=("resnet10t",), checkpoint_size=(32, 24), checkpoint_depths=(0, 2), repeats=1
    )
    section = bench_checkpoint(settings, tmp_path, log=lambda message: None)
    space = default_space()
    config = section["config"]
    assert config["k"] == space.k and config["freeze_depths"] == [0, 2]
    assert config["resume_every_epochs"] == sorted({1, space.resume_every_epochs or 1})
    assert config["filesystem"] and not list((tmp_path / "checkpoint-io").glob("*.pt"))
    entry = section["backbones"]["resnet10t"]
    best = entry["best_checkpoint"]
    params = entry["depths"]["0"]["params_total"]
    assert best["bytes"] >= 4 * params and positive(best["seconds"]["median"])
    assert entry["best_per_epoch_worst_case"]["bytes"] == space.k * best["bytes"]
    for depth, figures in entry["depths"].items():
        old, new = figures["old"]["bytes"], figures["new"]["bytes"]
        frozen = figures["params_total"] - figures["params_trainable"]
        # the new state drops the frozen parameters (float32) and adds the RNG states (a few KB)
        assert old - 4 * frozen - 64 * 1024 <= new <= old - 4 * frozen + 64 * 1024
        assert (frozen == 0) == (depth == "0")
        assert old >= 3 * 4 * figures["params_trainable"]  # weights + two Adam moments
        per_epoch = figures["per_epoch"]
        assert per_epoch["old"]["bytes"] == space.k * old
        for every in config["resume_every_epochs"]:
            assert per_epoch[f"new_every_{every}"]["bytes"] == pytest.approx(space.k * new / every)
        assert figures["new_over_old_bytes"] == pytest.approx(new / old)


def test_gpu_section_code_runs_on_the_cpu(toy_root, tmp_path):
    """The GPU path cannot be tried here; the same code on the CPU proves it runs end to end."""
    table = read_train(toy_root).table
    section = bench_gpu(table, toy_settings(), tmp_path, device_name="cpu", log=lambda message: None)
    assert section["device"] == "cpu"
    assert set(section["images_per_second"]) == {
        "fp32_compute_only",
        "fp32_cached",
        "amp_channels_last_compute_only",
        "amp_channels_last_cached",
    }
    for figure in section["images_per_second"].values():
        assert_figure(figure, 2)
    assert "no_step_sync_speedup" not in section  # fit no longer syncs per step: nothing to compare
    assert section["config"]["augment_on"] == "loader"  # where fit augments on the CPU
    assert_figure(section["amp_speedup"], 2)
    assert set(section["cached_input_wait_share"]) == {"fp32", "amp_channels_last"}
    for figure in section["cached_input_wait_share"].values():
        assert_figure(figure, 2)
        assert max(figure["runs"]) < 1
    assert [section["sharing"][n]["processes"] for n in ("1", "2")] == [1, 2]
    for n in ("1", "2"):
        shared = section["sharing"][n]
        assert len(shared["per_process"]) == shared["processes"]
        assert shared["total_images_per_second"] == pytest.approx(
            sum(p["median"] for p in shared["per_process"])
        )
    assert section["two_processes_vs_one"] == pytest.approx(
        section["sharing"]["2"]["total_images_per_second"]
        / section["sharing"]["1"]["total_images_per_second"]
    )


def test_a_failing_section_is_recorded_and_the_others_still_run(toy_root, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(bench_driver, "bench_memory", broken)
    out = tmp_path / "bench.json"
    code = main(["--data", str(toy_root), "--only", "memory,gpu", "--out", str(out), *TOY_FLAGS])
    results = json.loads(out.read_text())
    assert code == 1
    assert results["sections"]["memory"]["error"] == "RuntimeError: simulated failure"
    assert "gpu" in results["sections"]


def test_data_root_resolution(tmp_path, monkeypatch, toy_root):
    with pytest.raises(BenchError, match="no train/train.csv"):
        resolve_data_root(str(tmp_path / "missing"), tmp_path, 6, log=lambda m: None)
    monkeypatch.setenv(DATA_ENV, str(toy_root))
    assert resolve_data_root(None, tmp_path, 6) == (toy_root.absolute(), f"${DATA_ENV}")
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "gone"))
    notes = []
    root, source = resolve_data_root(None, tmp_path, 6, log=notes.append)
    assert source == "demo" and len(read_train(root).table) == 6 * 7
    assert "has no train/train.csv" in notes[0]


def test_subset_data_root_is_a_valid_smaller_data_root(toy_root, tmp_path):
    table = read_train(toy_root).table
    persons = choose_persons(table, 3, seed=0)
    assert persons == choose_persons(table, 3, seed=0) and len(set(persons)) == 3
    subset = read_train(subset_data_root(toy_root, persons, tmp_path / "subset")).table
    assert sorted(subset["person_dir"].unique()) == persons and len(subset) == 21
    assert choose_persons(table, None, seed=0) == sorted(table["person_dir"].unique())


def test_argument_parsing():
    assert parse_size("128x96") == (128, 96)
    for bad in ("128", "axb", "8x8"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
    assert parse_sections("input, asha") == ("input", "asha")
    assert set(SECTIONS) - set(DEFAULT_SECTIONS) == {"checkpoint"}  # opt-in: --only checkpoint
    with pytest.raises(argparse.ArgumentTypeError, match="input, memory"):
        parse_sections("input,speed")
    assert summarize_runs([3.0, 1.0, 2.0]) == {"median": 2.0, "runs": [3.0, 1.0, 2.0]}
    with pytest.raises(BenchError, match="repeats"):
        BenchSettings(repeats=0)


def test_a_user_error_is_one_error_line_and_exit_code_2(tmp_path, capsys):
    assert issubclass(BenchError, FoldtuneError)  # the project's one error family, which the CLI reports
    out = tmp_path / "bench.json"
    for flags in (["--data", str(tmp_path / "missing")], ["--repeats", "0"]):
        assert main([*flags, "--only", "input", "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and "\n" not in error
    assert not out.exists()


def test_timed_batches_times_every_wait_and_counts_the_trained_images():
    batches = [
        (torch.zeros(n, 2, 2, 3, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64)) for n in (4, 4, 3)
    ]
    timed = TimedBatches(batches)
    assert [len(labels) for _, labels in timed] == [4, 4, 3]  # the batches, unchanged and in order
    assert timed.images == 11
    assert len(timed.waits) == 4 and all(wait >= 0 for wait in timed.waits)  # each batch and the end
    abandoned = TimedBatches(batches)
    iterator = iter(abandoned)
    next(iterator), next(iterator)  # a step that gives up on its second batch, as a diverged one does
    assert abandoned.images == 4 and len(abandoned.waits) == 2


def test_gpu_device_tiny_runs_end_to_end_on_the_cpu(tmp_path, capsys):
    """`python -m benchmarks.gpu_device --tiny`: every configuration, the packed pair, JSON and Markdown."""
    out = tmp_path / "gpu"
    assert gpu_device.main(["--tiny", "--out", str(out)]) == 0
    results = json.loads((out / "gpu_device.json").read_text())
    backbones = ["test_efficientnet", "test_convnext", "test_resnet"]
    assert results["plan"]["backbones"] == backbones and results["plan"]["device"] == "cpu"
    assert results["host"]["amp_dtype"].startswith("none")
    configs = {f"compute/{p}/{m}" for p in ("amp", "fp32") for m in ("channels_last", "nchw")}
    configs |= {f"loader+{place}-aug/amp/channels_last" for place in ("loader", "device")}
    configs |= {"compute/amp/channels_last/no-cudnn-benchmark", "compute/amp/channels_last/compile"}
    assert {(c["backbone"], c["config"]) for c in results["configs"]} == {
        (b, c) for b in backbones for c in configs
    }
    compiled = [c for c in results["configs"] if c["config"].endswith("/compile")]
    assert all(c["skipped"].startswith("compile is measured on CUDA only") for c in compiled)
    for record in results["configs"]:
        if record in compiled:
            continue
        assert "error" not in record and "skipped" not in record
        assert record["steps"] == 2 and positive(record["images_per_second"])
        assert record["images_per_second"] == pytest.approx(2 * 4 / record["seconds"])
        assert 0 <= record["input_wait_share"] < 1
    packed = results["packed"]
    assert "error" not in packed and packed["memory_fraction"] == 0.5
    for backbone in backbones:
        processes = packed["backbones"][backbone]["processes"]
        assert [p["index"] for p in processes] == [0, 1]
        assert all(positive(p["images_per_second"]) for p in processes)
        summary = results["summary"][backbone]
        single = next(
            c["images_per_second"]
            for c in results["configs"]
            if c["backbone"] == backbone and c["config"] == "loader+device-aug/amp/channels_last"
        )
        total = sum(p["images_per_second"] for p in processes)
        assert summary["packed_total_over_single"] == pytest.approx(total / single)
        assert summary["published_scaled"] is None  # tiny stand-ins have no published rate
    table = (out / "gpu_device.md").read_text()
    assert table.strip() in capsys.readouterr().out  # printed too
    for text in ("## Configurations", "## Per backbone", "## Two training processes", "FoldLoader"):
        assert text in table
    assert "device (DeviceAugment)" in table and "loader (albumentations)" in table
    assert "benchmark-train-amp-nhwc-pt112-cu113-rtx3090.csv" in table
    rows = [line for line in table.splitlines() if line.startswith("| test_")]
    assert len(rows) == 3 * 8 + 3 + 3  # every configuration, the per-backbone summary, the packed pairs
    assert "cudnn_benchmark on / off" in table and "compile / eager" in table
    assert all(f"| {b} |" in table for b in backbones)


def test_gpu_device_records_a_failing_configuration_and_runs_the_others(tmp_path, monkeypatch):
    real = gpu_device.run_config

    def flaky(plan, backbone, variant, cache_path):
        if backbone == "test_resnet" and variant.input == "loader":
            raise RuntimeError("simulated CUDA error")
        return real(plan, backbone, variant, cache_path)

    monkeypatch.setattr(gpu_device, "run_config", flaky)
    out = tmp_path / "gpu"
    flags = ["--tiny", "--no-packed", "--backbones", "test_efficientnet,test_resnet", "--out", str(out)]
    assert gpu_device.main(flags) == 1
    results = json.loads((out / "gpu_device.json").read_text())
    failed = [c for c in results["configs"] if "error" in c]
    assert {c["config"] for c in failed} == {
        "loader+device-aug/amp/channels_last",
        "loader+loader-aug/amp/channels_last",
    }
    assert all(c["backbone"] == "test_resnet" and "simulated CUDA error" in c["error"] for c in failed)
    assert sum("images_per_second" in c for c in results["configs"]) == 2 * 8 - 2 - 2  # - compile, - failed
    assert "packed" not in results
    assert "RuntimeError: simulated CUDA error" in (out / "gpu_device.md").read_text()


def test_gpu_device_skips_what_the_time_budget_leaves_no_room_for(tmp_path):
    out = tmp_path / "gpu"
    flags = ["--tiny", "--no-packed", "--budget-s", "0", "--backbones", "test_resnet", "--out", str(out)]
    assert gpu_device.main(flags) == 0
    results = json.loads((out / "gpu_device.json").read_text())
    assert len(results["configs"]) == 8 and all("skipped" in c for c in results["configs"])
    assert sum("time budget" in c["skipped"] for c in results["configs"]) == 7  # compile: CUDA only


def test_gpu_device_imports_nothing_of_the_orchestrator():
    """The lent GPU machine cannot take Ray along: benchmarks.gpu_device must not import it, nor
    orchestrator, Optuna or MLflow, directly or through benchmarks/__init__.py."""
    code = (
        "import sys, benchmarks.gpu_device; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'orchestrator', 'ray', 'optuna', 'mlflow'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_search_sections(toy_root, tmp_path):
    """Overhead and ASHA through the real Ray Tune search (tens of seconds: Ray starts twice)."""
    searches = SearchBench(toy_root, toy_settings(), tmp_path, log=lambda message: None)
    overhead = bench_overhead(searches)
    asha = bench_asha(searches)
    run = overhead["repeats"][0]
    assert len(run["trial_fit_seconds_in_search"]) == len(run["trial_fit_seconds_bare"]) == 2
    assert run["overhead"] == pytest.approx(run["search_wall_seconds"] / run["bare_fit_seconds"] - 1)
    # the search's wall time splits into before the first fit, the fits, the gap between them, after the last
    parts = (
        run["before_first_trial_seconds"]
        + sum(run["trial_fit_seconds_in_search"])
        + sum(run["between_trials_seconds"])
        + run["after_last_trial_seconds"]
    )
    assert parts == pytest.approx(run["search_wall_seconds"], abs=0.5)
    assert positive(run["before_first_trial_seconds"]) and len(run["between_trials_seconds"]) == 1
    assert run["fixed_seconds"] == pytest.approx(
        run["before_first_trial_seconds"] + run["after_last_trial_seconds"]
    )
    assert positive(overhead["trial_seconds_for_5_percent"]["median"]) and run["epochs"] == 4
    assert asha["repeats"][0]["finished"] is True
    assert asha["epochs_without"]["median"] == 4  # 2 trials x 2 epochs, nothing stopped
    assert 1 <= asha["epochs_with"]["median"] <= 4
    assert asha["epoch_share"]["median"] == pytest.approx(asha["epochs_with"]["median"] / 4)
    assert 0 <= asha["best_f1_without"]["median"] <= 1 and 0 <= asha["best_f1_with"]["median"] <= 1


def test_holdout_precision_shrinks_with_persons_and_bounds_the_chance_of_matching_eval(tmp_path, capsys):
    """``benchmarks.holdout_precision`` on a real fold file and holdout vote: the standard error falls
    as persons are added (about 1/sqrt(n)), and no holdout size beats an error-free figure's chance."""
    import numpy as np
    import pandas as pd

    from benchmarks.holdout_precision import main as precision_main
    from benchmarks.holdout_precision import within
    from trainers.folds import write_folds

    rng = np.random.default_rng(0)
    persons = [f"{n:06d}" for n in range(200)]
    rel_path = [f"train/images/{p}_male_Asian_30/mask{i}.jpg" for p in persons for i in range(7)]
    labels = rng.integers(0, 18, len(rel_path))
    probs = np.eye(18)[np.where(rng.random(len(rel_path)) < 0.6, labels, rng.integers(0, 18, len(rel_path)))]
    trained = [f"{n:06d}" for n in range(200, 204)]  # a fold file needs its folds: four trained persons
    folds = pd.DataFrame(
        {
            "rel_path": rel_path + [f"train/images/{p}_male_Asian_30/normal.jpg" for p in trained],
            "person_id": list(np.repeat(persons, 7)) + trained,
            "fold": [-1] * len(rel_path) + [0, 0, 1, 1],
        }
    )
    write_folds(folds, tmp_path / "folds.csv")
    np.savez(tmp_path / "holdout_probs.npz", rel_path=np.array(rel_path), label=labels, probs=probs)

    assert precision_main([str(tmp_path), "--eval-persons", "870"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split(" | ")
    assert row[1] == "200"
    se_half, se_all, se_double = (float(v) for v in row[3].split(", "))
    assert se_half > se_all > se_double > 0
    assert se_half / se_all == pytest.approx(math.sqrt(2), rel=0.25)
    chances = [float(v) for v in row[4].split(", ")]
    assert chances == sorted(chances) and chances[-1] <= 1
    assert within(0.0, 0.015) == pytest.approx(0.954, abs=0.01)  # +-0.03 is two standard errors of 0.015


def test_the_equal_compute_search_arm_can_draw_other_holdout_persons_and_judges_its_estimate(tmp_path):
    from benchmarks.equal_compute import _estimate, _one_at_a_time
    from orchestrator.space import load_space

    cpu = Path(__file__).resolve().parents[1] / "search_spaces" / "cpu.yaml"
    space = load_space(_one_at_a_time(cpu, tmp_path / "space.yaml", 7, folds_seed=3))
    assert space.fixed["folds_seed"] == 3 and space.fixed["seed"] == 7 and space.max_concurrent == 1
    assert "folds_seed" not in load_space(_one_at_a_time(cpu, tmp_path / "same.yaml", 7)).fixed

    report = tmp_path / "ensemble.json"
    estimates = {"trusted": "holdout", "trusted_f1": 0.61, "holdout_interval": [0.57, 0.65]}
    report.write_text(json.dumps({"estimates": {**estimates, "test_interval": [0.55, 0.67]}}))
    row = _estimate(report, eval_f1=0.56)
    assert row["minus_eval"] == pytest.approx(0.05) and not row["within_0.03"]
    assert not row["holdout_interval_covers_eval"] and row["test_interval_covers_eval"]
    report.write_text(json.dumps({"estimates": {"trusted": None, "trusted_f1": None}}))
    assert _estimate(report, eval_f1=0.56) == {"trusted": None, "f1": None}


def test_eval_parts_scores_the_first_eval_persons_and_the_moved_ones_apart(tmp_path, capsys):
    """A fake aafmask base of 80 persons: the eval of a 0.40 build holds the 0.25 build's persons
    ('first') and those it moved; a submission right on every first image and wrong on every moved one
    scores 1.0 and 0.0 on them, each part counted by aafmask's own person hashes."""
    import csv
    import hashlib
    import json

    from benchmarks.eval_parts import PICTURES, main

    base, data = tmp_path / "base", tmp_path / "aaf40"
    base.mkdir()
    (data / "eval").mkdir(parents=True)
    with open(base / "people.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "serial"], *[[f"{n}.jpg", n] for n in range(80)]])
    answers, submission, parts = [], [], {"first": 0, "moved": 0}
    for n in range(80):
        person = f"{n:06d}"
        bucket = int(hashlib.sha256(person.encode()).hexdigest(), 16) % 10000
        if bucket >= 4000:
            continue  # in train at 0.40
        part = "first" if bucket < 2500 else "moved"
        parts[part] += 1
        for k, picture in enumerate(PICTURES):
            image = hashlib.sha1(f"{person}/{picture}".encode()).hexdigest() + ".jpg"
            answers.append([image, k])
            submission.append([image, k if part == "first" else (k + 1) % 7])
    for name, rows in (("eval/answers.csv", answers), ("submission.csv", submission)):
        with open(data / name, "w", newline="") as handle:
            csv.writer(handle).writerows([["ImageID", "ans"], *rows])

    assert main(["--base", str(base), "--data", str(data), str(data / "submission.csv")]) == 0
    scores = json.loads((data / "eval_parts.json").read_text())
    assert parts["first"] >= 2 and parts["moved"] >= 2
    assert scores["first"]["persons"] == parts["first"] and scores["moved"]["persons"] == parts["moved"]
    assert scores["first"]["f1"] == 1.0 and scores["first"]["interval"] == [1.0, 1.0]
    assert scores["moved"]["f1"] == 0.0 and 0 < scores["all"]["f1"] < 1
    assert "first" in capsys.readouterr().out
