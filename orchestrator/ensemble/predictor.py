"""Predicting new images with a finished ensemble: its bundle folder in, class probabilities out.

``EnsemblePredictor.from_folder(path)`` loads every fold model the bundle lists (see ``bundle``), once;
``predict(images)`` scores image files or encoded image bytes exactly as the submission was scored:

- each image is decoded by ``trainers.cache.decode_image`` at the member's image size and crop (what the
  image cache holds when the ensemble predicts eval/images);
- each fold model predicts with ``trainers.predict.predict_proba`` with the member's TTA views (averaged in
  probability space), AMP and channels-last settings; a member is the mean of its fold models;
- members are soft-voted with their weights in float64, as ``selection.soft_vote`` does.

So the probabilities equal the submission's (``submission.npz``) up to float rounding. An image that
cannot be read (missing, truncated, not an image) gets an error and no prediction; the others are
predicted as usual. Images stream in batches, so memory does not grow with the number of images.

No MLflow here: the MLflow model (``orchestrator.tracking.ensemble_model``) and ``foldtune predict`` both
wrap this class. torch is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.ensemble.arguments import check_tta
from orchestrator.ensemble.bundle import BUNDLE_DIR, SPEC_NAME, read_spec, recover_bundle
from orchestrator.errors import OrchestratorError
from trainers.labels import GENDER_NAMES, MASK_NAMES, NUM_CLASSES, AgeBands, decode

PROB_COLUMNS = tuple(f"prob_{i:02d}" for i in range(NUM_CLASSES))
OUTPUT_COLUMNS = ("class", "mask", "gender", "age", *PROB_COLUMNS, "error")
# a file path, the encoded file's bytes, or why the caller refused the row (reported in its error column)
ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Exception


def _decode(image: ImageInput, size: tuple[int, int], crop: tuple[float, ...] | None) -> np.ndarray:
    from trainers.cache import decode_image

    if isinstance(image, Exception):
        raise image
    if isinstance(image, bytes | bytearray | memoryview):
        return decode_image(io.BytesIO(bytes(image)), size, crop)
    if not os.fspath(image):
        raise ValueError("no image given (an empty path and no bytes)")
    return decode_image(os.fspath(image), size, crop)


def _describe_error(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]


@dataclass
class _Member:
    """One member, loaded: its fold models and how the submission fed them."""

    trial_id: str
    weight: float
    tta: tuple[str, ...]
    size: tuple[int, int]
    crop: tuple[float, ...] | None
    amp: bool
    channels_last: bool
    models: list  # trainers.checkpoint.LoadedModel, one per fold used


@dataclass
class Prediction:
    """Probabilities (N, 18) float64 (NaN rows where the image failed) and one error text per image."""

    probs: np.ndarray
    errors: list[str]
    age_names: tuple[str, str, str]

    @property
    def failed(self) -> int:
        return sum(bool(e) for e in self.errors)

    def frame(self) -> pd.DataFrame:
        """One row per image: ``class`` (-1 when it failed), ``mask``, ``gender``, ``age`` (names, '' when
        it failed), ``prob_00``..``prob_17`` (NaN when it failed) and ``error`` ('' when it did not)."""
        ok = np.array([not e for e in self.errors], dtype=bool)
        classes = np.where(ok, np.nan_to_num(self.probs, nan=-1.0).argmax(axis=1), -1).astype(np.int64)
        mask, gender, age = decode(np.where(ok, classes, 0))
        columns: dict[str, object] = {
            "class": classes,
            "mask": np.where(ok, np.asarray(MASK_NAMES, dtype=object)[mask], ""),
            "gender": np.where(ok, np.asarray(GENDER_NAMES, dtype=object)[gender], ""),
            "age": np.where(ok, np.asarray(self.age_names, dtype=object)[age], ""),
        }
        columns.update({name: self.probs[:, i] for i, name in enumerate(PROB_COLUMNS)})
        columns["error"] = np.asarray(self.errors, dtype=object)
        return pd.DataFrame(columns)


class EnsemblePredictor:
    """The bundle's fold models, loaded once on ``device``; ``predict`` scores images in batches."""

    def __init__(self, folder: Path, spec: dict, members: list[_Member], device) -> None:
        self.folder = Path(folder)
        self.spec = spec
        self.members = members
        self.device = device
        self.age_names = AgeBands(tuple(spec.get("age_edges") or (30, 60))).names

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, device: str = "auto") -> EnsemblePredictor:
        """Load a bundle folder (``ensemble_spec.json`` + checkpoints); every fold model is checked against
        the spec (a CheckpointError names a file that does not match)."""
        import torch

        from trainers.checkpoint import CheckpointError, load_checkpoint
        from trainers.device import pick_device

        folder = Path(folder)
        spec = read_spec(folder)
        torch_device = pick_device(device)
        members = []
        for entry in spec["members"]:
            size = tuple(int(s) for s in entry["image_size"])
            crop = tuple(float(c) for c in entry["crop"]) if entry.get("crop") else None
            channels_last = bool(entry.get("channels_last", True)) and torch_device.type == "cuda"
            models = []
            for relative in entry["checkpoints"]:
                loaded = load_checkpoint(folder / relative, device=torch_device)
                if tuple(loaded.image_size) != size or loaded.crop != crop or loaded.head != entry["head"]:
                    raise CheckpointError(
                        f"{folder / relative} has image_size {loaded.image_size}, crop {loaded.crop}, head "
                        f"{loaded.head!r} but {SPEC_NAME} says {size}, {crop}, {entry['head']!r}; run "
                        "`foldtune ensemble` again"
                    )
                if channels_last:
                    loaded.model.to(memory_format=torch.channels_last)
                models.append(loaded)
            members.append(
                _Member(
                    trial_id=str(entry["trial_id"]),
                    weight=float(entry["weight"]),
                    tta=check_tta(tuple(entry.get("tta") or ())),
                    size=size,
                    crop=crop,
                    amp=bool(entry.get("amp", True)),
                    channels_last=channels_last,
                    models=models,
                )
            )
        return cls(folder, spec, members, torch_device)

    @property
    def fold_models(self) -> int:
        return sum(len(m.models) for m in self.members)

    def describe(self) -> str:
        parts = [
            f"{m.trial_id} (weight {m.weight:.3f}, {len(m.models)} fold model(s), TTA "
            f"{','.join(m.tta) or 'none'})"
            for m in self.members
        ]
        return f"ensemble of {len(self.members)} member(s) on {self.device.type}: " + "; ".join(parts)

    def predict(
        self,
        images: Sequence[ImageInput],
        batch_size: int = 64,
        tta: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        workers: int | None = None,
    ) -> Prediction:
        """Probabilities for ``images`` (paths or encoded bytes), ``batch_size`` images at a time.

        ``tta`` None keeps each member's own views (the submission's); a sequence (possibly empty) applies
        those views to every member. ``progress(done, total)`` is called after each batch.
        """
        if batch_size < 1:
            raise OrchestratorError(f"--batch-size must be at least 1, got {batch_size}")
        views = None if tta is None else check_tta(tuple(tta))
        total = len(images)
        probs = np.full((total, NUM_CLASSES), np.nan, dtype=np.float64)
        errors = [""] * total
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, total, batch_size):
                batch = list(images[start : start + batch_size])
                ok, arrays, batch_errors = self._decode_batch(batch, pool)
                for row, error in batch_errors.items():
                    errors[start + row] = error
                if ok:
                    probs[[start + row for row in ok]] = self._vote(arrays, views, len(ok))
                if progress is not None:
                    progress(min(start + batch_size, total), total)
        return Prediction(probs=probs, errors=errors, age_names=self.age_names)

    def _decode_batch(self, batch: list, pool: ThreadPoolExecutor):
        """The rows that decoded at every member's size, their arrays per (size, crop), and the errors."""
        shapes = list(dict.fromkeys((m.size, m.crop) for m in self.members))

        def decode_all(image) -> tuple[list[np.ndarray] | None, str]:
            try:
                return [_decode(image, size, crop) for size, crop in shapes], ""
            except Exception as error:  # PIL raises many kinds for missing, truncated or foreign files
                return None, _describe_error(error)

        decoded = list(pool.map(decode_all, batch))
        ok = [row for row, (arrays, _) in enumerate(decoded) if arrays is not None]
        errors = {row: error for row, (_, error) in enumerate(decoded) if error}
        arrays = {
            shape: np.stack([decoded[row][0][i] for row in ok]) if ok else None
            for i, shape in enumerate(shapes)
        }
        return ok, arrays, errors

    def _vote(self, arrays: dict, views: tuple[str, ...] | None, count: int) -> np.ndarray:
        """The weighted sum of the members' probabilities (each the mean of its fold models), float64."""
        from trainers.predict import predict_proba

        total = np.zeros((count, NUM_CLASSES), dtype=np.float64)
        for member in self.members:
            images = arrays[(member.size, member.crop)]
            member_probs = np.zeros((count, NUM_CLASSES), dtype=np.float64)
            for loaded in member.models:
                member_probs += predict_proba(
                    loaded.model,
                    loaded.head,
                    images,
                    None,
                    mean=loaded.mean,
                    std=loaded.std,
                    device=self.device,
                    batch_size=max(count, 1),
                    tta=member.tta if views is None else views,
                    amp=member.amp,
                    channels_last=member.channels_last,
                )
            total += member.weight * (member_probs / len(member.models))
        return total


