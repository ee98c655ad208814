"""Shared fixtures: a tiny data set in the competition layout, written as real image files.

``make_dataset(...)`` writes one under ``tmp_path`` and returns a :class:`TinyDataset` whose helpers let a
test break it on purpose (delete an image, rewrite train.csv, add a stray file). ``build_dataset(root,
...)`` does the same at any root, for module- or session-scoped fixtures (use ``tmp_path_factory``).

Default persons cycle through all six gender x age band strata (person i: gender i % 2, age band
(i // 2) % 3), so six persons already give all 18 classes. Pictures are 32x24 (h x w) and carry a faint,
learnable trace of their class (mask region, hair colour, brightness) under per-image noise.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
MASK_OF_STEM = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDER_WORDS = ("male", "female")
TRAIN_HEADER = ("id", "gender", "race", "age", "path")

Extensions = str | Sequence[str] | Callable[[int, str], str]


def default_age(index: int) -> int:
    """An age in band (index // 2) % 3 of the default edges (30, 60), varied within the band."""
    band = (index // 2) % 3
    return (18 + (index * 7) % 12, 30 + (index * 11) % 30, 60 + (index * 5) % 25)[band]


@dataclass
class TinyDataset:
    """A written data root and what is in it; helpers rewrite parts of it for tests that break it."""

    root: Path
    persons: list[dict[str, str]]  # the train.csv rows, as written
    eval_ids: list[str]
    size: tuple[int, int]
    files: dict[tuple[str, str], Path] = field(default_factory=dict)  # (person id, stem) -> image

    @property
    def train_csv(self) -> Path:
        return self.root / "train" / "train.csv"

    @property
    def info_csv(self) -> Path:
        return self.root / "eval" / "info.csv"

    @property
    def images_dir(self) -> Path:
        return self.root / "train" / "images"

    def person_dir(self, person_id: str) -> Path:
        row = next(r for r in self.persons if r["id"] == person_id)
        return self.images_dir / row["path"]

    def image(self, person_id: str, stem: str) -> Path:
        return self.files[(person_id, stem)]

    def write_train_csv(self, rows: list[dict[str, str]] | None = None, header: Sequence[str] = TRAIN_HEADER):
        """Rewrite train.csv (default: the current rows); columns missing from a row are left empty."""
        rows = self.persons if rows is None else rows
        with open(self.train_csv, "w", newline="") as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header)
            writer.writerows([[row.get(column, "") for column in header] for row in rows])

    def write_info_csv(
        self, image_ids: Sequence[str] | None = None, header: Sequence[str] = ("ImageID", "ans")
    ):
        image_ids = self.eval_ids if image_ids is None else image_ids
        with open(self.info_csv, "w", newline="") as out:
            writer = csv.writer(out, lineterminator="\n")
            writer.writerow(header)
            writer.writerows([[image_id, "0"][: len(header)] for image_id in image_ids])


def _extension(extensions: Extensions, person_index: int, stem_index: int) -> str:
    if callable(extensions):
        return extensions(person_index, STEMS[stem_index])
    if isinstance(extensions, str):
        return extensions
    return extensions[(person_index * len(STEMS) + stem_index) % len(extensions)]


def _picture(rng: np.random.Generator, size: tuple[int, int], mask: int, gender: int, age: int) -> np.ndarray:
    """A small face-ish picture whose class leaves a visible trace (so tiny training runs can learn)."""
    height, width = size
    image = rng.normal(120 + min(age, 90) // 2, 12, size=(height, width, 3))
    image[: height // 4] = (40, 30, 20) if gender == 0 else (150, 90, 60)  # hair
    lower = slice(height // 2 if mask == 0 else 2 * height // 3, height)
    if mask < 2:
        image[lower, width // 6 : width - width // 6] = (235, 235, 240)  # mask, lower when worn wrong
    return np.clip(image, 0, 255).astype(np.uint8)


def build_dataset(
    root: Path,
    n_persons: int = 6,
    extensions: Extensions = ".jpg",
    n_eval: int = 4,
    size: tuple[int, int] = (32, 24),
    genders: Sequence[str] | None = None,
    ages: Sequence[int] | None = None,
    seed: int = 0,
) -> TinyDataset:
    """Write a competition-layout data set under ``root``.

    ``extensions``: one extension for all images, a sequence cycled over the images (so a person can mix
    them), or ``f(person_index, stem) -> extension``. ``genders``/``ages`` override the default cycle.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "train" / "images").mkdir(parents=True, exist_ok=True)
    (root / "eval" / "images").mkdir(parents=True, exist_ok=True)
    persons, files = [], {}
    for index in range(n_persons):
        gender = genders[index] if genders is not None else GENDER_WORDS[index % 2]
        age = ages[index] if ages is not None else default_age(index)
        person_id = f"{index + 1:06d}"
        folder = f"{person_id}_{gender}_Asian_{age}"
        persons.append({"id": person_id, "gender": gender, "race": "Asian", "age": str(age), "path": folder})
        (root / "train" / "images" / folder).mkdir(exist_ok=True)
        for stem_index, stem in enumerate(STEMS):
            path = root / "train" / "images" / folder / f"{stem}{_extension(extensions, index, stem_index)}"
            pixels = _picture(rng, size, MASK_OF_STEM[stem], GENDER_WORDS.index(gender), age)
            Image.fromarray(pixels).save(path)
            files[(person_id, stem)] = path
    eval_ids = []
    for index in range(n_eval):
        image_id = hashlib.sha1(f"eval{seed}-{index}".encode()).hexdigest() + ".jpg"
        Image.fromarray(_picture(rng, size, index % 3, index % 2, 20 + 10 * index)).save(
            root / "eval" / "images" / image_id
        )
        eval_ids.append(image_id)
    dataset = TinyDataset(root, persons, eval_ids, size, files)
    dataset.write_train_csv()
    dataset.write_info_csv()
    return dataset


@pytest.fixture(scope="session")
def dataset_builder() -> Callable[..., TinyDataset]:
    """``build_dataset`` for fixtures with a wider scope than ``tmp_path`` (pair with tmp_path_factory)."""
    return build_dataset


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., TinyDataset]:
    """Factory: ``make_dataset(n_persons=..., extensions=..., ...)`` -> a fresh TinyDataset in tmp_path."""
    counter = iter(range(1_000_000))

    def make(**options) -> TinyDataset:
        return build_dataset(tmp_path / f"data{next(counter)}", **options)

    return make


@pytest.fixture
def tiny_dataset(make_dataset) -> TinyDataset:
    """Six persons (every stratum once), .jpg images, four eval images."""
    return make_dataset()


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An initialised MLflow SQLite store, created once (its schema migrations take many seconds)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(tmp_path: Path, store_template: Path) -> str:
    """A fresh copy of the initialised store for one test."""
    import shutil

    target = tmp_path / "mlruns" / "mlflow.db"
    target.parent.mkdir()
    shutil.copy(store_template, target)
    return f"sqlite:///{target}"


@pytest.fixture(scope="session")
def count_decodes():
    """A context manager counting the images ``trainers.cache`` decodes while it is active (thread-safe:
    the cache decodes in a thread pool): ``with count_decodes() as counted: ...; counted["images"]``."""
    import contextlib
    import threading
    from unittest import mock

    from trainers import cache

    @contextlib.contextmanager
    def counting():
        counted, lock, original = {"images": 0}, threading.Lock(), cache.decode_image

        def decode(*args, **kwargs):
            with lock:
                counted["images"] += 1
            return original(*args, **kwargs)

        with mock.patch.object(cache, "decode_image", decode):
            yield counted

    return counting


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    """12 synthetic persons (84 images) of the built-in demo data, small pictures (search tests)."""
    from orchestrator.demo.data import write_demo_data

    root = tmp_path_factory.mktemp("demo") / "data"
    write_demo_data(root, persons=12, eval_persons=1, image_size=(24, 32))
    return root


@pytest.fixture
def local_ray():
    """A local Ray of two CPUs for one test, shut down after it."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def write_fake_nvidia_smi(
    folder: Path, driver: str = "550.54.15", gpus: int = 8, name: str = "NVIDIA A100-SXM4-80GB"
) -> Path:
    """An ``nvidia-smi`` that answers foldtune's query as a node with ``gpus`` GPUs on ``driver`` would."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    rows = "\n".join(f"{name}, {driver}, 81920" for _ in range(gpus))
    script.write_text(f"#!/bin/sh\ncat <<'ROWS'\n{rows}\nROWS\n")
    script.chmod(0o755)
    return folder


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch) -> Callable[..., Path]:
    """Put a fake ``nvidia-smi`` first on PATH (also for a Ray started after it):
    ``fake_nvidia_smi(driver=..., gpus=...)``. The machine's torch (a CUDA 13 build without a GPU here) is
    left as it is."""

    def install(driver: str = "550.54.15", gpus: int = 8) -> Path:
        folder = write_fake_nvidia_smi(tmp_path / "fake-bin", driver, gpus)
        monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
        return folder

    return install


@pytest.fixture
def cuda13_torch(monkeypatch):
    """This process's torch reports itself as 2.14.1, a CUDA 13.0 build (what PyPI serves and this project's
    .venv has), whatever build the tests run on: the first-GPU-run trap is that build on an older driver."""
    import torch

    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
