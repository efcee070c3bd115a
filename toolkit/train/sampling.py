"""Epoch batch order shared by the trainers that make passes over a dataset (U-Net, SPADE).

The order of epoch ``e`` is a permutation drawn from (seed, e) alone, so a run resumed mid-epoch needs only the batch
index. Global batch ``b`` is ``perm[bB:(b+1)B]`` (the last partial batch is dropped); each of the ``world_size`` ranks
takes its equal, contiguous share, so R ranks × B/R rows see exactly the rows one process × B would.
"""

from __future__ import annotations

import torch


def epoch_seed(seed: int, index: int) -> int:
    """A generator seed for item ``index`` (an epoch, an iteration, a shard) of a run seeded with ``seed``."""
    return seed * 1_000_003 + index


def rank_batches(n: int, batch: int, *, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> list[list[int]]:
    """This rank's row indices for global batches ``start …`` of ``epoch`` over ``n`` rows."""
    if batch % world_size:
        raise ValueError(f"batch {batch} must be divisible by the {world_size} ranks")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()
    share = batch // world_size
    return [order[b * batch:(b + 1) * batch][rank * share:(rank + 1) * share] for b in range(start, n // batch)]