# ----------------------------------------------------------------------------------------------------------
# `foldtune predict`: which model, which images, the output file


def resolve_bundle(model: str, storage: Path) -> Path:
    """The bundle folder for ``--model``: a bundle folder (or a folder holding ``ensemble_model/``), else a
    search name under ``storage``. Registered models (``models:/``) are resolved by the caller."""
    as_path = Path(model).expanduser()
    for folder in (as_path, as_path / BUNDLE_DIR):
        if (folder / SPEC_NAME).is_file():
            return folder
    looks_like_path = os.sep in model or model.startswith(".") or as_path.is_dir()
    search_dir = Path(storage) / model
    if not search_dir.is_dir():
        if looks_like_path:
            raise OrchestratorError(
                f"--model {model}: no ensemble model there (no {SPEC_NAME} in it or in its {BUNDLE_DIR}/); "
                "give a bundle folder, a search name or models:/NAME/VERSION"
            )
        raise OrchestratorError(
            f"--model {model}: unknown search (no folder {search_dir}); give a search name under --storage "
            f"{storage}, a bundle folder or models:/NAME/VERSION"
        )
    bundle = search_dir / BUNDLE_DIR
    recover_bundle(bundle)  # a previous bundle a killed `foldtune ensemble` left aside
    if not (bundle / SPEC_NAME).is_file():
        raise OrchestratorError(
            f"search {model} has no ensemble model ({bundle} is missing); run `foldtune ensemble --search "
            f"{model}` first"
        )
    return bundle


