"""trainers.models: timm factory, both heads, generic freeze depth across model families."""

from __future__ import annotations

import copy
import functools
import itertools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from trainers.heads import MultiTaskNet, class_log_probs
from trainers.labels import NUM_CLASSES, decode
from trainers.models import (
    FreezeReport,
    ModelError,
    apply_freeze_train_mode,
    backbone_of,
    build_model,
    count_stages,
    freeze_stages,
    native_input_size,
)

BATCH = (2, 3, 64, 48)
VIT_DEPTH = 4

# Per family: timm name, architecture kwargs, and the parameter-name prefixes of stem, each stage and head,
# written out by hand from the timm sources, so the generic grouping is checked against known layouts.
FAMILIES = {
    "resnet": (
        "resnet10t",
        {},
        ("conv1.", "bn1."),
        [("layer1.",), ("layer2.",), ("layer3.",), ("layer4.",)],
        ("fc.",),
    ),
    "efficientnet": (
        "efficientnet_b0",
        {},
        ("conv_stem.", "bn1."),
        # timm files the final 1x1 conv and its BN with the last stage
        [(f"blocks.{i}.",) for i in range(6)] + [("blocks.6.", "conv_head.", "bn2.")],
        ("classifier.",),
    ),
    "convnext": (
        "convnext_atto",
        {},
        ("stem.",),
        [(f"stages.{i}.",) for i in range(4)],
        ("head.",),
    ),
    "vit": (
        "vit_tiny_patch16_224",
        {"img_size": BATCH[2:], "depth": VIT_DEPTH},
        ("cls_token", "pos_embed", "patch_embed."),
        [(f"blocks.{i}.",) for i in range(VIT_DEPTH - 1)] + [(f"blocks.{VIT_DEPTH - 1}.", "norm.")],
        ("head.",),
    ),
}


@functools.cache
def _built(name: str, head: str) -> nn.Module:
    backbone, kwargs, *_ = FAMILIES[name]
    torch.manual_seed(0)
    return build_model(backbone, head=head, model_kwargs=kwargs)


def fresh(name: str, head: str = "single") -> nn.Module:
    """A private copy of a cached model (building timm models is the slow part of these tests)."""
    return copy.deepcopy(_built(name, head))


def _expected_frozen(name: str, depth: int) -> tuple[str, ...]:
    _, _, stem, stages, _ = FAMILIES[name]
    return stem + tuple(prefix for stage in stages[:depth] for prefix in stage) if depth else ()


def test_unknown_backbone_names_it_and_suggests_close_names():
    with pytest.raises(ModelError, match="resnet181") as caught:
        build_model("resnet181")
    assert isinstance(caught.value, ValueError)
    assert "resnet18" in str(caught.value).split("did you mean", 1)[1]


def test_bad_head_and_bad_kwargs_are_model_errors():
    with pytest.raises(ModelError, match="unknown head 'triple'"):
        build_model("resnet10t", head="triple")
    with pytest.raises(ModelError, match="18 classes"):
        build_model("resnet10t", head="multitask", num_classes=5)
    with pytest.raises(ModelError, match="num_classes"):
        build_model("resnet10t", pretrained_kwargs={"pretrained": False, "num_classes": 3})
    with pytest.raises(ModelError, match="img_size"):
        build_model("resnet10t", model_kwargs={"img_size": 64})


def test_pretrained_kwargs_reach_timm_and_load_a_local_weight_file(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False)  # 1000-class ImageNet layout
    weights = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), weights)
    pretrained = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(weights)}}

    single = build_model("resnet10t", pretrained_kwargs=pretrained)
    assert torch.equal(single.conv1[0].weight, source.conv1[0].weight)
    assert single.fc.out_features == NUM_CLASSES
    multitask = build_model("resnet10t", head="multitask", pretrained_kwargs=pretrained)
    assert torch.equal(multitask.backbone.layer4[0].conv1.weight, source.layer4[0].conv1.weight)

    missing = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(tmp_path / "absent.pth")}}
    with pytest.raises(ModelError, match="resnet10t"):
        build_model("resnet10t", pretrained_kwargs=missing)


