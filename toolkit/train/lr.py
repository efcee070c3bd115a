"""Learning-rate schedules as pure functions of the epoch: a resumed run sets the same rate from the epoch alone, so
checkpoints need nothing extra."""

from __future__ import annotations

import torch


def linear_decay(epoch: int, epochs: int, decay_epochs: int) -> float:
    """The official SPADE schedule: factor 1 until the last ``decay_epochs`` of ``epochs``, then 1 − k / decay_epochs
    in the k-th of them (so the last epoch trains at 1 / decay_epochs of the rate); 1 throughout when
    ``decay_epochs`` is 0."""
    return 1.0 if decay_epochs <= 0 else 1.0 - max(0, epoch - (epochs - decay_epochs)) / decay_epochs


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group of ``optimizer`` at ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr
