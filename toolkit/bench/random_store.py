"""Throw-away stores of random but plausible slices, for benchmarks and checks that need a store of a given size fast.

Each slice is a "brain": concentric rings of the 7 classes (tumour core, rim, oedema, tissues, background) around a
random centre and scale, and an image of per-class intensities with Gaussian noise. So every class is present, the
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
CLASS_MEAN = np.array([0, 2600, 1900, 3100, 1200, 1600, 800], dtype=np.float32)  # intensity per class
NOISE = 120.0


def random_slices(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (uint16 image, uint8 label) slices of ``size``², both [n, size, size]."""
    grid = np.arange(size, dtype=np.float32) / size
    centre = rng.uniform(0.35, 0.65, (n, 2, 1, 1)).astype(np.float32)
    scale = rng.uniform(0.6, 1.1, (n, 1, 1)).astype(np.float32)
    radius = np.hypot(grid[None, :, None] - centre[:, 0], grid[None, None, :] - centre[:, 1]) / scale
    label = RING_CLASSES[np.searchsorted(RING_EDGES, radius)]
    image = CLASS_MEAN[label] + rng.normal(0.0, NOISE, label.shape).astype(np.float32)
    return np.clip(image, 0, 65535).astype(np.uint16), label


def write_random_store(root: Path, *, size: int, rows: dict[str, int], classes: int = 7, seed: int = 0,
                       shard_size: int = 128) -> Path:
    """A complete real-kind store at ``root`` with ``rows[split]`` slices per split; returns ``root``."""
    if classes != len(CLASS_MEAN):
        raise ValueError(f"random stores have {len(CLASS_MEAN)} classes, not {classes}")
    rng = np.random.default_rng(seed)
    writer = StoreWriter(Path(root), classes=classes)
    shard_counts = {}
    for split, n in rows.items():
        starts = range(0, n, shard_size)
        for index, start in enumerate(starts):
            count = min(shard_size, n - start)
            image, label = random_slices(rng, count, size)
            writer.write(split, index, label=label, image=image, subject=[f"random-{split}"] * count,
                         slice_index=np.arange(start, start + count))
        shard_counts[split] = len(starts)
    writer.finish(kind="real", image_size=size, has_image=True, shard_counts=shard_counts)
    return Path(root)
