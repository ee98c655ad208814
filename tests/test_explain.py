"""``foldtune explain``: Grad-CAM maps with the input's spatial shape for CNNs and ViTs (tiny timm models,
CPU), the images picked deterministically, and the whole command on a search folder with real fold
checkpoints, each image explained by the fold model that never saw it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.inspect.explain import attention_maps, pick_images, reshape_for, target_layer
from trainers.checkpoint import save_fold_checkpoint
from trainers.config import TrainConfig
from trainers.data import read_train
from trainers.models import build_model

SIZE = (64, 48)  # (height, width): not square, so a swapped axis would show


def foldtune(argv: list[str]) -> int:
    from orchestrator import cli

    return cli.main(argv)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def images(n: int, size: tuple[int, int] = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, *size, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("backbone", "head"),
    [("test_resnet", "single"), ("test_efficientnet", "multitask"), ("test_vit", "single")],
)
def test_maps_have_the_input_spatial_shape(backbone, head):
    torch.manual_seed(0)
    model = build_model(backbone, head=head, image_size=SIZE).eval()
    maps, predicted, confidence = attention_maps(
        model, head, images(3), (0.5,) * 3, (0.25,) * 3, torch.device("cpu")
    )
    assert maps.shape == (3, *SIZE)
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert predicted.shape == (3,) and ((predicted >= 0) & (predicted < 18)).all()
    assert ((confidence > 0) & (confidence <= 1)).all()


def test_vit_maps_come_from_the_last_block_patch_tokens():
    model = build_model("test_vit", image_size=SIZE).eval()
    layer = target_layer(model)
    assert layer is model.blocks[-1].norm1
    reshape = reshape_for(model, layer, SIZE, torch.device("cpu"))
    grid = model.patch_embed.grid_size
    tokens = torch.randn(2, model.num_prefix_tokens + grid[0] * grid[1], model.embed_dim)
    assert tuple(reshape(tokens).shape) == (2, model.embed_dim, *grid)


def test_cnn_maps_come_from_the_last_stage():
    model = build_model("test_resnet", image_size=SIZE).eval()
    assert target_layer(model) is model.layer4
    assert reshape_for(model, model.layer4, SIZE, torch.device("cpu")) is None


def test_pick_images_takes_the_most_confident_errors_and_spreads_the_rest_over_classes():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = np.full((8, 18), 0.01)
    probs[np.arange(8), labels] = 0.8
    probs[1] = 0.01
    probs[1, 5] = 0.9  # error, very confident
    probs[4] = 0.01
    probs[4, 7] = 0.6  # error, less so
    errors, samples = pick_images(labels, probs, n=3, seed=0)
    assert errors.tolist() == [1, 4]
    assert len(samples) == 3 and not set(samples.tolist()) & {1, 4}
    assert len(set(labels[samples].tolist())) == 3  # one per class before any class twice
    again = pick_images(labels, probs, n=3, seed=0)
    assert again[1].tolist() == samples.tolist()


@pytest.fixture(scope="module")
def search(tmp_path_factory, dataset_builder):
    """A search folder with one trial: 2 real (untrained) fold checkpoints and synthetic OOF."""
    base = tmp_path_factory.mktemp("explain")
    data = dataset_builder(base / "data", n_persons=6, n_eval=1)
    table = read_train(data.root).table
    run_dir = base / "runs" / "s" / "trials" / "t1"
    cfg = TrainConfig(backbone="test_resnet", image_size=(32, 24), k=2, tta=())
    torch.manual_seed(0)
    for fold in range(2):
        model = build_model(cfg.backbone, image_size=cfg.image_size)
        path = run_dir / "checkpoints" / f"fold{fold}.pt"
        save_fold_checkpoint(path, model, cfg, (0.5,) * 3, (0.25,) * 3, fold, 1, 0.1)
    (run_dir / "result.json").write_text(json.dumps({"config": cfg.to_dict(), "status": "completed"}))
    persons = sorted(table["person_id"].unique())
    fold = table["person_id"].map({p: i % 2 for i, p in enumerate(persons)}).to_numpy()
    probs = np.random.default_rng(0).dirichlet(np.ones(18), size=len(table)).astype(np.float32)
    np.savez_compressed(
        run_dir / "oof.npz",
        rel_path=table["rel_path"].to_numpy(dtype=str),
        label=table["label"].to_numpy(),
        fold=fold,
        probs=probs,
        probs_tta=probs,
    )
    return {"data": data.root, "storage": base / "runs", "table": table, "fold": fold}


def test_explain_writes_grids_with_each_image_explained_by_its_oof_fold_model(search, capsys):
    argv = ["explain", "--data", str(search["data"]), "--search", "s", "--storage", str(search["storage"])]
    assert foldtune([*argv, "--n", "4", "--device", "cpu"]) == 0
    out = search["storage"] / "s" / "explain"
    assert (out / "attention_errors.png").stat().st_size > 0
    assert (out / "attention_classes.png").stat().st_size > 0
    explained = pd.read_csv(out / "explained.csv")
    assert len(explained) == 8 and set(explained["group"]) == {"errors", "classes"}
    fold_of = dict(zip(search["table"]["rel_path"], search["fold"], strict=True))
    assert all(
        fold_of[image] == fold for image, fold in zip(explained["image"], explained["fold"], strict=True)
    )
    assert not list(out.glob(".*.tmp"))
    assert "attention maps:" in capsys.readouterr().out


def test_explain_refuses_a_missing_search_in_one_line(search, tmp_path, capsys):
    argv = ["explain", "--data", str(search["data"]), "--search", "nope", "--storage", str(tmp_path)]
    assert foldtune(argv) == 2
    assert "search folder" in one_error_line(capsys)


def test_explain_asks_for_cuda_without_a_gpu_in_one_line(search, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    argv = ["explain", "--data", str(search["data"]), "--search", "s", "--storage", str(search["storage"])]
    assert foldtune([*argv, "--device", "cuda"]) == 2
    assert "cuda" in one_error_line(capsys)