def test_fixed_size_backbones_are_built_for_the_image_size_they_will_be_fed():
    assert native_input_size("vit_tiny_patch16_224") == (224, 224)
    assert native_input_size("resnet10t") is None  # any size works: nothing to pass
    vit = build_model("vit_tiny_patch16_224", image_size=(64, 48), model_kwargs={"depth": 1})
    assert vit(torch.zeros(BATCH)).shape == (2, NUM_CLASSES)
    with pytest.raises(Exception):  # noqa: B017  (what timm does when the size is not passed)
        timm.create_model("vit_tiny_patch16_224", depth=1)(torch.zeros(BATCH))
    resnet = build_model("resnet10t", image_size=(64, 48))
    assert resnet(torch.zeros(BATCH)).shape == (2, NUM_CLASSES)


def test_single_head_outputs_18_logits_and_log_probs():
    model = fresh("resnet").eval()
    logits = model(torch.randn(BATCH))
    assert logits.shape == (2, NUM_CLASSES)
    log_probs = class_log_probs(logits, "single")
    torch.testing.assert_close(log_probs, F.log_softmax(logits, dim=1))
    with pytest.raises(ModelError, match="single head output"):
        class_log_probs(torch.zeros(2, 5), "single")


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_multitask_log_probs_are_the_product_of_the_three_task_softmaxes(name):
    model = fresh(name, "multitask").eval()
    assert isinstance(model, MultiTaskNet)
    torch.manual_seed(2)
    with torch.no_grad():
        # scale the heads up so the three distributions are far from uniform
        for head in model.heads.values():
            head.weight.mul_(50)
        outputs = model(torch.randn(BATCH))
    assert {task: tuple(out.shape) for task, out in outputs.items()} == {
        "mask": (2, 3),
        "gender": (2, 2),
        "age": (2, 3),
    }
    log_probs = class_log_probs(outputs, "multitask")
    assert log_probs.shape == (2, NUM_CLASSES)
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(2))

    mask_p, gender_p, age_p = (outputs[task].softmax(dim=1) for task in ("mask", "gender", "age"))
    for label in range(NUM_CLASSES):
        mask, gender, age = decode(label)
        expected = mask_p[:, mask] * gender_p[:, gender] * age_p[:, age]
        torch.testing.assert_close(log_probs[:, label].exp(), expected)

    with pytest.raises(ModelError, match="multitask output"):
        class_log_probs(outputs["mask"], "multitask")


def test_multitask_head_width_follows_what_the_backbone_returns():
    # MobileNetV3 returns its conv_head width (1024), not num_features (576), once the classifier is removed
    model = build_model("mobilenetv3_small_050", head="multitask").eval()
    outputs = model(torch.randn(BATCH))
    assert outputs["age"].shape == (2, 3)
    assert backbone_of(model) is model.backbone


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stage_count_matches_the_family_layout(name):
    expected_stages = len(FAMILIES[name][3])
    assert count_stages(fresh(name)) == expected_stages
    assert count_stages(fresh(name, "multitask")) == expected_stages


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("depth", [0, 1, 2])
def test_freeze_stem_and_first_stages_only(name, depth):
    model = fresh(name)
    report = freeze_stages(model, depth)
    frozen_prefixes = _expected_frozen(name, depth)
    head_prefixes = FAMILIES[name][4]
    for param_name, param in model.named_parameters():
        should_freeze = param_name.startswith(frozen_prefixes) if frozen_prefixes else False
        assert param.requires_grad is not should_freeze, param_name
        if param_name.startswith(head_prefixes):
            assert param.requires_grad, f"head parameter {param_name} must always train"
    assert report.depth == depth
    assert report.frozen_params == sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total_params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_trainable_count_shrinks_with_every_depth_and_too_deep_names_the_maximum(name):
    model = fresh(name)
    max_depth = count_stages(model)
    reports = [freeze_stages(model, depth) for depth in range(max_depth + 1)]
    trainable = [report.trainable_params for report in reports]
    assert all(later < earlier for earlier, later in itertools.pairwise(trainable)), trainable
    assert reports[0].frozen_params == 0 and reports[0].frozen_modules == ()
    assert all(report.max_depth == max_depth for report in reports)
    with pytest.raises(ModelError, match=rf"0\.\.{max_depth}"):
        freeze_stages(model, max_depth + 1)
    with pytest.raises(ModelError, match="non-negative"):
        freeze_stages(model, -1)
    # freezing is idempotent: going back to depth 0 unfreezes everything
    assert freeze_stages(model, 0).trainable_params == reports[0].total_params


