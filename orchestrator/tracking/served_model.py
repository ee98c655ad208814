"""The ensemble's MLflow python model, and only what loading and serving it needs.

Why its own file: a registered model is loaded where foldtune's search may not be (a serving host, an
``mlflow models serve`` container). Loading it imports this module and ``orchestrator.ensemble.predictor``
(with ``trainers``), never Ray, Optuna or a search folder; ``ensemble_model`` logs it with foldtune's
model code (``code_paths``) and the pip requirements of exactly what these imports need.

Input: a DataFrame with a column ``image_path`` (str) and/or ``image_bytes`` (binary: an encoded JPEG or
PNG; base64 in a JSON request to the scoring server, which decodes it by the signature). A row with bytes
uses them, else its path. Output: one row per input row, ``class`` (int, -1 when the image could not be
read), ``mask``, ``gender``, ``age`` (names), ``prob_00``..``prob_17`` and ``error``.
"""

from __future__ import annotations

import base64

import mlflow.pyfunc
import pandas as pd

from orchestrator.errors import OrchestratorError

ARTIFACT_KEY = "ensemble"  # the bundle folder among the model's artifacts
DEFAULT_MODEL_CONFIG = {"device": "auto", "batch_size": 64}


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
        self.predictor = EnsemblePredictor.from_folder(
            context.artifacts[ARTIFACT_KEY], device=config["device"]
        )

    def predict(self, context, model_input: pd.DataFrame, params=None):  # no schema from the hint
        images = images_from_frame(model_input)
        return self.predictor.predict(images, batch_size=self.batch_size).frame()
