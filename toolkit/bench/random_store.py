"""Throw-away stores of random but plausible slices, for benchmarks and checks that need a store of a given size fast.

Each slice is a "brain": concentric rings of the 7 classes (tumour core, rim, oedema, tissues, background) around a
random centre and scale, and an image of per-class intensities with Gaussian noise (one channel per modality asked
for, each with its own contrast). So every class is present, the
U-Net's class weights are finite, and the shards compress and decode like real ones (pure noise would not), without
the minutes of preparing a phantom cohort at 256².
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.data.store import StoreWriter

# Ring k (from the centre outwards) gets class RING_CLASSES[k]; the last ring reaches the image border.
RING_CLASSES = np.array([3, 1, 2, 6, 5, 4, 0], dtype=np.uint8)
RING_EDGES = np.array([0.08, 0.14, 0.24, 0.40, 0.55, 0.70])  # outer radii as fractions of the image side
# intensity per class and modality (any other modality gets FLAIR's)
CONTRASTS = {"t1ce": np.array([0, 2600, 1900, 3100, 1200, 1600, 800], dtype=np.float32),
             "flair": np.array([0, 1900, 3400, 2300, 1100, 1500, 400], dtype=np.float32)}
NOISE = 120.0


def random_slices(rng: np.random.Generator, n: int, size: int,
                  modalities: tuple[str, ...] = ("t1ce",)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (uint16 image, uint8 label) slices of ``size``²: label [n, size, size], image the same for one
    modality, else [n, C, size, size] (the store's layouts)."""
    grid = np.arange(size, dtype=np.float32) / size
    centre = rng.uniform(0.35, 0.65, (n, 2, 1, 1)).astype(np.float32)
    scale = rng.uniform(0.6, 1.1, (n, 1, 1)).astype(np.float32)
    radius = np.hypot(grid[None, :, None] - centre[:, 0], grid[None, None, :] - centre[:, 1]) / scale
    label = RING_CLASSES[np.searchsorted(RING_EDGES, radius)]
    means = [CONTRASTS.get(m, CONTRASTS["flair"]) for m in modalities]
    image = np.stack([mean[label] + rng.normal(0.0, NOISE, label.shape).astype(np.float32) for mean in means], 1)
    image = np.clip(image, 0, 65535).astype(np.uint16)
    return (image[:, 0] if len(modalities) == 1 else image), label


def write_random_store(root: Path, *, size: int, rows: dict[str, int], classes: int = 7, seed: int = 0,
                       shard_size: int = 128, modalities: tuple[str, ...] = ("t1ce",)) -> Path:
    """A complete real-kind store at ``root`` with ``rows[split]`` slices per split, one image channel per modality;
    returns ``root``."""
    if classes != len(RING_CLASSES):
        raise ValueError(f"random stores have {len(RING_CLASSES)} classes, not {classes}")
    rng = np.random.default_rng(seed)
    writer = StoreWriter(Path(root), classes=classes)
    shard_counts = {}
    for split, n in rows.items():
        starts = range(0, n, shard_size)
        for index, start in enumerate(starts):
            count = min(shard_size, n - start)
            image, label = random_slices(rng, count, size, modalities)
            writer.write(split, index, label=label, image=image, subject=[f"random-{split}"] * count,
                         slice_index=np.arange(start, start + count))
        shard_counts[split] = len(starts)
    writer.finish(kind="real", image_size=size, has_image=True, shard_counts=shard_counts,
                  modality=",".join(modalities))
    return Path(root)
