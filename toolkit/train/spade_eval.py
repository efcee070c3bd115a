"""What SPADE's end-of-epoch evaluation is measured on and against: the class-mean baseline, the validation rows the
sample grid shows, and image-metric sums over validation pairs that ranks combine by summing.

The baseline paints every mask class with its mean training intensity: an image that knows the mask and nothing
else, which a generator that learned texture, edges and tumour appearance must beat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from toolkit.data.dataset import SliceDataset, Source
from toolkit.metrics.image import l1, psnr, ssim
from toolkit.train.distributed import Dist
from toolkit.train.loader import loader, to_device

CHUNK = 64  # rows per read and per forward: bounds memory on any store size
METRICS = ("l1", "psnr", "ssim")


def chunks(rows: Sequence[int], size: int = CHUNK) -> list[list[int]]:
    """``rows`` in consecutive lists of at most ``size``."""
    return [list(rows[i:i + size]) for i in range(0, len(rows), size)]


def validation_loader(dataset: SliceDataset, dist: Dist, *, workers: int) -> DataLoader:
    """This rank's share of ``dataset`` (every ``world_size``-th row from its rank), in chunks, for ``dist.device``."""
    return loader(dataset, chunks(range(dist.rank, len(dataset), dist.world_size)), workers=workers,
                  device=dist.device)


def _batches(dataset: SliceDataset) -> Iterable[dict[str, torch.Tensor]]:
    """``dataset`` read in chunks of rows, in order."""
    for rows in chunks(range(len(dataset))):
        yield dataset.collate(dataset.__getitems__(rows))


def class_means(dataset: SliceDataset) -> np.ndarray:
    """Mean image intensity of every class of ``dataset``'s class view over its pairs, per image channel: float64
    ``[C, classes]`` in store units; 0 for a class with no pixels. Streamed in chunks of rows."""
    k = dataset.classes
    total, count = np.zeros((dataset.channels, k)), np.zeros(k, dtype=np.int64)
    for batch in _batches(dataset):
        label = batch["label"].numpy().ravel()
        for c, channel in enumerate(batch["image"].numpy().transpose(1, 0, 2, 3)):
            total[c] += np.bincount(label, weights=channel.ravel(), minlength=k)
        count += np.bincount(label, minlength=k)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def paint(means: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The baseline image [N, C, H, W] of labels [N, H, W]: each pixel of channel c its class's mean there
    (``means`` [C, classes] on the labels' device)."""
    return means[:, label.long()].transpose(0, 1)


def largest_brains(source: Source, classes: int, n: int) -> list[int]:
    """``n`` rows of ``source`` spread evenly over its larger half by brain area (non-background mask pixels), largest
    first (ties in row order): slices through ventricles, cortex and tumour rather than the small ones at the top and
    bottom of the brain, and not n neighbouring slices of one subject."""
    masks = SliceDataset([source], classes=classes, with_image=False)  # labels only: no image reads
    areas = np.concatenate([(batch["label"] != 0).flatten(1).sum(1).numpy() for batch in _batches(masks)])
    masks.close()
    larger = np.argsort(-areas, kind="stable")[:max(n, len(areas) // 2)]
    return larger[np.linspace(0, len(larger) - 1, min(n, len(larger))).round().astype(int)].tolist()


def metric_sums(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], data_range: float, device: torch.device,
                channels: int = 1) -> torch.Tensor:
    """Over (predicted, real) batches [N, C, H, W]: per channel, the sum of each per-image metric of
    :data:`METRICS` and the image count, as a float32 [C, 4] tensor on ``device`` (no host sync; zeros without
    pairs)."""
    total = torch.zeros(channels, len(METRICS) + 1, device=device)
    for predicted, real in pairs:
        n = predicted.shape[0]
        predicted, real = predicted.flatten(0, 1).unsqueeze(1), real.flatten(0, 1).unsqueeze(1)
        values = [l1(predicted, real), psnr(predicted, real, data_range), ssim(predicted, real, data_range)]
        total += torch.stack([*values, torch.ones_like(values[0])], 1).view(n, channels, -1).sum(0)
    return total


def metric_means(sums: torch.Tensor, prefix: str, modalities: Sequence[str] = ()) -> dict[str, float]:
    """``{prefix_metric: mean}`` over every image channel from (all-reduced) :func:`metric_sums` [C, 4], and with
    two or more ``modalities`` (one per channel) also ``{prefix_metric_<modality>: mean}`` (a host sync)."""
    rows = sums.tolist()
    named = [("", [sum(column) for column in zip(*rows)])]
    if len(modalities) > 1:
        named += [(f"_{modality}", row) for modality, row in zip(modalities, rows)]
    return {f"{prefix}_{name}{suffix}": value / row[-1] for suffix, row in named for name, value in zip(METRICS, row)}


def predicted_pairs(batches: Iterable[dict[str, torch.Tensor]], predict: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """(``predict(label)``, real image) for every loader batch, both on ``device``, in intensity units."""
    for batch in batches:
        image, label = to_device(batch, device)
        yield predict(label), image
