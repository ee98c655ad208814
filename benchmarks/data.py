"""The data a bench run measures on: the data root, a seeded sample of persons, and timed cache builds."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.settings import DATA_ENV, BenchError
from trainers import cache as image_cache
from trainers.io import write_text_atomic


def resolve_data_root(arg: str | None, work_dir: Path, demo_persons: int, log=print) -> tuple[Path, str]:
    """The data root and where it came from: --data, else $FOLDTUNE_BENCH_DATA, else new demo data."""
    if arg:
        root = Path(arg).expanduser()
        if not (root / "train" / "train.csv").is_file():
            raise BenchError(
                f"--data {root}: there is no train/train.csv; point it at a data root in the competition "
                "layout, or leave --data out to benchmark on generated demo data"
            )
        return root.absolute(), "--data"
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if (root / "train" / "train.csv").is_file():
            return root.absolute(), f"${DATA_ENV}"
        log(f"note: ${DATA_ENV}={env} has no train/train.csv; benchmarking on generated demo data instead")
    from orchestrator.demo.data import write_demo_data

    root = work_dir / "demo-data"
    log(f"generating demo data ({demo_persons} persons) in {root}")
    write_demo_data(root, persons=demo_persons)
    return root, "demo"


def read_table(root: Path) -> pd.DataFrame:
    """The validated image table (headers are not re-verified: the bench reads every image anyway)."""
    from trainers.data import read_train

    return read_train(root, check_images=False).table


def choose_persons(table: pd.DataFrame, persons: int | None, seed: int) -> list[str]:
    """A seeded sample of person folders (all of them when ``persons`` is None or not smaller)."""
    folders = sorted(table["person_dir"].unique())
    if persons is None or persons >= len(folders):
        return folders
    if persons < 2:
        raise BenchError(f"--persons must be at least 2, got {persons}")
    picked = np.random.default_rng(seed).choice(len(folders), size=persons, replace=False)
    return sorted(folders[i] for i in picked)


def subset_data_root(root: Path, person_dirs: Sequence[str], dest: Path) -> Path:
    """A data root with only ``person_dirs`` (hard links, else copies), for the searches, which read a root.

    Links, not symlinks: trainers.data refuses images that resolve outside train/images.
    """
    train_csv = pd.read_csv(root / "train" / "train.csv", dtype=str, keep_default_na=False)
    keep = set(person_dirs)
    subset = train_csv[train_csv["path"].str.strip().str.strip("/").isin(keep)]
    images = dest / "train" / "images"
    images.mkdir(parents=True, exist_ok=True)
    for folder in sorted(keep):
        (images / folder).mkdir(exist_ok=True)
        for image in (root / "train" / "images" / folder).iterdir():
            target = images / folder / image.name
            if target.exists() or image.name.startswith("."):
                continue
            try:
                os.link(image, target)
            except OSError:
                shutil.copy2(image, target)
    write_text_atomic(subset.to_csv(index=False), dest / "train" / "train.csv")
    return dest


def build_cache_timed(paths: Sequence[str], size: tuple[int, int], cache_dir: Path) -> tuple[Path, float]:
    """Build a fresh cache in ``cache_dir`` (which must not hold one) and time it."""
    started = time.perf_counter()
    path = image_cache.build_cache(list(paths), size, cache_dir)
    return path, time.perf_counter() - started
