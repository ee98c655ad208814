"""The ensemble as an MLflow model: a pyfunc logged in the ensemble's run and registered under the search.

``log_ensemble_model`` logs the ensemble's bundle folder (``orchestrator.ensemble.bundle``: the members'
fold checkpoints and ``ensemble_spec.json``) with ``mlflow.pyfunc.log_model`` in the ensemble's run, with
``EnsemblePyfunc`` as its python model and a signature, and registers a new version of the model named
after the search. Then

    mlflow.pyfunc.load_model("models:/NAME/VERSION").predict(frame)
    mlflow models serve -m models:/NAME/VERSION --env-manager local

score new images exactly as the submission was scored (``orchestrator.ensemble.predictor``).

Input: a DataFrame with a column ``image_path`` (str) and/or ``image_bytes`` (binary: an encoded JPEG or
PNG; base64 in a JSON request to the scoring server, which decodes it by the signature). A row with
bytes uses them, else its path. Output: one row per input row, ``class`` (int, -1 when the image could
not be read), ``mask``, ``gender``, ``age`` (names), ``prob_00``..``prob_17`` and ``error`` ('' when the
image was read).

The model is self-contained: foldtune's own code travels with it (``code_paths``: the ``trainers`` and
``orchestrator`` packages), its python model is ``served_model.EnsemblePyfunc``, whose imports never reach
Ray, Optuna or a search folder, and its pip requirements pin exactly the libraries that code imports when
loading and predicting, so a serving environment needs nothing else (no foldtune install) and no
requirement inference runs. A small input example (one encoded picture) shows a request in the UI.
Exploratory ensembles (``--top 1``, ``--folds``, ``--tta``) are logged in their run but not registered; the
submission's ensemble gets a new version with the alias ``candidate``, which the user can move.

MLflow's fluent API (``log_model``, ``load_model``) reads the tracking and registry URIs from process
globals: they are set for the call only and restored afterwards (``_using_store``).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd

from orchestrator.ensemble.predictor import OUTPUT_COLUMNS, EnsemblePredictor
from orchestrator.errors import OrchestratorError
from orchestrator.tracking.served_model import (
    ARTIFACT_KEY,
    DEFAULT_MODEL_CONFIG,
    EnsemblePyfunc,
)
from orchestrator.tracking.store import TAG, resolve_tracking_uri

MODEL_NAME = "ensemble_model"  # the logged model's name in the run
# what the python model's code imports when it loads and predicts; pinned to the versions installed here
REQUIREMENTS = ("mlflow", "torch", "timm", "numpy", "pandas", "pillow", "albumentations", "pyyaml")
ALIAS = "candidate"  # the registered version the latest submission's ensemble is; move it to promote


def registered_model_name(search: str) -> str:
    """The Model Registry name for a search: its name, with characters outside [A-Za-z0-9_.-] as '-'."""
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", str(search)).strip("-.")
    return name or "foldtune-ensemble"


def signature():
    """image_path (str) and/or image_bytes (binary) in; class, mask, gender, age, prob_00..17, error out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    inputs = Schema(
        [
            ColSpec(DataType.string, "image_path", required=False),
            ColSpec(DataType.binary, "image_bytes", required=False),
        ]
    )
    types = {"class": DataType.long, "mask": DataType.string, "gender": DataType.string}
    types.update({"age": DataType.string, "error": DataType.string})
    outputs = Schema([ColSpec(types.get(name, DataType.double), name) for name in OUTPUT_COLUMNS])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _pip_requirements() -> list[str]:
    pinned = []
    for name in REQUIREMENTS:
        try:
            version = metadata.version(name).split("+")[0]  # torch's local tag (+cpu, +cu124) is not on PyPI
        except metadata.PackageNotFoundError:
            continue
        pinned.append(f"{name}=={version}")
    return pinned


def _model_code(folder: Path) -> Path:
    """The model's code (MLflow's "models from code", nothing pickled): this module's class, by import."""
    path = folder / "foldtune_ensemble_model.py"
    path.write_text(
        '"""A foldtune ensemble: orchestrator.tracking.served_model.EnsemblePyfunc (the model\'s code)."""\n'
        "import mlflow\n\n"
        "from orchestrator.tracking.served_model import EnsemblePyfunc\n\n"
        "mlflow.models.set_model(EnsemblePyfunc())\n"
    )
    return path


