"""trainers.losses: focal loss against cross-entropy, the multitask loss, class balancing helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.heads import build_loss
from trainers.labels import NUM_CLASSES, decode
from trainers.losses import (
    FocalLoss,
    MultiTaskLoss,
    balanced_sample_weights,
    class_balanced_alpha,
)


def _batch(seed: int = 0, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, NUM_CLASSES, generator=generator) * 3
    target = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return logits, target


def _multitask_batch(seed: int = 0, n: int = 32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    outputs = {
        task: torch.randn(n, size, generator=generator) * 2
        for task, size in (("mask", 3), ("gender", 2), ("age", 3))
    }
    return outputs, torch.randint(0, NUM_CLASSES, (n,), generator=generator)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_with_gamma_zero_is_cross_entropy(label_smoothing, reduction):
    logits, target = _batch()
    focal = FocalLoss(gamma=0.0, label_smoothing=label_smoothing, reduction=reduction)(logits, target)
    expected = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction=reduction)
    assert torch.allclose(focal, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_with_gamma_zero_and_alpha_is_weighted_cross_entropy(label_smoothing, reduction):
    logits, target = _batch(seed=1)
    alpha = torch.linspace(0.2, 3.0, NUM_CLASSES)
    focal = FocalLoss(0.0, alpha=alpha, label_smoothing=label_smoothing, reduction=reduction)(logits, target)
    expected = F.cross_entropy(
        logits, target, weight=alpha, label_smoothing=label_smoothing, reduction=reduction
    )
    assert torch.allclose(focal, expected, atol=1e-6, rtol=1e-6)


def test_focal_matches_the_textbook_formula():
    logits, target = _batch(seed=2)
    log_p_true = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
    expected = (-((1 - log_p_true.exp()) ** 2.0) * log_p_true).mean()
    torch.testing.assert_close(FocalLoss(gamma=2.0)(logits, target), expected)


def test_focal_down_weights_easy_examples_more_than_hard_ones():
    easy = torch.zeros(4, NUM_CLASSES)
    easy[torch.arange(4), torch.tensor([0, 5, 9, 17])] = 6.0  # confident and correct
    easy_target = torch.tensor([0, 5, 9, 17])
    hard_target = torch.tensor([1, 6, 10, 16])  # same logits, wrong class
    ce_easy = F.cross_entropy(easy, easy_target)
    ce_hard = F.cross_entropy(easy, hard_target)
    for smoothing in (0.0, 0.1):
        focal_easy = FocalLoss(gamma=2.0, label_smoothing=smoothing)(easy, easy_target)
        assert focal_easy < F.cross_entropy(easy, easy_target, label_smoothing=smoothing)
    focal_easy = FocalLoss(gamma=2.0)(easy, easy_target)
    focal_hard = FocalLoss(gamma=2.0)(easy, hard_target)
    assert focal_easy / ce_easy < 0.01  # easy examples almost vanish
    assert focal_hard / ce_hard > 0.99  # hard ones keep nearly their full loss


def test_focal_gradient_stays_finite_for_saturated_logits():
    logits = torch.tensor([[100.0] + [0.0] * (NUM_CLASSES - 1)], requires_grad=True)
    loss = FocalLoss(gamma=0.5, label_smoothing=0.1)(logits, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_focal_rejects_inconsistent_inputs():
    logits, target = _batch()
    with pytest.raises(ValueError, match="alpha has 3 class weights"):
        FocalLoss(alpha=[1.0, 1.0, 1.0])(logits, target)
    with pytest.raises(ValueError, match="logits"):
        FocalLoss()(logits, target[:5])
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1.0)
    with pytest.raises(ValueError, match="non-negative"):
        FocalLoss(alpha=[-1.0] * NUM_CLASSES)


def test_multitask_loss_is_the_weighted_sum_of_the_three_task_losses():
    outputs, target = _multitask_batch()
    mask, gender, age = (torch.as_tensor(part) for part in decode(target.numpy()))
    per_task = {
        "mask": F.cross_entropy(outputs["mask"], mask, label_smoothing=0.1),
        "gender": F.cross_entropy(outputs["gender"], gender, label_smoothing=0.1),
        "age": F.cross_entropy(outputs["age"], age, label_smoothing=0.1),
    }
    loss_fn = MultiTaskLoss(gamma=0.0, weights=(2.0, 0.0, 0.5), label_smoothing=0.1)
    total = loss_fn(outputs, target)
    torch.testing.assert_close(total, 2.0 * per_task["mask"] + 0.5 * per_task["age"])
    for task, expected in per_task.items():
        torch.testing.assert_close(loss_fn.last_task_losses[task], expected)


def test_multitask_alpha_weights_each_sample_by_its_18_class_weight():
    outputs, target = _multitask_batch(seed=3)
    alpha = torch.linspace(0.5, 2.0, NUM_CLASSES)
    _, gender, _ = (torch.as_tensor(part) for part in decode(target.numpy()))
    per_sample = F.cross_entropy(outputs["gender"], gender, reduction="none")
    expected = (per_sample * alpha[target]).sum() / alpha[target].sum()
    loss = MultiTaskLoss(gamma=0.0, weights=(0.0, 1.0, 0.0), alpha=alpha)(outputs, target)
    torch.testing.assert_close(loss, expected)


def test_multitask_loss_backpropagates_into_all_three_heads():
    outputs, target = _multitask_batch(seed=4)
    for tensor in outputs.values():
        tensor.requires_grad_(True)
    MultiTaskLoss(gamma=2.0)(outputs, target).backward()
    assert all(tensor.grad is not None and tensor.grad.abs().sum() > 0 for tensor in outputs.values())
    with pytest.raises(ValueError, match="dict with keys"):
        MultiTaskLoss()(outputs["mask"], target)


def test_build_loss_picks_the_head_and_ce_ignores_gamma():
    logits, target = _batch(seed=5)
    ce = build_loss("ce", gamma=3.0, label_smoothing=0.05)
    torch.testing.assert_close(ce(logits, target), F.cross_entropy(logits, target, label_smoothing=0.05))
    focal = build_loss("focal", gamma=3.0)
    assert isinstance(focal, FocalLoss) and focal.gamma == 3.0
    assert focal(logits, target) < ce(logits, target)
    multitask = build_loss("focal", gamma=1.0, head="multitask", alpha=np.ones(NUM_CLASSES))
    assert isinstance(multitask, MultiTaskLoss) and multitask.gamma == 1.0
    with pytest.raises(ValueError, match="focal, ce"):
        build_loss("hinge")
    with pytest.raises(ValueError, match="unknown head"):
        build_loss("ce", head="double")
    with pytest.raises(ValueError, match="18 values"):
        build_loss("focal", alpha=[1.0, 2.0])


def test_loss_buffers_follow_the_module_to_another_dtype_and_stay_out_of_state_dict():
    loss_fn = build_loss("focal", alpha=torch.ones(NUM_CLASSES), head="multitask")
    assert loss_fn.state_dict() == {}
    assert loss_fn.to(torch.float64).alpha.dtype == torch.float64


def test_class_balanced_alpha_is_inverse_frequency_with_mean_one_and_zero_for_absent():
    labels = np.array([0, 0, 0, 1, 2, 2])
    alpha = class_balanced_alpha(labels, num_classes=4)
    assert alpha.dtype == torch.float32
    np.testing.assert_allclose(
        alpha.numpy(), np.array([1 / 3, 1, 1 / 2, 0]) / np.mean([1 / 3, 1, 1 / 2]), rtol=1e-6
    )
    counts = np.bincount(labels, minlength=4)
    weighted_totals = counts[:3] * alpha.numpy()[:3]
    np.testing.assert_allclose(weighted_totals, weighted_totals[0], rtol=1e-6)  # classes weigh the same
    assert class_balanced_alpha(np.arange(NUM_CLASSES)).shape == (NUM_CLASSES,)


def test_class_weights_reject_bad_labels_with_the_row():
    with pytest.raises(ValueError, match="label 18 at row 2"):
        class_balanced_alpha(np.array([0, 1, 18]))
    with pytest.raises(ValueError, match="integer"):
        balanced_sample_weights(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="non-empty"):
        class_balanced_alpha(np.array([], dtype=int))


def test_balanced_sample_weights_give_every_class_the_same_draw_probability():
    labels = np.array([0] * 90 + [1] * 9 + [17] * 1)
    weights = balanced_sample_weights(labels)
    assert weights.shape == labels.shape and weights.mean() == pytest.approx(1.0)
    per_class = [weights[labels == c].sum() for c in (0, 1, 17)]
    np.testing.assert_allclose(per_class, per_class[0])
    sampler = torch.utils.data.WeightedRandomSampler(
        weights, num_samples=30000, generator=torch.Generator().manual_seed(0)
    )
    drawn = np.bincount(labels[list(sampler)], minlength=NUM_CLASSES)[[0, 1, 17]] / 30000
    np.testing.assert_allclose(drawn, 1 / 3, atol=0.02)
