"""``foldtune explain``: attention maps of one trial's fold models on chosen training images, as PNG grids.

Which images: the trial's most confident out-of-fold errors (what to worry about) and a seeded sample
spread over the classes (what normal looks like). Each image is explained by the fold model that never
trained on it (its OOF fold), fed exactly as in training and prediction: decoded, cropped and resized like
the image cache (``trainers.cache.decode_image`` with the checkpoint's size and crop), normalised with the
checkpoint's mean and std. One fold model is on the device at a time.

Which trial: ``--trial``, else the ensemble's first member, else the best trial by OOF macro F1 (the same
choice ``label-issues`` makes). The grids are computed before anything is written, each written
atomically; MLflow gets a copy under ``explain/`` of the search's parent run (a failure only warns).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.errors import OrchestratorError
from orchestrator.inspect.explain import attention_maps, overlay, pick_images
from orchestrator.inspect.oof import check_data_root, load_search_oof
from trainers.io import save_figure_atomic, write_csv_atomic
from trainers.labels import AgeBands, class_names

ARTIFACT_PATH = "explain"
IMAGES_PER_ROW = 4
GROUPS = (("errors", "most confident out-of-fold errors"), ("classes", "a sample per class"))


@dataclass
class Explained:
    """The images explained, their maps and what the fold model said about them."""

    rows: np.ndarray  # OOF row indices
    group: list[str]
    images: list[np.ndarray] = field(default_factory=list)  # uint8 HWC, as the model saw them
    maps: list[np.ndarray] = field(default_factory=list)  # (H, W) in [0, 1]
    predicted: list[int] = field(default_factory=list)
    confidence: list[float] = field(default_factory=list)


@dataclass
class ExplainResult:
    out: Path
    trial_id: str
    table: pd.DataFrame  # one row per explained image
    files: list[Path] = field(default_factory=list)
    mlflow_run_id: str | None = None


def _image_paths(data_root: Path, rel_paths: list[str]) -> list[Path]:
    root = data_root.resolve()
    paths = [root / rel for rel in rel_paths]
    missing = [rel for rel, path in zip(rel_paths, paths, strict=True) if not path.is_file()]
    if missing:
        raise OrchestratorError(
            f"{len(missing)} training images of the search are not in --data {data_root} (e.g. "
            f"{missing[0]}): the search was run on another data root; pass that one"
        )
    return paths


def explain_rows(candidate, rows: np.ndarray, paths: list[Path], device, log) -> Explained:
    """Each row explained by its OOF fold's model, fold by fold (one model on the device at a time)."""
    from trainers.cache import decode_image
    from trainers.checkpoint import load_checkpoint

    explained = Explained(rows=rows, group=[])
    results: dict[int, tuple] = {}
    for fold in sorted(set(candidate.fold[rows].tolist())):
        at = [i for i, row in enumerate(rows.tolist()) if candidate.fold[row] == fold]
        loaded = load_checkpoint(candidate.checkpoints[fold], device)
        images = np.stack([decode_image(str(paths[i]), loaded.image_size, loaded.crop) for i in at])
        maps, predicted, confidence = attention_maps(
            loaded.model, loaded.head, images, loaded.mean, loaded.std, device
        )
        for j, i in enumerate(at):
            results[i] = (images[j], maps[j], int(predicted[j]), float(confidence[j]))
        log(f"fold {fold}: {len(at)} image(s) explained")
        del loaded
    for i in range(len(rows)):
        image, cam, predicted, confidence = results[i]
        explained.images.append(image)
        explained.maps.append(cam)
        explained.predicted.append(predicted)
        explained.confidence.append(confidence)
    return explained


