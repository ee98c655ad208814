"""What a bench run hands back: each target of the issue checked, the human-readable table (median [each
repeat] of every figure), and strict JSON."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.settings import SECTIONS


def target_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the issue with its measured median and whether it is met."""
    checks = []

    def check(name: str, value: float, target: str, met: bool) -> None:
        checks.append({"name": name, "value": value, "target": target, "met": bool(met)})

    section = results.get("input", {})
    if "cached_vs_compute" in section:
        value = section["cached_vs_compute"]["median"]
        check("(b) cached training / (a) compute only", value, ">= 0.95", value >= 0.95)
        value = 1 - section["cached_input_wait_share"]["median"]
        check("1 - (b)'s share of time waiting for input", value, ">= 0.95", value >= 0.95)
        value = section["cached_vs_seed_loader"]["median"]
        check("(b) cached loader / (c) seed-style loader", value, ">= 5", value >= 5.0)
    section = results.get("memory", {})
    if "cache_pss_sum_over_cache_bytes" in section:
        value = section["cache_pss_sum_over_cache_bytes"]
        check("cache PSS summed over processes / cache size", value, "~1 (shared, not copied)", value <= 1.1)
    section = results.get("ceiling", {})
    if section.get("ratios"):
        for placement in ("loader", "device"):
            name = f"{placement}_cpu_side"
            backbone = min(section["ratios"], key=lambda b: section["ratios"][b][name])
            value = section["ratios"][backbone][name]
            target = section["target_ratio"]
            check(
                f"pipeline ceiling, {placement} augmentation (CPU side) x trial CPUs / GPU rate per trial "
                f"({backbone}, the fastest published)",
                value,
                f">= {target:g}",
                value >= target,
            )
    section = results.get("overhead", {})
    if "overhead" in section:
        value = section["overhead"]["median"]
        check("search wall / bare fit - 1", value, "<= 0.05", value <= 0.05)
    section = results.get("asha", {})
    if "epoch_share" in section:
        value = section["epoch_share"]["median"]
        check("ASHA epochs / no-ASHA epochs", value, "<= 0.5", value <= 0.5)
    return checks


def _fmt(value: Any, unit: str = "") -> str:
    if isinstance(value, dict) and "median" in value:
        runs = ", ".join(_fmt(v) for v in value["runs"])
        return f"{_fmt(value['median'], unit)}  [{runs}]"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        text = f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"
        return f"{text}{unit}"
    return f"{value}{unit}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def format_report(results: dict[str, Any]) -> str:
    """The human-readable table: median [each repeat] of every figure, then the targets."""
    data = results.get("data")
    source = (
        f"{data['root']} ({data['source']}, {data['persons_used']} of {data['persons']} persons)"
        if data
        else "none needed"
    )
    lines = [
        f"foldtune bench — data: {source}, repeats {results['settings']['repeats']}, "
        f"load avg {results['host']['load_average_start']} -> {results['host'].get('load_average_end')}"
    ]

    def row(name: str, value: Any, unit: str = "") -> None:
        lines.append(f"  {name:<46} {_fmt(value, unit)}")

    for section in SECTIONS:
        if section not in results["sections"]:
            continue
        data = results["sections"][section]
        lines.append(f"{section}:")
        if "skipped" in data or "error" in data:
            lines.append(
                f"  {'SKIPPED' if 'skipped' in data else 'ERROR'}: {data.get('skipped') or data['error']}"
            )
            continue
        if section == "input":
            c = data["config"]
            lines.append(
                f"  {c['backbone']} {c['image_size'][0]}x{c['image_size'][1]}, batch {c['batch_size']}, "
                f"{c['num_workers']} loader workers, {c['torch_threads']} torch threads"
            )
            ips = data["images_per_second"]
            row("(a) compute only, batches in memory", ips["compute_only"], " img/s")
            row("(b) fit's loop on the decode-once cache", ips["cached_train"], " img/s")
            row("(c) same step, seed-style JPEG loader", ips["seed_train"], " img/s")
            row("(b) loader alone", ips["cached_loader"], " img/s")
            row("(c) loader alone", ips["seed_loader"], " img/s")
            row("(b)/(a)  [target >= 0.95]", data["cached_vs_compute"])
            row("(b) share of epoch waiting for input", data["cached_input_wait_share"])
            row("(b)/(c) training", data["cached_vs_seed_train"])
            row("(b)/(c) loaders  [target >= 5]", data["cached_vs_seed_loader"])
            cache = data["cache"]
            row(f"cache build, {cache['images']} images", cache["build_seconds"], " s")
            row(
                "cache size",
                f"{_mib(cache['bytes'])} ({cache['bytes_per_image']:.0f} B/image; "
                f"JPEGs {_mib(cache['source_bytes'])})",
            )
        elif section == "memory":
            row(
                f"cache {data['image_size'][0]}x{data['image_size'][1]}, {data['images']} images",
                f"{_mib(data['cache_bytes'])}, built in {data['cache_build_seconds']:.1f} s",
            )
            for i, p in enumerate(data["processes"]):
                row(
                    f"process {i + 1}: RSS / PSS / peak RSS",
                    f"{_mib(p['rss_bytes'])} / {_mib(p['pss_bytes'])} / {_mib(p['peak_rss_bytes'])}",
                )
                row(
                    f"process {i + 1}: cache mapping RSS / PSS",
                    f"{_mib(p['cache_rss_bytes'])} / {_mib(p['cache_pss_bytes'])}",
                )
            total = data["sum"]
            row("sum: RSS / PSS", f"{_mib(total['rss_bytes'])} / {_mib(total['pss_bytes'])}")
            row("sum of cache-mapping PSS / cache size", data["cache_pss_sum_over_cache_bytes"])
            row("sum of cache-mapping RSS / cache size", data["cache_rss_sum_over_cache_bytes"])
        elif section == "overhead":
            lines.append(
                f"  {data['trials']} trials x {data['epochs_per_trial']} epochs x {data['k']} folds, "
                f"{data['backbone']} {data['image_size'][0]}x{data['image_size'][1]}, one at a time"
            )
            row("search wall time", data["search_wall_seconds"], " s")
            row("same trials, bare fit", data["bare_fit_seconds"], " s")
            row("overhead  [target <= 0.05]", data["overhead"])
            row("fixed: before 1st trial + after last", data["fixed_seconds"], " s")
            row("per trial: start between two fits", data["trial_start_seconds"], " s")
            row("per trial: inside fit (search - bare)", data["inside_trial_seconds"], " s")
            row("  per epoch", data["per_epoch_seconds"], " s")
            row("trial length for <= 5% overhead", data["trial_seconds_for_5_percent"], " s")
        elif section == "asha":
            row("epochs without ASHA", data["epochs_without"])
            row("epochs with ASHA", data["epochs_with"])
            row("share  [target <= 0.5]", data["epoch_share"])
            row("best mean CV F1 without ASHA", data["best_f1_without"])
            row("best mean CV F1 with ASHA", data["best_f1_with"])
            if not all(r["finished"] for r in data["repeats"]):
                lines.append("  NOTE: a search was interrupted; its figures cover only the trials it ran")
        elif section == "ceiling":
            _ceiling_rows(data, row, lines)
        elif section == "checkpoint":
            _checkpoint_rows(data, row, lines)
        elif section == "gpu":
            lines.append(f"  {data['device']}: {data['config']}")
            for name, value in data["images_per_second"].items():
                row(name, value, " img/s")
            for name, value in data["cached_input_wait_share"].items():
                row(f"{name}: share of epoch waiting for input", value)
            row("AMP+channels_last / fp32 (cached)", data["amp_speedup"])
            row("cached / compute only (AMP)", data["cached_vs_compute"])
            row("1 process, total", data["sharing"]["1"]["total_images_per_second"], " img/s")
            row(
                "2 processes sharing the GPU, total",
                data["sharing"]["2"]["total_images_per_second"],
                " img/s",
            )
    if results["targets"]:
        lines.append("targets:")
        for t in results["targets"]:
            lines.append(
                f"  {'MET   ' if t['met'] else 'MISSED'} {t['name']}: {_fmt(t['value'])} "
                f"(target {t['target']})"
            )
    return "\n".join(lines)