@contextlib.contextmanager
def _using_store(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``tracking_uri`` for the block, then restore
    the previous URIs and MLFLOW_TRACKING_URI as they were."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_tracking = getattr(tracking_utils, "_tracking_uri", None)
    old_registry = getattr(registry_utils, "_registry_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri = old_tracking
        registry_utils._registry_uri = old_registry
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


@dataclass
class RegisteredEnsemble:
    name: str
    version: str
    model_uri: str  # models:/NAME/VERSION
    logged_uri: str  # the logged model's own URI (models:/<model id>)


def code_paths() -> list[str]:
    """foldtune's own packages, copied into the model (what ``served_model`` imports lives there)."""
    import orchestrator
    import trainers

    return [str(Path(package.__file__).parent) for package in (trainers, orchestrator)]


def input_example() -> pd.DataFrame:
    """One request the UI shows: a small encoded picture in ``image_bytes``."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (24, 32), (128, 110, 100)).save(buffer, format="JPEG")
    return pd.DataFrame({"image_bytes": [buffer.getvalue()]})


def log_ensemble_model(
    bundle: Path,
    run_id: str,
    search: str,
    tracking_uri: str | None,
    summary: dict | None = None,
    register: bool = True,
) -> RegisteredEnsemble:
    """Log the bundle folder as a pyfunc model in the ensemble's run ``run_id`` and, with ``register``,
    register a new version of it under the search's name with the alias ``candidate``. The run keeps its
    status (it is the ensemble's record, not this)."""
    uri = resolve_tracking_uri(tracking_uri or (summary or {}).get("tracking_uri"))
    name = registered_model_name(search)
    with _using_store(uri):
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        status = client.get_run(run_id).info.status
        mlflow.start_run(run_id=run_id)
        try:
            with tempfile.TemporaryDirectory() as staging:
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=str(_model_code(Path(staging))),
                    artifacts={ARTIFACT_KEY: str(Path(bundle).absolute())},
                    code_paths=code_paths(),
                    signature=signature(),
                    input_example=input_example(),
                    pip_requirements=_pip_requirements(),
                    registered_model_name=name if register else None,
                    model_config=dict(DEFAULT_MODEL_CONFIG),
                    metadata={"foldtune_search": search, "foldtune_run_id": run_id},
                )
        finally:
            mlflow.end_run(status=status)
        if not register:
            return RegisteredEnsemble(name=name, version="", model_uri="", logged_uri=info.model_uri)
        version = str(info.registered_model_version)
        model_uri = f"models:/{name}/{version}"
        client.set_tag(run_id, f"{TAG}registered_model", model_uri)
        client.set_model_version_tag(name, version, f"{TAG}search", search)
        client.set_model_version_tag(name, version, f"{TAG}run_id", run_id)
        client.set_registered_model_alias(name, ALIAS, version)
    return RegisteredEnsemble(name=name, version=version, model_uri=model_uri, logged_uri=info.model_uri)


def load_registered_predictor(
    model_uri: str, tracking_uri: str | None = None, device: str = "auto"
) -> EnsemblePredictor:
    """The predictor inside an ensemble pyfunc (e.g. ``models:/NAME/VERSION``), via ``pyfunc.load_model``."""
    uri = resolve_tracking_uri(tracking_uri)
    with _using_store(uri):
        try:
            model = mlflow.pyfunc.load_model(model_uri, model_config={"device": device})
        except mlflow.exceptions.MlflowException as error:
            first = (str(error).splitlines() or [""])[0][:300]
            raise OrchestratorError(
                f"--model {model_uri}: cannot load it from the MLflow store {uri} ({first}); check the name "
                "and version (`foldtune ui`) and --tracking-uri / MLFLOW_TRACKING_URI"
            ) from None
    python_model = model.unwrap_python_model()
    if not isinstance(python_model, EnsemblePyfunc):
        raise OrchestratorError(
            f"--model {model_uri} is not a foldtune ensemble ({type(python_model).__name__})"
        )
    return python_model.predictor
