"""Dice: per-class sums that accumulate over batches (MONAI style), weighted Dice, class weights and the soft loss.

Everything is built on two per-class sums: the intersection ``I_c`` and ``T_c = |P_c| + |G_c|``. Then
``dice_c = 2 I_c / T_c``, and ``dice_c = 1`` when ``T_c = 0``: a class absent from both prediction and ground truth
is a perfect match (neither over- nor under-segmented). Weighted Dice is ``sum_c w_c dice_c`` with the weights
normalised to sum 1. Because an evaluation is "accumulate sums, then combine", the same two sums serve the metric over
a whole test set, the soft Dice loss on a batch, and (later) a cross-rank all-reduce of the accumulator's state.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = np.ndarray | torch.Tensor
_REPORT_BATCH = 64  # rows per update in dice_report, bounding the temporary memory on large label sets


def class_weights(class_pixels: ArrayLike) -> np.ndarray:
    """Inverse class-frequency weights normalised to sum 1: ``w_c = (1/f_c) / sum_k (1/f_k)`` over present classes.

    ``f_c`` is the class's share of all pixels; a class with no pixels (``f_c = 0``) gets weight 0 rather than an
    infinite one, so it neither dominates nor breaks the loss. (The ``dice`` command, given no training set to count
    pixels over, uses uniform weights instead; see :func:`dice_report`.)
    """
    pixels = np.asarray(class_pixels, dtype=np.float64)
    if pixels.ndim != 1 or pixels.sum() <= 0 or np.any(pixels < 0):
        raise ValueError(f"class_pixels must be a 1-D array of counts with a positive total, got {pixels}")
    freq = pixels / pixels.sum()
    inverse = np.divide(1.0, freq, out=np.zeros_like(freq), where=freq > 0)
    return inverse / inverse.sum()


def _normalised(weights: ArrayLike | None, classes: int) -> torch.Tensor:
    """Weights as a float64 tensor summing to 1; None means uniform."""
    if weights is None:
        return torch.full((classes,), 1.0 / classes, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (classes,) or torch.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be {classes} non-negative values with a positive sum, got {w.tolist()}")
    return w / w.sum()


def dice_from_sums(intersection: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """Per-class Dice ``2 I / T`` from the sums, 1 where ``T = 0`` (class absent in both); differentiable.

    A non-finite sum stays non-finite (``T == 0`` is false for NaN), so a diverged network shows as a NaN loss, which
    stops the run, rather than as a perfect score."""
    absent = total == 0
    return torch.where(absent, torch.ones_like(total),
                       2 * intersection / torch.where(absent, torch.ones_like(total), total))


def label_sums(pred: ArrayLike, gt: ArrayLike, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (intersection, |P|+|G|) of two label arrays of the same shape, as int64 tensors."""
    p = torch.as_tensor(pred).reshape(-1).long()
    g = torch.as_tensor(gt).reshape(-1).long()
    if p.shape != g.shape:
        raise ValueError(f"prediction and ground truth differ in size ({tuple(pred.shape)} vs {tuple(gt.shape)})")
    if p.numel() and (min(p.min(), g.min()) < 0 or max(p.max(), g.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{min(p.min(), g.min())}, "
                         f"{max(p.max(), g.max())}]")
    intersection = torch.bincount(g[p == g], minlength=classes)
    total = torch.bincount(p, minlength=classes) + torch.bincount(g, minlength=classes)
    return intersection, total


def soft_sums(probs: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (sum p·g, sum p + sum g) of probabilities and one-hot targets [N,C,...], differentiable."""
    if probs.shape != onehot.shape:
        raise ValueError(f"probs {tuple(probs.shape)} and onehot {tuple(onehot.shape)} differ in shape")
    dims = [d for d in range(probs.ndim) if d != 1]
    onehot = onehot.to(probs.dtype)
    return (probs * onehot).sum(dims), probs.sum(dims) + onehot.sum(dims)


def soft_dice_loss(probs: torch.Tensor, onehot: torch.Tensor, weights: ArrayLike | None = None) -> torch.Tensor:
    """``1 - weighted soft Dice`` of probabilities [N,C,H,W] against one-hot targets; uniform weights when None."""
    dice = dice_from_sums(*soft_sums(probs, onehot))
    w = _normalised(weights, probs.shape[1]).to(device=dice.device, dtype=dice.dtype)
    return 1 - (w * dice).sum()


class DiceAccumulator:
    """Accumulates per-class Dice sums over batches; combine with :meth:`per_class` or :meth:`weighted`.

    ``update(pred, gt)`` takes ground-truth labels and predictions either as labels of the same shape (hard Dice) or
    as probabilities [N,C,...] (soft Dice), numpy or torch. The state is two float64 arrays (:meth:`state`), so a
    cross-rank sync is one all-reduce (sum) of each, or :meth:`merge` of another accumulator's state.
    """

    def __init__(self, classes: int) -> None:
        self.classes = classes
        self.intersection = np.zeros(classes, dtype=np.float64)
        self.total = np.zeros(classes, dtype=np.float64)

    def update(self, pred: ArrayLike, gt: ArrayLike) -> None:
        """Add one batch: ``pred`` as labels shaped like ``gt``, or probabilities with a class axis 1."""
        pred_t, gt_t = torch.as_tensor(pred).detach().cpu(), torch.as_tensor(gt).detach().cpu()
        if pred_t.is_floating_point() and pred_t.ndim == gt_t.ndim + 1:
            if pred_t.shape[1] != self.classes:
                raise ValueError(f"probabilities have {pred_t.shape[1]} classes, the accumulator {self.classes}")
            onehot = F.one_hot(gt_t.long(), self.classes).movedim(-1, 1)
            intersection, total = soft_sums(pred_t.double(), onehot)
        else:
            intersection, total = label_sums(pred_t, gt_t, self.classes)
        self.merge((intersection.double().numpy(), total.double().numpy()))

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """The (intersection, |P|+|G|) arrays: what a cross-rank all-reduce sums."""
        return self.intersection, self.total

    def merge(self, state: tuple[ArrayLike, ArrayLike]) -> None:
        """Add another accumulator's :meth:`state`."""
        self.intersection = self.intersection + np.asarray(state[0], dtype=np.float64)
        self.total = self.total + np.asarray(state[1], dtype=np.float64)

    def per_class(self) -> np.ndarray:
        """Dice per class over everything accumulated (1 for classes absent in both)."""
        return dice_from_sums(torch.from_numpy(self.intersection), torch.from_numpy(self.total)).numpy()

    def weighted(self, weights: ArrayLike | None = None) -> float:
        """``sum_c w_c dice_c`` with ``weights`` normalised to sum 1; uniform when None."""
        return float((_normalised(weights, self.classes).numpy() * self.per_class()).sum())


def dice_report(pred: ArrayLike, gt: ArrayLike, classes: int, weights: ArrayLike | None = None) -> dict[str, Any]:
    """The ``dice`` command's JSON object (DESIGN §3): ``{"per_class", "weighted", "weights"}``.

    ``pred`` and ``gt`` are label arrays of the same shape (one image, a volume or a stack of slices); they are
    accumulated 64 rows of the first axis at a time. Weights default to uniform, since the command has no training
    set to derive inverse-frequency weights from; pass :func:`class_weights` of a store's pixel counts for those.
    """
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"prediction and ground truth differ in shape ({tuple(pred.shape)} vs {tuple(gt.shape)})")
    acc = DiceAccumulator(classes)
    stack_p, stack_g = (pred, gt) if pred.ndim > 2 else (pred[None], gt[None])
    for lo in range(0, len(stack_p), _REPORT_BATCH):
        acc.update(stack_p[lo:lo + _REPORT_BATCH], stack_g[lo:lo + _REPORT_BATCH])
    w = _normalised(weights, classes).numpy()
    return {"per_class": acc.per_class().tolist(), "weighted": acc.weighted(w), "weights": w.tolist()}