def _ceiling_rows(data: dict[str, Any], row, lines: list[str]) -> None:
    c = data["config"]
    lines.append(
        f"  null model {c['image_size'][0]}x{c['image_size'][1]}, batch {c['batch_size']}, per core "
        f"({c['per_core']}); {c['images_per_measurement']} images per measurement"
    )
    ips = data["images_per_second_per_core"]
    row("loader aug: CPU side (slice + albumentations)", ips["loader_cpu_side"], " img/s/core")
    row("loader aug: total (+ normalise, step, writes)", ips["loader_total"], " img/s/core")
    row("device aug: CPU side (slice only)", ips["device_cpu_side"], " img/s/core")
    row("device aug: total (+ DeviceAugment on the CPU)", ips["device_total"], " img/s/core")
    row("epoch writes (best checkpoint + resume state)", data["epoch_write_seconds"], " s")
    lines.append(
        f"  ratio = per core x {c['trial_cpus']:g} CPUs / published GPU rate per trial "
        f"({data['published']['scaling']}); target >= {data['target_ratio']:g}"
    )
    lines.append(f"  published: {data['published']['note']}")
    for backbone, r in data["ratios"].items():
        row(
            f"{backbone}: GPU {r['gpu_images_per_second_per_trial']:.0f} img/s/trial",
            f"loader {_fmt(r['loader_cpu_side'])}x (total {_fmt(r['loader_total'])}x), "
            f"device {_fmt(r['device_cpu_side'])}x (total {_fmt(r['device_total'])}x)",
        )


def _checkpoint_rows(data: dict[str, Any], row, lines: list[str]) -> None:
    c = data["config"]
    lines.append(
        f"  k={c['k']}, {c['measured']}; resume every {c['resume_every_epochs']} epochs; "
        f"{c['filesystem']} at {c['directory']}"
    )
    for backbone, entry in data["backbones"].items():
        best = entry["best_per_epoch_worst_case"]
        row(
            f"{backbone}: best checkpoints, worst case",
            f"{_mib(best['bytes'])} {best['seconds']:.2f} s/epoch",
        )
        for depth, figures in entry["depths"].items():
            trainable = figures["params_trainable"] / figures["params_total"]
            lines.append(f"  {backbone} freeze_depth {depth} ({trainable:.0%} of parameters trainable):")
            for name, per_epoch in figures["per_epoch"].items():
                label = (
                    "old: every epoch, whole model"
                    if name == "old"
                    else (f"new: every {name.rsplit('_', 1)[1]} epoch(s), trainable only")
                )
                row(
                    f"  resume state, {label}",
                    f"{_mib(per_epoch['bytes'])} {per_epoch['seconds']:.2f} s/epoch",
                )


def json_safe(value: Any) -> Any:
    """NaN/inf become null and paths strings, so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value
