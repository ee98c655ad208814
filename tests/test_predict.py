"""The ensemble as a model: its bundle folder, the registered MLflow pyfunc, `foldtune predict`, serving.

Two tiny trials are trained once (no Ray, as in test_ensemble) and ensembled with MLflow tracking; every
way of predicting the eval images must then give the submission's probabilities (submission.npz) to 1e-5.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.ensemble import run_ensemble
from orchestrator.ensemble.bundle import SPEC_NAME
from orchestrator.ensemble.predictor import PROB_COLUMNS, EnsemblePredictor
from orchestrator.errors import OrchestratorError
from trainers.config import TrainConfig
from trainers.data import read_eval, read_train
from trainers.fit import fit
from trainers.folds import make_folds

SEARCH = "tiny predict"  # a space: the registered model's name is sanitised
MODEL_NAME = "tiny-predict"
TINY = dict(backbone="resnet10t", image_size=(32, 24), batch_size=16, k=2, lr=3e-3, patience=0, num_workers=0)
TRIALS = {
    "trial_a": dict(TINY, epochs=2, seed=0, tta=("hflip",)),
    "trial_b": dict(TINY, epochs=1, seed=1, tta=("hflip",), crop=(0.0, 0.9, 0.05, 0.95)),
}
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def world(tmp_path_factory, dataset_builder, store_template):
    """Two trained trials in a search folder, an MLflow store with the search's parent run, one ensemble
    of both trials (top 2: two members, two image shapes) logged and registered."""
    base = tmp_path_factory.mktemp("predict")
    data = dataset_builder(base / "data", n_persons=12, n_eval=10)
    table = read_train(data.root).table
    folds = make_folds(table, k=2, seed=0)
    storage = base / "runs"
    for trial_id, config in TRIALS.items():
        result = fit(
            TrainConfig(**config), table, folds, storage / SEARCH / "trials" / trial_id, base / "cache"
        )
        assert result.status == "completed"
    store = base / "mlruns" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(store_template, store)
    tracking_uri = f"sqlite:///{store}"
    from orchestrator.tracking import SearchTracking

    parent = SearchTracking(tracking_uri, SEARCH).start_parent(storage / SEARCH)
    summary = {
        "name": SEARCH,
        "experiment_name": SEARCH,
        "tracking_uri": tracking_uri,
        "parent_run_id": parent,
    }
    (storage / SEARCH / "summary.json").write_text(json.dumps(summary))
    logged: list[str] = []
    result = run_ensemble(
        data.root, SEARCH, storage=storage, top=2, cache_dir=base / "cache", device="cpu", log=logged.append
    )
    with np.load(result.probs_path) as saved:
        probs = {image_id: row for image_id, row in zip(saved["image_id"], saved["probs"], strict=True)}
    return {
        "base": base,
        "data": data,
        "storage": storage,
        "cache": base / "cache",
        "tracking_uri": tracking_uri,
        "result": result,
        "log": logged,
        "probs": probs,  # ImageID -> the submission's probabilities
        "eval": read_eval(data.root),
    }


@pytest.fixture
def store(world, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["tracking_uri"])
    return world["tracking_uri"]


def expected(world, names) -> np.ndarray:
    return np.stack([world["probs"][Path(name).name] for name in names])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bundle_holds_the_used_fold_checkpoints_and_the_spec(world):
    bundle = world["storage"] / SEARCH / "ensemble_model"
    spec = json.loads((bundle / SPEC_NAME).read_text())
    members = {m.trial_id: m for m in world["result"].members}
    assert [m["trial_id"] for m in spec["members"]] == list(members)
    assert spec["format"] == "foldtune-ensemble-1" and len(spec["class_names"]) == 18
    for entry in spec["members"]:
        assert entry["weight"] == pytest.approx(members[entry["trial_id"]].weight)
        assert entry["tta"] == ["hflip"] and entry["head"] == "single" and entry["image_size"] == [32, 24]
        assert entry["checkpoints"] == [f"checkpoints/{entry['trial_id']}/fold{f}.pt" for f in (0, 1)]
    assert {tuple(e["crop"] or ()) for e in spec["members"]} == {(), (0.0, 0.9, 0.05, 0.95)}
    assert not list(bundle.parent.glob(".ensemble_model.*"))  # no staging or old folder left behind
    assert any("model folder:" in line for line in world["log"])


def test_bundle_of_one_fold_model_holds_that_checkpoint_only(world, tmp_path):
    out = tmp_path / "fold1" / "submission.csv"
    result = run_ensemble(
        world["data"].root, SEARCH, storage=world["storage"], top=1, folds=[1], out=out,
        cache_dir=world["cache"], device="cpu", log=None, tracking_uri=world["tracking_uri"],
    )  # fmt: skip
    bundle = out.parent / "ensemble_model"
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*.pt"))
    assert files == [f"checkpoints/{result.members[0].trial_id}/fold1.pt"]
    predicted = EnsemblePredictor.from_folder(bundle, device="cpu").predict(
        world["eval"]["image_path"].tolist()
    )
    np.testing.assert_allclose(predicted.probs, result.eval_probs, atol=TOLERANCE)


def test_predictor_reproduces_the_submission_probabilities(world):
    predictor = EnsemblePredictor.from_folder(world["storage"] / SEARCH / "ensemble_model", device="cpu")
    paths = world["eval"]["image_path"].tolist()
    seen = []
    prediction = predictor.predict(
        paths, batch_size=3, progress=lambda done, total: seen.append((done, total))
    )
    assert prediction.failed == 0 and seen[-1] == (10, 10) and len(seen) == 4
    np.testing.assert_allclose(prediction.probs, expected(world, paths), atol=TOLERANCE)
    np.testing.assert_allclose(prediction.probs, world["result"].eval_probs, atol=TOLERANCE)
    frame = prediction.frame()
    assert (frame["class"].to_numpy() == world["result"].eval_probs.argmax(1)).all()
    assert frame.loc[0, "mask"] in ("wear", "incorrect", "not_wear") and frame.loc[0, "age"] in (
        "<30",
        "30-59",
        ">=60",
    )
    # encoded bytes score the same as the files; a TTA override changes the probabilities
    as_bytes = predictor.predict([Path(p).read_bytes() for p in paths])
    np.testing.assert_allclose(as_bytes.probs, prediction.probs, atol=TOLERANCE)
    assert not np.allclose(predictor.predict(paths, tta=()).probs, prediction.probs, atol=1e-4)


def test_registered_pyfunc_reproduces_the_submission(world, store):
    import mlflow

    from orchestrator.tracking.ensemble_model import _using_store, registered_model_name

    assert registered_model_name(SEARCH) == MODEL_NAME
    report = json.loads(world["result"].report_path.read_text())
    assert report["registered_model"].startswith(f"models:/{MODEL_NAME}/")
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version(MODEL_NAME, report["registered_model"].rsplit("/", 1)[1])
    assert version.run_id == world["result"].mlflow_run_id
    assert client.get_run(version.run_id).info.status == "FINISHED"
    images = str(world["data"].root / "eval" / "images")
    with _using_store(store):  # the fluent API's global URIs, restored afterwards
        model = mlflow.pyfunc.load_model(report["registered_model"], model_config={"image_root": images})
    schema = model.metadata.get_input_schema()
    assert {c.name: c.type.name for c in schema.inputs} == {"image_path": "string", "image_bytes": "binary"}
    outputs = model.metadata.get_output_schema().input_names()
    assert outputs[:4] == ["class", "mask", "gender", "age"] and outputs[4:22] == list(PROB_COLUMNS)
    paths = world["eval"]["image_path"].tolist()
    by_path = model.predict(pd.DataFrame({"image_path": paths}))
    np.testing.assert_allclose(by_path[list(PROB_COLUMNS)].to_numpy(), expected(world, paths), atol=TOLERANCE)
    by_bytes = model.predict(pd.DataFrame({"image_bytes": [Path(p).read_bytes() for p in paths[:3]]}))
    np.testing.assert_allclose(
        by_bytes[list(PROB_COLUMNS)].to_numpy(), expected(world, paths[:3]), atol=TOLERANCE
    )
    assert (by_path["error"] == "").all() and by_path["class"].dtype == np.int64


def test_each_submission_ensemble_registers_a_version_with_the_candidate_alias(world, store, tmp_path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    versions = lambda: {v.version for v in client.search_model_versions(f"name='{MODEL_NAME}'")}  # noqa: E731
    before = versions()
    logged: list[str] = []
    for exploratory in ({"top": 1}, {"folds": [0]}, {"tta": ()}):  # made to compare: not registered
        result = run_ensemble(
            world["data"].root, SEARCH, storage=world["storage"], out=tmp_path / "x.csv",
            cache_dir=world["cache"], device="cpu", log=logged.append, **exploratory,
        )  # fmt: skip
        assert versions() == before and "registered_model" not in json.loads(result.report_path.read_text())
    assert sum("not registered (an exploratory ensemble)" in line for line in logged) == 3
    result = run_ensemble(
        world["data"].root, SEARCH, storage=world["storage"], out=tmp_path / "greedy.csv",
        cache_dir=world["cache"], device="cpu", log=None,
    )  # fmt: skip
    (version,) = versions() - before
    assert client.get_model_version(MODEL_NAME, version).run_id == result.mlflow_run_id
    assert client.get_model_version_by_alias(MODEL_NAME, "candidate").version == version


def test_the_registered_model_needs_only_its_requirements_and_takes_paths_and_bytes(world, store, tmp_path):
    """Loaded in a fresh interpreter where foldtune is not installed (no site .pth files: the editable
    install is invisible), from the registry: foldtune's code comes with the model, and neither Ray nor
    Optuna is imported. One request mixes a path row and a bytes row."""
    import site

    version = json.loads(world["result"].report_path.read_text())["registered_model"]
    image = Path(world["eval"]["image_path"].iloc[0])
    frame_file = tmp_path / "frame.json"
    frame_file.write_text(
        json.dumps({"path": str(image), "bytes": base64.b64encode(image.read_bytes()).decode()})
    )
    script = f"""
