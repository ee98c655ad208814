"""Where a run's inputs and code came from, in MLflow's own terms: datasets with digests, the code version.

MLflow users expect a run page to answer "which data, which split, which code": its Datasets panel lists
``mlflow.log_input`` records (name, digest, source), and the Source field reads the ``mlflow.source.*``
tags. Digests are computed by foldtune, cheaply and reproducibly: over train.csv and every image file's
path, size and mtime (or, with ``hash_images``, the image bytes themselves), so two searches on identical
data show the same digest and one changed image changes it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # what MLflow 3.x's UI reads to open on the runs table
EXPERIMENT_KIND = "custom_model_development"
DATA_CONTEXT_TAG = "mlflow.data.context"


@dataclass(frozen=True)
class DatasetRecord:
    """One input of a run: a name, a digest over its content, where it is, and a small profile."""

    name: str
    digest: str
    source: str
    context: str  # "training", "folds", "evaluation"
    profile: Mapping[str, int | str]


def _digest(parts: Iterable[str | bytes]) -> str:
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part if isinstance(part, bytes) else part.encode())
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def _file_fingerprints(paths: Iterable[str], hash_images: bool) -> Iterable[str | bytes]:
    for path in sorted(paths):
        stat = os.stat(path)
        yield f"{path}|{stat.st_size}|{stat.st_mtime_ns}" if not hash_images else Path(path).read_bytes()


def training_dataset(data_root: Path, image_paths: Iterable[str], hash_images: bool = False) -> DatasetRecord:
    """train.csv and the training images (paths made relative to the data root, so a copy of the same data
    in another folder has the same digest when ``hash_images`` is on)."""
    root = Path(data_root).absolute()
    paths = sorted(str(p) for p in image_paths)
    csv_path = root / "train" / "train.csv"
    rel = [os.path.relpath(p, root) for p in paths]
    parts = [csv_path.read_bytes(), *rel] if hash_images else [csv_path.read_bytes()]
    digest = _digest([*parts, *_file_fingerprints(paths, hash_images)])
    kind = "content" if hash_images else "paths, sizes, mtimes"
    return DatasetRecord(
        "train", digest, str(root / "train"), "training", {"images": len(paths), "digest_of": kind}
    )


def file_dataset(name: str, path: Path, context: str) -> DatasetRecord:
    """A single file (the fold file, a label-fix overlay, eval/info.csv) by its content."""
    content = Path(path).read_bytes()
    rows = max(0, content.count(b"\n") - 1)
    return DatasetRecord(name, _digest([content]), str(Path(path).absolute()), context, {"rows": rows})


def log_datasets(client, run_id: str, records: Iterable[DatasetRecord]) -> None:
    """Record ``records`` as the run's inputs (MLflow's Datasets panel)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [
        DatasetInput(
            Dataset(
                name=r.name,
                digest=r.digest,
                source_type="local",
                source=json.dumps({"uri": r.source}),
                profile=json.dumps(dict(r.profile)),
            ),
            tags=[InputTag(DATA_CONTEXT_TAG, r.context)],
        )
        for r in records
    ]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def search_inputs(
    data_root: Path, image_paths: Iterable[str], search_dir: Path, hash_images: bool = False
) -> list[DatasetRecord]:
    """What every run of a search trains on: the training table, the fold file, the label fixes (if any)."""
    records = [training_dataset(data_root, image_paths, hash_images)]
    records.append(file_dataset("folds", Path(search_dir) / "folds.csv", "folds"))
    if (Path(search_dir) / "relabel.csv").is_file():
        records.append(file_dataset("relabel", Path(search_dir) / "relabel.csv", "label_fixes"))
    return records


@functools.lru_cache(maxsize=4)
def code_version_tags(start: Path | None = None, source: str = "foldtune") -> dict[str, str]:
    """foldtune's version and the command that made the run (``mlflow.source.name``: the UI's Source column)
    always; the git commit (and whether the checkout had uncommitted changes) when foldtune runs from a git
    checkout."""
    tags = {
        "foldtune.version": _foldtune_version(),
        "mlflow.source.name": source,
        "mlflow.source.type": "LOCAL",
    }
    folder = Path(start or Path(__file__).resolve().parent)
    try:
        commit = _git(folder, "rev-parse", "HEAD")
        dirty = bool(_git(folder, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return tags
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["foldtune.git_dirty"] = str(dirty).lower()
    return tags


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def _foldtune_version() -> str:
    try:
        return importlib.metadata.version("foldtune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
