"""The training data path of the trainers that make passes over a dataset (U-Net, SPADE): one DataLoader per run.

The DataLoader is built once and re-armed for every epoch: its batch sampler, :class:`EpochBatches`, is told the
epoch and the start batch (it runs in the main process, so workers need not be restarted), and with ``workers`` > 0
the workers persist across epochs and prefetch. Batches travel as the stored uint16 images / uint8 labels, in pinned
memory when the run is on a GPU, and :func:`to_device` converts them there (``non_blocking`` only for pinned
memory, where it is truly asynchronous).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from toolkit.data.dataset import SliceDataset
from toolkit.train.sampling import rank_batches


class EpochBatches(Sampler[list[int]]):
    """This rank's batches of one epoch from a start batch (see :func:`toolkit.train.sampling.rank_batches`)."""

    def __init__(self, n: int, batch: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch, self.seed, self.rank, self.world_size = n, batch, seed, rank, world_size
        self._batches: list[list[int]] = []

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self._batches = rank_batches(self.n, self.batch, seed=self.seed, epoch=epoch, start=start, rank=self.rank,
                                     world_size=self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def loader(dataset: SliceDataset, batches: Iterable[list[int]], *, workers: int, device: torch.device,
           prefetch: int = 4) -> DataLoader:
    """A DataLoader of ``dataset`` serving ``batches`` (lists of rows) for a run on ``device``: stored types, pinned
    for a GPU, persistent prefetching workers when ``workers`` > 0."""
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=SliceDataset.collate,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                      prefetch_factor=prefetch if workers > 0 else None)


class EpochLoader:
    """A dataset's batches, epoch by epoch, through one long-lived DataLoader."""

    def __init__(self, dataset: SliceDataset, batches: EpochBatches, *, workers: int, device: torch.device) -> None:
        self.batches = batches
        self.loader = loader(dataset, batches, workers=workers, device=device)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` from batch ``start`` on."""
        self.batches.set_epoch(epoch, start)
        return iter(self.loader) if len(self.batches) else iter(())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(image float32 [N,1,S,S] or None for mask-only batches, label int64 [N,S,S]) of a loader batch, on ``device``.

    The conversions run after the copy, on the device; the copy is asynchronous when the batch is pinned.
    """
    label = batch["label"]
    label = label.to(device, non_blocking=label.is_pinned()).long()
    image = batch.get("image")
    if image is not None:
        image = image.to(device, non_blocking=image.is_pinned()).float()
    return image, label