import base64, json, sys
sys.path[:0] = {[p for p in site.getsitepackages()]!r}
try:
    import orchestrator
    sys.exit("foldtune is importable without the model: the check proves nothing")
except ModuleNotFoundError:
    pass
import mlflow, pandas as pd
mlflow.set_tracking_uri({store!r}); mlflow.set_registry_uri({store!r})
config = {{"device": "cpu", "image_root": {str(image.parent)!r}}}
model = mlflow.pyfunc.load_model({version!r}, model_config=config)
given = json.loads(open({str(frame_file)!r}).read())
picture = base64.b64decode(given["bytes"])
frame = pd.DataFrame({{"image_path": [given["path"], None], "image_bytes": [None, picture]}})
out = model.predict(frame)
import orchestrator
print(json.dumps({{
    "modules": sorted({{m.split(".")[0] for m in sys.modules}}),
    "orchestrator": orchestrator.__file__,
    "probs": out[[c for c in out.columns if c.startswith("prob_")]].to_numpy().tolist(),
    "errors": out["error"].tolist(),
}}))
"""
    done = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=600,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not {"ray", "optuna"} & set(loaded["modules"])
    assert "/code/" in loaded["orchestrator"] and not loaded["orchestrator"].startswith(str(Path.cwd()))
    assert loaded["errors"] == ["", ""]
    np.testing.assert_allclose(loaded["probs"][0], loaded["probs"][1], atol=TOLERANCE)  # same picture
    np.testing.assert_allclose(loaded["probs"][0], expected(world, [image.name])[0], atol=TOLERANCE)


def test_a_failing_model_log_only_warns_and_keeps_submission_and_run(world, tmp_path, monkeypatch):
    from orchestrator.tracking import ensemble_model

    def broken(*args, **kwargs):
        raise RuntimeError("registry down")

    monkeypatch.setattr(ensemble_model, "log_ensemble_model", broken)
    logged: list[str] = []
    out = tmp_path / "submission.csv"
    result = run_ensemble(
        world["data"].root, SEARCH, storage=world["storage"], top=1, out=out,
        cache_dir=world["cache"], device="cpu", log=logged.append,
    )  # fmt: skip
    assert out.is_file() and (tmp_path / "ensemble_model" / SPEC_NAME).is_file()
    assert result.mlflow_run_id and any("registry down" in line for line in logged)
    report = json.loads(result.report_path.read_text())
    assert report["mlflow_run_id"] == result.mlflow_run_id and "registered_model" not in report


def write_images(world, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    for path in world["eval"]["image_path"]:
        shutil.copy(path, folder)
    return sorted(p.name for p in folder.iterdir())


def test_cli_predicts_a_folder_and_lists_bad_images(world, tmp_path, capsys):
    folder = tmp_path / "images"
    good = write_images(world, folder)
    whole = (folder / good[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "not_an_image.png").write_text("hello")
    (folder / "notes.txt").write_text("not listed")
    out = tmp_path / "out" / "predictions.csv"
    code, printed, err = run_cli(
        capsys, "predict", "--model", SEARCH, "--storage", str(world["storage"]), "--images", str(folder),
        "--out", str(out), "--batch-size", "4", "--progress-every", "1", "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert "predicted 4/12 images" in printed and "predicted 12/12 images" in printed
    assert printed.strip().splitlines()[-1].endswith("2 could not be read (see the error column)")
    frame = pd.read_csv(out, dtype={"error": str}, keep_default_na=False)
    assert list(frame.columns) == ["image", "class", "mask", "gender", "age", *PROB_COLUMNS, "error"]
    assert frame["image"].tolist() == sorted([*good, "truncated.jpg", "not_an_image.png"])
    bad = frame[frame["error"] != ""]
    assert sorted(bad["image"]) == ["not_an_image.png", "truncated.jpg"]
    assert (bad["class"] == "").all() and (bad["prob_00"] == "").all()
    ok = frame[frame["error"] == ""]
    probs = ok[list(PROB_COLUMNS)].astype(float).to_numpy()
    np.testing.assert_allclose(probs, expected(world, ok["image"]), atol=TOLERANCE)
    assert (ok["class"].astype(int).to_numpy() == probs.argmax(1)).all()


def test_cli_reads_a_csv_of_image_ids_and_a_registered_model(world, store, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    version = json.loads(world["result"].report_path.read_text())["registered_model"]
    code, printed, err = run_cli(
        capsys, "predict", "--model", version, "--images", str(world["data"].info_csv), "--out", str(out),
        "--device", "cpu",
    )  # fmt: skip
    assert code == 0, err
    assert printed.strip().splitlines()[-1].endswith("written to " + str(out) + "; none failed")
    frame = pd.read_csv(out, dtype={"image": str})
    assert frame["image"].tolist() == world["data"].eval_ids
    np.testing.assert_allclose(
        frame[list(PROB_COLUMNS)].to_numpy(), expected(world, frame["image"]), atol=TOLERANCE
    )
    # a bundle folder by path, a CSV of image paths relative to the CSV's folder
    listing = world["data"].root / "eval" / "paths.csv"
    pd.DataFrame({"image_path": [f"images/{i}" for i in world["data"].eval_ids[:2]]}).to_csv(
        listing, index=False
    )
    bundle = world["storage"] / SEARCH / "ensemble_model"
    code, _, err = run_cli(
        capsys, "predict", "--model", str(bundle), "--images", str(listing), "--out", str(out)
    )
    assert code == 0, err
    assert len(pd.read_csv(out)) == 2


def test_cli_errors_are_one_line(world, tmp_path, capsys):
    storage = str(world["storage"])
    args = ("--storage", storage, "--out", str(tmp_path / "p.csv"))
    images = world["data"].root / "eval" / "images"
    code, _, err = run_cli(capsys, "predict", "--model", "nowhere", "--images", str(images), *args)
    assert code == 2 and err.startswith("error: ") and "unknown search" in err
    (world["storage"] / "no-ensemble").mkdir(exist_ok=True)
    code, _, err = run_cli(capsys, "predict", "--model", "no-ensemble", "--images", str(images), *args)
    assert code == 2 and "run `foldtune ensemble --search no-ensemble` first" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "predict", "--model", SEARCH, "--images", str(tmp_path / "empty"), *args)
    assert code == 2 and "no .jpg/.jpeg/.png files" in err
    (tmp_path / "list.csv").write_text("file\na.jpg\n")
    code, _, err = run_cli(
        capsys, "predict", "--model", SEARCH, "--images", str(tmp_path / "list.csv"), *args
    )
    assert code == 2 and "no image_path or ImageID column" in err
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(OrchestratorError, match="--tta"):
        EnsemblePredictor.from_folder(world["storage"] / SEARCH / "ensemble_model").predict([], tta=("spin",))


# ----------------------------------------------------------------------------------------------------------
# serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_same_probabilities(world, store, tmp_path):
    import mlflow

    from orchestrator.tracking.ensemble_model import _using_store

    mlflow_cli = Path(sys.executable).with_name("mlflow")
    if not mlflow_cli.is_file():
        pytest.skip(f"no mlflow command next to {sys.executable}")
    model_uri = json.loads(world["result"].report_path.read_text())["registered_model"]
    port, log_path = free_port(), tmp_path / "serve.log"
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # its uvicorn
    env = {
        **os.environ,
        "PATH": path,
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_REGISTRY_URI": store,
        "NO_ALBUMENTATIONS_UPDATE": "1",
    }
    command = [str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if server.poll() is not None:
                text = log_path.read_text()
                if any(word in text for word in ("Temporary failure in name resolution", "pip install")):
                    pytest.skip(f"mlflow models serve cannot start offline here: {text[-500:]}")
                pytest.fail(f"mlflow models serve exited with {server.returncode}:\n{text[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow models serve did not answer within 240 s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(1)
        paths = world["eval"]["image_path"].tolist()[:2]
        encoded = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]
        answer = post(
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["image_bytes"], "data": [[e] for e in encoded]}},
        )
        served = pd.DataFrame(answer["predictions"])
        with _using_store(store):
            config = {"image_root": str(Path(paths[0]).parent)}
            local = mlflow.pyfunc.load_model(model_uri, model_config=config).predict(
                pd.DataFrame({"image_path": paths})
            )
        np.testing.assert_allclose(
            served[list(PROB_COLUMNS)].to_numpy(float), local[list(PROB_COLUMNS)].to_numpy(), atol=TOLERANCE
        )
        np.testing.assert_allclose(
            local[list(PROB_COLUMNS)].to_numpy(), expected(world, paths), atol=TOLERANCE
        )
        assert served["class"].tolist() == local["class"].tolist() and (served["error"] == "").all()
        refused = post(  # no image root set for the server: a path is not read
            f"http://127.0.0.1:{port}/invocations",
            {"dataframe_split": {"columns": ["image_path"], "data": [[paths[0]]]}},
        )["predictions"][0]
        assert refused["class"] == -1 and "image_path is not read by this served model" in refused["error"]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ----------------------------------------------------------------------------------------------------------
# what a served model reads


def png(width: int, height: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def test_a_served_model_reads_paths_only_under_its_image_root_and_refuses_bombs(world, store, tmp_path):
    import mlflow

    from orchestrator.tracking.ensemble_model import _using_store

    version = json.loads(world["result"].report_path.read_text())["registered_model"]
    images = world["data"].root / "eval" / "images"
    inside = Path(world["eval"]["image_path"].iloc[0])
    secret = tmp_path / "secret.jpg"
    shutil.copy(inside, secret)
    link = images / "link.jpg"
    link.symlink_to(secret)  # a link inside the root that points out of it
    bomb = png(9000, 9000)  # 81 million pixels in a few kilobytes
    assert len(bomb) < 200_000
    rows = pd.DataFrame(
        {
            "image_path": [
                str(inside),
                str(images / ".." / ".." / "train" / "train.csv"),
                str(link),
                None,
                None,
            ],
            "image_bytes": [None, None, None, bomb, inside.read_bytes()],
        }
    )
    try:
        with _using_store(store):
            closed = mlflow.pyfunc.load_model(version, model_config={"device": "cpu"})
            rooted = mlflow.pyfunc.load_model(
                version, model_config={"device": "cpu", "image_root": str(images)}
            )
        by_default = closed.predict(rows)
        assert (
            by_default["error"]
            .iloc[0]
            .startswith("RefusedInput: image_path is not read by this served model")
        )
        assert (by_default["class"].iloc[:3] == -1).all()
        out = rooted.predict(rows)
    finally:
        link.unlink()
    assert out["error"].iloc[0] == "" and out["class"].iloc[0] >= 0
    assert "outside the served image root" in out["error"].iloc[1]
    assert "outside the served image root" in out["error"].iloc[2]  # the link is resolved first
    assert out["error"].iloc[3] == "RefusedInput: image of 9000x9000 pixels; the limit is 40,000,000"
    assert out["error"].iloc[4] == "" and out["class"].iloc[4] == out["class"].iloc[0]


def test_the_image_gate_checks_size_before_anything_is_decoded(monkeypatch):
    from orchestrator.tracking.served_model import ImageGate, RefusedInput

    gate = ImageGate(root=None, max_bytes=1000, max_pixels=100)
    assert isinstance(gate.admit(b"x" * 1001), RefusedInput)
    decoded = []
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))
    assert "11x10 pixels" in str(gate.admit(png(11, 10)))
    assert decoded == []  # the header was enough
    assert gate.admit(png(10, 10)) == png(10, 10)
    assert gate.admit(b"not an image") == b"not an image"  # the decoder reports it in the row


# ----------------------------------------------------------------------------------------------------------
# SIGTERM at the worst moments of the ensemble (the CLI raises it as Terminated where the code is)


def ensemble_argv(world, out: Path) -> list[str]:
    return [
        "ensemble", "--data", str(world["data"].root), "--search", SEARCH, "--storage", str(world["storage"]),
        "--out", str(out),
    ]  # fmt: skip


def test_sigterm_during_the_model_upload_leaves_no_run_running_and_the_submission_whole(
    world, store, tmp_path, monkeypatch, capsys
):
    import mlflow

    from orchestrator.signals import Terminated

    def killed(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(mlflow.pyfunc, "log_model", killed)
    out = tmp_path / "submission.csv"
    code = main(ensemble_argv(world, out))
    assert code == 143 and capsys.readouterr().err.strip().splitlines()[-1] == "terminated"
    assert out.is_file() and len(pd.read_csv(out)) == len(world["eval"])  # written before the upload
    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs(
        [client.get_experiment_by_name(SEARCH).experiment_id], "tags.`foldtune.role` = 'ensemble'"
    )
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    assert not list(tmp_path.glob(".ensemble_model.*"))  # no staging or old bundle left


def test_a_kill_between_the_bundle_renames_keeps_the_previous_bundle(world, tmp_path, monkeypatch, capsys):
    from orchestrator.ensemble import bundle as bundle_module
    from orchestrator.signals import Terminated

    out = tmp_path / "submission.csv"
    assert main([*ensemble_argv(world, out), "--top", "1"]) == 0
    bundle = tmp_path / "ensemble_model"
    before = (bundle / SPEC_NAME).read_text()
    real_replace, calls = os.replace, []

    def killed_at_the_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old bundle is aside, the new one not yet in place
            raise Terminated
        return real_replace(src, dst)

    monkeypatch.setattr(bundle_module.os, "replace", killed_at_the_second_rename)
    assert main([*ensemble_argv(world, out), "--top", "2"]) == 143
    monkeypatch.undo()
    assert (bundle / SPEC_NAME).read_text() == before  # put back
    # a SIGKILL there runs no handler: the previous bundle stays aside, and the next reader puts it back
    aside = tmp_path / ".ensemble_model.old-4242"
    os.replace(bundle, aside)
    from orchestrator.ensemble.bundle import recover_bundle

    recover_bundle(bundle)
    assert (bundle / SPEC_NAME).read_text() == before and not aside.exists()