def _norm_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    }


@pytest.mark.parametrize("name", list(FAMILIES))
def test_optimizer_step_moves_only_trainable_weights_and_frozen_bn_statistics_stay(name):
    depth = 2
    model = fresh(name)
    report = freeze_stages(model, depth)
    apply_freeze_train_mode(model, report)
    frozen_prefixes = _expected_frozen(name, depth)

    for module_name, module in model.named_modules():
        in_frozen_stage = module_name.startswith(tuple(p.rstrip(".") for p in frozen_prefixes))
        if isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Dropout) and in_frozen_stage:
            assert not module.training, f"{module_name} should stay in eval mode"
    assert model.training

    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats_before = _norm_statistics(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch.manual_seed(3)
    loss = F.cross_entropy(model(torch.randn(BATCH)), torch.tensor([1, 7]))
    loss.backward()
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), params_before[n])}
    for param_name, param in model.named_parameters():
        if param_name.startswith(frozen_prefixes):
            assert not param.requires_grad and param.grad is None, param_name
            assert param_name not in changed, f"frozen {param_name} moved"
        else:
            assert param.requires_grad and param.grad is not None, param_name
    # every later stage and the head learn (single weights may stand still: zero-init residual branches,
    # layer-scale 1e-6 updates below float32 resolution, so the check is per stage)
    _, _, _, stages, head = FAMILIES[name]
    for prefixes in [*stages[depth:], head]:
        assert any(n.startswith(prefixes) for n in changed), f"no weight of {prefixes} changed"
    for stat_name, before in stats_before.items():
        changed = not torch.equal(dict(model.named_buffers())[stat_name], before)
        assert changed is not stat_name.startswith(frozen_prefixes), stat_name


def test_multitask_freeze_applies_to_the_backbone_and_keeps_heads_trainable():
    model = fresh("resnet", "multitask")
    max_depth = count_stages(model)
    report = freeze_stages(model, max_depth)
    assert report.max_depth == 4
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.heads.parameters())
    assert report.trainable_params == sum(p.numel() for p in model.heads.parameters())
    assert report.frozen_modules == ("backbone",)

    apply_freeze_train_mode(model, report)
    assert not model.backbone.training and model.heads.training
    stats_before = _norm_statistics(model)
    model(torch.randn(BATCH))["mask"].sum().backward()
    assert all(torch.equal(stats_before[n], b) for n, b in _norm_statistics(model).items())

    partial = freeze_stages(model, 1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(
        n.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1.")) for n in frozen
    )
    assert str(partial).startswith("freeze depth 1/4")


def test_model_without_stage_information_trains_unfrozen_only():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    report = freeze_stages(plain, 0)
    assert report == FreezeReport(0, 0, 0, report.total_params, report.total_params, ())
    with pytest.raises(ModelError, match="use freeze depth 0"):
        freeze_stages(plain, 1)


def test_weight_decay_skips_norms_biases_and_what_timm_names_for_both_heads():
    from trainers.fold_state import param_groups

    for head, prefix in (("single", ""), ("multitask", "backbone.")):
        model = build_model("vit_tiny_patch16_224", head=head, image_size=(64, 48), model_kwargs={"depth": 1})
        model.get_parameter(f"{prefix}patch_embed.proj.weight").requires_grad_(False)  # frozen: left out
        decay, no_decay = ({id(p) for p in group["params"]} for group in param_groups(model, 0.05))
        named = dict(model.named_parameters())
        assert {
            id(named[f"{prefix}{n}"]) for n in ("cls_token", "pos_embed", "blocks.0.norm1.weight")
        } <= no_decay
        assert id(named[f"{prefix}blocks.0.attn.qkv.weight"]) in decay
        assert id(named[f"{prefix}patch_embed.proj.weight"]) not in decay | no_decay
