"""Dice accumulation, class weights, the soft Dice loss and the ``dice`` command's report."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from toolkit.metrics.dice import DiceAccumulator, class_weights, dice_from_sums, dice_report, soft_dice_loss


def numpy_dice(pred: np.ndarray, gt: np.ndarray, classes: int) -> np.ndarray:
    """The definition, class by class."""
    out = np.ones(classes)
    for c in range(classes):
        p, g = pred == c, gt == c
        if p.sum() + g.sum():
            out[c] = 2 * (p & g).sum() / (p.sum() + g.sum())
    return out


def random_labels(seed: int, shape=(6, 12, 12), classes=4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, classes, shape, dtype=np.uint8)
    pred = np.where(rng.random(shape) < 0.7, gt, rng.integers(0, classes, shape)).astype(np.uint8)
    return pred, gt


def test_per_class_matches_the_definition():
    pred, gt = random_labels(0, classes=5)
    acc = DiceAccumulator(5)
    acc.update(pred, torch.from_numpy(gt))
    np.testing.assert_allclose(acc.per_class(), numpy_dice(pred, gt, 5))


def test_empty_classes():
    gt = np.zeros((4, 4), dtype=np.uint8)
    pred = gt.copy()
    pred[0, 0] = 2  # class 2 only in the prediction: one-sided, dice 0
    dice = DiceAccumulator(4)
    dice.update(pred, gt)
    np.testing.assert_allclose(dice.per_class(), [2 * 15 / 31, 1.0, 0.0, 1.0])  # classes 1 and 3: empty vs empty


def test_accumulation_equals_one_shot():
    pred, gt = random_labels(1)
    whole, batched, left, right = (DiceAccumulator(4) for _ in range(4))
    whole.update(pred, gt)
    for lo in range(0, 6, 4):
        batched.update(pred[lo:lo + 4], gt[lo:lo + 4])
    left.update(pred[:2], gt[:2])
    right.update(pred[2:], gt[2:])
    left.merge(right.state())
    for acc in (batched, left):
        np.testing.assert_allclose(acc.per_class(), whole.per_class())
        assert acc.weighted([1, 2, 3, 4]) == pytest.approx(whole.weighted([1, 2, 3, 4]))


def test_weighted_normalises_the_weights():
    pred, gt = random_labels(2)
    acc = DiceAccumulator(4)
    acc.update(pred, gt)
    dice = numpy_dice(pred, gt, 4)
    assert acc.weighted([2, 0, 1, 1]) == pytest.approx((2 * dice[0] + dice[2] + dice[3]) / 4)
    assert acc.weighted() == pytest.approx(dice.mean())
    with pytest.raises(ValueError, match="weights must be 4"):
        acc.weighted([1, 1])


def test_class_weights():
    pixels = np.array([900, 0, 60, 40])
    freq = pixels / pixels.sum()
    expected = np.array([1 / freq[0], 0, 1 / freq[2], 1 / freq[3]])
    weights = class_weights(pixels)
    np.testing.assert_allclose(weights, expected / expected.sum())
    assert weights[1] == 0 and weights.sum() == pytest.approx(1)
    with pytest.raises(ValueError):
        class_weights([0, 0])


def test_soft_loss_equals_hard_dice_on_one_hot():
    pred, gt = random_labels(3)
    weights = class_weights([10, 3, 2, 1])
    probs = F.one_hot(torch.from_numpy(pred).long(), 4).movedim(-1, 1).double()
    onehot = F.one_hot(torch.from_numpy(gt).long(), 4).movedim(-1, 1)
    hard = DiceAccumulator(4)
    hard.update(pred, gt)
    assert soft_dice_loss(probs, onehot, weights).item() == pytest.approx(1 - hard.weighted(weights))
    soft = DiceAccumulator(4)
    soft.update(probs, gt)  # probabilities take the soft path and, being one-hot, give the hard result
    np.testing.assert_allclose(soft.per_class(), hard.per_class())


def test_soft_loss_gradient_flows():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    onehot = F.one_hot(torch.randint(0, 3, (2, 8, 8)), 3).movedim(-1, 1)
    loss = soft_dice_loss(logits.softmax(1), onehot, torch.tensor([0.2, 0.3, 0.5]))
    loss.backward()
    assert 0 < loss.item() < 1
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_report():
    pred, gt = random_labels(4, shape=(70, 6, 6))  # more rows than one accumulation batch
    report = dice_report(pred, gt, 4)
    assert report.keys() == {"per_class", "weighted", "weights"}
    np.testing.assert_allclose(report["per_class"], numpy_dice(pred, gt, 4))
    assert report["weights"] == [0.25] * 4
    assert report["weighted"] == pytest.approx(np.mean(report["per_class"]))
    single = dice_report(pred[0], gt[0], 4, weights=[1, 1, 0, 0])
    assert single["weighted"] == pytest.approx(numpy_dice(pred[0], gt[0], 4)[:2].mean())
    with pytest.raises(ValueError, match="differ in shape"):
        dice_report(pred[:2], gt[:3], 4)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        dice_report(pred, gt, 3)


def test_a_non_finite_sum_gives_a_non_finite_dice_not_a_perfect_score():
    # a diverged U-Net's softmax sums are NaN; Dice 1 there would read as a perfect loss of 0 and hide the divergence
    intersection = torch.tensor([1.0, float("nan"), 0.0])
    total = torch.tensor([4.0, float("nan"), 0.0])
    dice = dice_from_sums(intersection, total)
    assert dice[0] == 0.5 and torch.isnan(dice[1]) and dice[2] == 1.0