@dataclass
class ImageList:
    """The images to predict: the name written in the output and the file read."""

    names: list[str]
    paths: list[str]


def list_images(source: str | os.PathLike) -> ImageList:
    """``--images``: a folder (its .jpg/.jpeg/.png files, sorted; hidden files skipped) or a CSV with a
    column ``image_path`` (relative paths are relative to the CSV's folder) or ``ImageID`` (relative to
    the CSV's folder, or to its ``images/`` folder as in the competition's eval/info.csv)."""
    from trainers.labels import IMAGE_EXTENSIONS

    source = Path(source)
    if source.is_dir():
        names = sorted(
            p.name
            for p in source.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not names:
            raise OrchestratorError(
                f"--images {source}: no .jpg/.jpeg/.png files in this folder; give a folder of images or a "
                "CSV with an image_path column"
            )
        return ImageList(names, [str(source / n) for n in names])
    if not source.is_file():
        raise OrchestratorError(f"--images {source}: no such folder or CSV file")
    try:
        frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as error:
        raise OrchestratorError(f"--images {source} is not a readable CSV ({error})") from None
    base = source.parent
    if "image_path" in frame.columns:
        names = frame["image_path"].tolist()
        paths = [str(p if Path(p).is_absolute() else base / p) for p in names]
    elif "ImageID" in frame.columns:
        names = frame["ImageID"].tolist()
        paths = [str(_beside(base, n)) for n in names]
    else:
        raise OrchestratorError(
            f"--images {source}: the CSV has no image_path or ImageID column (columns: "
            f"{', '.join(map(str, frame.columns)) or 'none'})"
        )
    if not names:
        raise OrchestratorError(f"--images {source}: the CSV lists no images")
    return ImageList(names, paths)


def _beside(base: Path, image_id: str) -> Path:
    """An ImageID's file: in the CSV's folder, else in its images/ folder (eval/info.csv's layout)."""
    direct = base / image_id
    in_images = base / "images" / image_id
    return in_images if not direct.is_file() and in_images.is_file() else direct


def predictions_frame(names: Sequence[str], prediction: Prediction) -> pd.DataFrame:
    """The output table: ``image`` then ``Prediction.frame``'s columns, with failed rows left empty."""
    frame = prediction.frame()
    failed = frame["error"] != ""
    frame["class"] = frame["class"].astype("Int64").mask(failed)
    frame.insert(0, "image", list(names))
    return frame
