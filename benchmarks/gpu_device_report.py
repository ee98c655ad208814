"""What ``python -m benchmarks.gpu_device`` hands back: the per-backbone summary (ratios between its
configurations, and against timm's published rates), ``gpu_device.json`` and the ``gpu_device.md`` tables.

Imports nothing of ``orchestrator`` (see ``benchmarks.gpu_device``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.reference import PUBLISHED_TRAIN_RATES, published_note
from trainers.io import write_text_atomic

COMPUTE, FP32, NCHW = "compute/amp/channels_last", "compute/fp32/nchw", "compute/amp/nchw"
LOADER_AUG, DEVICE_AUG = "loader+loader-aug/amp/channels_last", "loader+device-aug/amp/channels_last"
NO_BENCHMARK, COMPILED = f"{COMPUTE}/no-cudnn-benchmark", f"{COMPUTE}/compile"


def _rate(results: dict[str, Any], backbone: str, config: str) -> float | None:
    for record in results["configs"]:
        if record["backbone"] == backbone and record["config"] == config:
            return record.get("images_per_second")
    return None


def _ratio(top: float | None, bottom: float | None) -> float | None:
    return top / bottom if top is not None and bottom else None


def packed_figures(results: dict[str, Any], backbone: str) -> dict[str, Any]:
    """Each packed process's images/s, their total, and the total against one process alone."""
    entry = results.get("packed", {}).get("backbones", {}).get(backbone, {})
    rates = [p.get("images_per_second") for p in entry.get("processes", [])]
    total = sum(rates) if len(rates) == 2 and None not in rates else None
    single = _rate(results, backbone, DEVICE_AUG)
    errors = [p["error"] for p in entry.get("processes", []) if "error" in p]
    return {
        "rates": rates,
        "total": total,
        "single": single,
        "total_over_single": _ratio(total, single),
        "errors": errors,
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per backbone: AMP and channels_last speed-ups, loader / compute, packed / single, vs published."""
    plan = results["plan"]
    height, width = plan["image_size"]
    summary = {}
    for backbone in plan["backbones"]:
        compute = _rate(results, backbone, COMPUTE)
        published = PUBLISHED_TRAIN_RATES.get(backbone)
        scaled = published[0] * published[2] ** 2 / (height * width) if published else None
        summary[backbone] = {
            "compute_amp_channels_last": compute,
            "amp_channels_last_over_fp32": _ratio(compute, _rate(results, backbone, FP32)),
            "channels_last_over_nchw": _ratio(compute, _rate(results, backbone, NCHW)),
            "cudnn_benchmark_over_off": _ratio(compute, _rate(results, backbone, NO_BENCHMARK)),
            "compile_over_eager": _ratio(_rate(results, backbone, COMPILED), compute),
            "loader_aug_over_compute": _ratio(_rate(results, backbone, LOADER_AUG), compute),
            "device_aug_over_compute": _ratio(_rate(results, backbone, DEVICE_AUG), compute),
            "packed_total_over_single": packed_figures(results, backbone)["total_over_single"],
            "published_scaled": scaled,
            "compute_over_published": _ratio(compute, scaled),
        }
    return summary


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:,.{digits}f}"


def _x(value: Any) -> str:
    return "–" if value is None else f"{value:.2f}×"


def markdown(results: dict[str, Any]) -> str:
    """The tables: every configuration, the per-backbone summary, the packed processes."""
    host, plan = results["host"], results["plan"]
    height, width = plan["image_size"]
    lines = [
        "# foldtune GPU bench (`python -m benchmarks.gpu_device`)",
        "",
        f"Device: {host['device_name']} · torch {host['torch']} (CUDA {host['cuda']}) · "
        f"timm {host['timm']} · AMP dtype {host['amp_dtype']} · {height}×{width}, "
        f"batch {plan['batch_size']} · "
        f"{plan['num_workers']} loader workers · {plan['threads']} torch threads · per configuration "
        f"{plan['warmup_steps']} warm-up steps, then ≤ {plan['steps']} steps or ≤ {plan['max_config_s']:g} s"
        f" · started {results['started']}"
        + (f" · {results['seconds']:.0f} s in all" if "seconds" in results else " · (running)"),
        "",
        "## Configurations",
        "",
        "| backbone | input | augmentation | precision | memory format | images/s | ms/step "
        "| waiting for input | peak GPU memory | note |",
        "|---|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    order = [
        COMPUTE,
        NCHW,
        "compute/fp32/channels_last",
        FP32,
        NO_BENCHMARK,
        COMPILED,
        DEVICE_AUG,
        LOADER_AUG,
    ]
    rows = sorted(
        results["configs"],
        key=lambda r: (plan["backbones"].index(r["backbone"]), order.index(r["config"])),
    )
    for r in rows:
        feed = "in memory (compute only)" if r["input"] == "memory" else "FoldLoader"
        if not r.get("cudnn_benchmark", True):
            feed += ", cudnn_benchmark off"
        if r.get("compile"):
            feed += ", torch.compile"
        augment = {"none": "none", "loader": "loader (albumentations)", "device": "device (DeviceAugment)"}
        peak = r.get("peak_memory_bytes")
        note = r.get("error") or r.get("skipped") or ""
        wait = r.get("input_wait_share")
        lines.append(
            f"| {r['backbone']} | {feed} | {augment[r['augment_on']]} | {'AMP' if r['amp'] else 'fp32'} | "
            f"{'channels_last' if r['channels_last'] else 'NCHW'} | {_num(r.get('images_per_second'))} | "
            f"{_num(r.get('ms_per_step'), 1)} | {'–' if wait is None else f'{wait:.1%}'} | "
            f"{'–' if peak is None else f'{peak / 2**30:.1f} GiB'} | {note[:90]} |"
        )
    summary = results.get("summary") or summarize(results)
    lines += [
        "",
        "## Per backbone",
        "",
        "| backbone | compute, AMP + channels_last (img/s) | AMP+CL / fp32 | channels_last / NCHW (AMP) "
        "| cudnn_benchmark on / off | compile / eager | loader aug / compute | device aug / compute "
        "| 2 packed / 1 | published, scaled (img/s) | measured / published |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backbone, s in summary.items():
        lines.append(
            f"| {backbone} | {_num(s['compute_amp_channels_last'])} | "
            f"{_x(s['amp_channels_last_over_fp32'])} | {_x(s['channels_last_over_nchw'])} | "
            f"{_x(s['cudnn_benchmark_over_off'])} | {_x(s['compile_over_eager'])} | "
            f"{_x(s['loader_aug_over_compute'])} | "
            f"{_x(s['device_aug_over_compute'])} | {_x(s['packed_total_over_single'])} | "
            f"{_num(s['published_scaled'])} | {_x(s['compute_over_published'])} |"
        )
    lines += [
        "",
        f"Published: timm's training benchmark, {published_note()}, train samples/s at 224×224 scaled to "
        f"{height}×{width} by pixel count (a whole GPU; not this device).",
    ]
    packed = results.get("packed")
    if packed:
        lines += [
            "",
            f"## Two training processes on one device (memory fraction 0.5 each, loader + device "
            f"augmentation, AMP + channels_last, {plan['packed_s']:g} s window together)",
            "",
            "| backbone | process 1 (img/s) | process 2 (img/s) | total | one process alone | total / one "
            "| note |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        if "error" in packed and not packed.get("backbones"):
            lines.append(f"| – | – | – | – | – | – | {packed['error'][:90]} |")
        for backbone in packed.get("backbones", {}):
            p = packed_figures(results, backbone)
            rates = (p["rates"] + [None, None])[:2]
            note = "; ".join(p["errors"])[:90] or packed.get("error", "")[:90]
            lines.append(
                f"| {backbone} | {_num(rates[0])} | {_num(rates[1])} | {_num(p['total'])} | "
                f"{_num(p['single'])} | {_x(p['total_over_single'])} | {note} |"
            )
    return "\n".join(lines) + "\n"


def json_safe(value: Any) -> Any:
    """NaN/inf become null and tuples lists, so the file is strict JSON (``benchmarks.report.json_safe``
    without its imports: this module must import without trainers' augmentation dependencies)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def write_outputs(results: dict[str, Any], out_dir: Path) -> None:
    """``gpu_device.json`` (strict JSON) and ``gpu_device.md``, each written atomically."""
    results["summary"] = summarize(results)
    write_text_atomic(json.dumps(json_safe(results), indent=2) + "\n", Path(out_dir) / "gpu_device.json")
    write_text_atomic(markdown(results), Path(out_dir) / "gpu_device.md")
