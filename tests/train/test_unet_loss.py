"""The U-Net's training loss: the weighted soft Dice plus the optional cross-entropy term, and its reduction over the
global batch (what lets 2 ranks × 4 slices train like 1 process × 8)."""

import torch
import torch.nn.functional as F

from toolkit.metrics.dice import dice_from_sums, soft_sums
from toolkit.train.unet import training_loss


def _batch(n, classes=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, size, size, generator=g)
    target = torch.randint(0, classes, (n, size, size), generator=g)
    return logits, target, F.one_hot(target, classes).permute(0, 3, 1, 2).float()


def test_cross_entropy_term_adds_ce_weight_times_the_mean_pixel_cross_entropy():
    logits, target, onehot = _batch(5)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    probs = logits.softmax(1)
    dice = training_loss(probs, onehot, weights, 0.0, lambda t: t)
    intersection, total = soft_sums(probs, onehot)
    assert torch.allclose(dice, 1 - (weights * dice_from_sums(intersection, total)).sum())
    both = training_loss(probs, onehot, weights, 0.5, lambda t: t)
    assert torch.allclose(both, dice + 0.5 * F.cross_entropy(logits, target), atol=1e-6)


def test_two_unequal_shards_reduced_globally_give_the_whole_batchs_loss_and_gradient():
    """Shards of 3 and 5 slices (a per-shard mean would weigh them differently): the first shard's loss, with the
    second's sums added in as an all-reduce would, equals the loss of all 8, and so does its gradient."""
    logits, _, onehot = _batch(8, seed=1)
    weights = torch.tensor([0.4, 0.3, 0.2, 0.1])
    whole = logits.clone().requires_grad_()
    expected = training_loss(whole.softmax(1), onehot, weights, 0.7, lambda t: t)
    expected.backward()
    others = []
    training_loss(logits[3:].softmax(1), onehot[3:], weights, 0.7, lambda t: others.append(t.detach()) or t)
    shard = logits[:3].clone().requires_grad_()
    reduced = iter(others)
    loss = training_loss(shard.softmax(1), onehot[:3], weights, 0.7, lambda t: t + next(reduced))
    loss.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(shard.grad, whole.grad[:3], atol=1e-7)
    assert not torch.allclose(training_loss(logits[:3].softmax(1), onehot[:3], weights, 0.7, lambda t: t), expected)