def grid_figure(explained: Explained, at: list[int], labels: np.ndarray, names: list[str], title: str):
    """Image and overlay side by side, ``IMAGES_PER_ROW`` images a row, titled given / predicted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n_rows = -(-len(at) // IMAGES_PER_ROW)
    figure, axes = plt.subplots(
        n_rows, 2 * IMAGES_PER_ROW, figsize=(2 * IMAGES_PER_ROW * 1.5, n_rows * 2.3), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for k, i in enumerate(at):
        row, column = divmod(k, IMAGES_PER_ROW)
        image_axis, map_axis = axes[row, 2 * column], axes[row, 2 * column + 1]
        image_axis.imshow(explained.images[i])
        map_axis.imshow(overlay(explained.images[i], explained.maps[i]))
        given = names[int(labels[explained.rows[i]])]
        predicted = names[explained.predicted[i]]
        image_axis.set_title(f"given {given}", fontsize=6)
        map_axis.set_title(f"pred {predicted} {explained.confidence[i]:.2f}", fontsize=6)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def run_explain(
    data_root: Path,
    search: str,
    storage: Path | None = None,
    trial: str | None = None,
    n: int = 16,
    out: Path | None = None,
    device: str = "auto",
    tracking_uri: str | None = None,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> ExplainResult:
    """Explain ``n`` confident errors and ``n`` class samples of one trial with its fold models."""
    import matplotlib.pyplot as plt

    from trainers.device import pick_device

    log = log or (lambda message: None)
    if n < 1:
        raise OrchestratorError(f"--n must be at least 1, got {n}")
    data_root = check_data_root(Path(data_root))
    torch_device = pick_device(device)
    oof = load_search_oof(search, storage, trial)
    candidate = oof.members[0]
    if not all(path.is_file() for path in candidate.checkpoints):
        raise OrchestratorError(
            f"trial {candidate.trial_id} has no fold checkpoints left (pruned); pick a kept one with --trial"
        )
    out = Path(out) if out else oof.search_dir / "explain"
    names = class_names(AgeBands(tuple(candidate.config.get("age_edges") or (30, 60))))
    errors, samples = pick_images(candidate.label, candidate.probs_tta, n, seed)
    rows = np.concatenate([errors, samples]).astype(np.int64)
    paths = _image_paths(data_root, candidate.rel_path[rows].tolist())
    log(f"explaining {len(rows)} image(s) with trial {candidate.trial_id}'s fold models on {torch_device}")
    explained = explain_rows(candidate, rows, paths, torch_device, log)
    explained.group = ["errors"] * len(errors) + ["classes"] * len(samples)

    figures = {}
    for group, title in GROUPS:
        at = [i for i, g in enumerate(explained.group) if g == group]
        if at:
            heading = f"trial {candidate.trial_id}: {title} (each by the fold model that never saw it)"
            figures[group] = grid_figure(explained, at, candidate.label, names, heading)
    table = pd.DataFrame(
        {
            "group": explained.group,
            "image": candidate.rel_path[rows],
            "fold": candidate.fold[rows],
            "given": [names[int(c)] for c in candidate.label[rows]],
            "predicted": [names[c] for c in explained.predicted],
            "confidence": explained.confidence,
            "oof_prob_given": candidate.probs_tta[rows, candidate.label[rows]],
        }
    )
    files = []
    try:
        for group, figure in figures.items():
            files.append(save_figure_atomic(figure, out / f"attention_{group}.png", dpi=120))
    finally:
        for figure in figures.values():
            plt.close(figure)
    files.append(write_csv_atomic(table, out / "explained.csv"))
    result = ExplainResult(out, candidate.trial_id, table, files)
    try:
        from orchestrator.tracking.inspect_run import log_to_search_run

        result.mlflow_run_id = log_to_search_run(
            oof.search_dir, oof.summary, search, tracking_uri, out, files, ARTIFACT_PATH
        )
    except Exception as error:  # tracking is a copy of the result, not the result
        log(f"warning: the maps are written but not logged to MLflow ({type(error).__name__}: {error})")
    log(f"attention maps: {', '.join(str(path) for path in files)}")
    return result
