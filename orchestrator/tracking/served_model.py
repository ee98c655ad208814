"""The ensemble's MLflow python model, and only what loading and serving it needs.

Why its own file: a registered model is loaded where foldtune's search may not be (a serving host, an
``mlflow models serve`` container). Loading it imports this module and ``orchestrator.ensemble.predictor``
(with ``trainers``), never Ray, Optuna or a search folder; ``ensemble_model`` logs it with foldtune's
model code (``code_paths``) and the pip requirements of exactly what these imports need.

Input: a DataFrame with a column ``image_path`` (str) and/or ``image_bytes`` (binary: an encoded JPEG or
PNG; base64 in a JSON request to the scoring server, which decodes it by the signature). A row with bytes
uses them, else its path. Output: one row per input row, ``class`` (int, -1 when the image could not be
read), ``mask``, ``gender``, ``age`` (names), ``prob_00``..``prob_17`` and ``error``.

Served, the model is a door to its host, so what comes in is checked (``ImageGate``): bytes are the way in;
a path is read only under a folder the operator named (``model_config`` ``image_root``, or the environment
variable ``FOLDTUNE_IMAGE_ROOT`` for ``mlflow models serve``), after resolving links, and refused otherwise
with one line in its row; an upload larger than ``max_image_bytes`` or with more than ``max_image_pixels``
(read from its header, before any decoding: a decompression bomb is refused, not decoded) is refused too.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from orchestrator.errors import OrchestratorError

ARTIFACT_KEY = "ensemble"  # the bundle folder among the model's artifacts
IMAGE_ROOT_ENV = "FOLDTUNE_IMAGE_ROOT"
DEFAULT_MODEL_CONFIG = {
    "device": "auto",
    "batch_size": 64,
    "image_root": None,  # paths are read only under this folder (None: bytes only)
    "max_image_bytes": 20 * 2**20,
    "max_image_pixels": 40_000_000,  # the competition's photos have 0.2 million
}


class RefusedInput(ValueError):
    """A request row the served model does not read; the message goes into the row's error column."""


@dataclass(frozen=True)
class ImageGate:
    """What a served model reads: bytes within the size and pixel limits, paths only under ``root``."""

    root: Path | None
    max_bytes: int
    max_pixels: int

    @classmethod
    def from_config(cls, config: dict) -> ImageGate:
        root = config.get("image_root") or os.environ.get(IMAGE_ROOT_ENV) or None
        return cls(
            Path(root).resolve() if root else None,
            int(config["max_image_bytes"]),
            int(config["max_image_pixels"]),
        )

    def admit(self, image):
        """``image`` as the predictor takes it, or a ``RefusedInput`` saying why it is not read."""
        if isinstance(image, bytes | bytearray | memoryview):
            return self._admit_bytes(bytes(image))
        if not image:
            return image
        if self.root is None:
            return RefusedInput(
                f"image_path is not read by this served model (send image_bytes, or have the operator set "
                f"model_config image_root or {IMAGE_ROOT_ENV})"
            )
        resolved = Path(image).resolve()
        if not resolved.is_relative_to(self.root):
            return RefusedInput(f"image_path outside the served image root {self.root}")
        return str(resolved)

    def _admit_bytes(self, data: bytes):
        if len(data) > self.max_bytes:
            return RefusedInput(f"image of {len(data):,} bytes; the limit is {self.max_bytes:,}")
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only: nothing is decoded here
                width, height = image.size
        except Exception:  # not an image: the decoder names it in the row's error
            return data
        if width * height > self.max_pixels:
            return RefusedInput(f"image of {width}x{height} pixels; the limit is {self.max_pixels:,}")
        return data


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def images_from_frame(frame: pd.DataFrame) -> list:
    """Per row, the encoded bytes (``image_bytes``; a base64 string is decoded) or else the path."""
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if "image_path" not in frame.columns and "image_bytes" not in frame.columns:
        raise OrchestratorError(
            f"the input needs a column image_path (str) or image_bytes (encoded JPEG/PNG); got columns "
            f"{list(frame.columns)}"
        )
    paths = frame["image_path"].tolist() if "image_path" in frame.columns else [None] * len(frame)
    data = frame["image_bytes"].tolist() if "image_bytes" in frame.columns else [None] * len(frame)
    images = []
    for path, encoded in zip(paths, data, strict=True):
        if not _is_missing(encoded):
            images.append(base64.b64decode(encoded) if isinstance(encoded, str) else encoded)
        elif not _is_missing(path):
            images.append(str(path))
        else:
            images.append("")  # no image: reported in the row's error column
    return images


class EnsemblePyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc flavour of an ensemble; ``model_config`` may set ``device`` and ``batch_size``."""

    def load_context(self, context) -> None:
        from orchestrator.ensemble.predictor import EnsemblePredictor

        config = {**DEFAULT_MODEL_CONFIG, **(getattr(context, "model_config", None) or {})}
        self.batch_size = int(config["batch_size"])
        self.gate = ImageGate.from_config(config)
        self.predictor = EnsemblePredictor.from_folder(
            context.artifacts[ARTIFACT_KEY], device=config["device"]
        )

    def predict(self, context, model_input: pd.DataFrame, params=None):  # no schema from the hint
        images = [self.gate.admit(image) for image in images_from_frame(model_input)]
        return self.predictor.predict(images, batch_size=self.batch_size).frame()
