"""Axial slicing of a volume into square 2-D slices: zero padding to the canvas, optional downsampling, uint16 MR.

A volume indexed ``[x, y, z]`` becomes ``[z, y, x]`` slices (rows follow the y axis, so anterior is at the top for
BraTS' affine). Slices are zero-padded centrally to a power-of-two canvas (240 → 256). Sizes below the canvas are
reached by block reduction: the block mean for MR (then rounded) and the block majority for masks (ties go to the lower
class), so the CPU demo can run at 64² or 128² from the same cohort.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

UINT16_MAX = np.iinfo(np.uint16).max


def to_uint16(volume: np.ndarray, source: Path) -> np.ndarray:
    """Round MR intensities to uint16; negatives are clipped to 0, a maximum over 65535 is rescaled; both warn."""
    data = np.asarray(volume)
    if data.dtype == np.uint16:
        return data
    data = data.astype(np.float64, copy=False)
    low = data < 0
    if low.any():
        log.warning("%s: %d negative voxel values clipped to 0 (uint16 store)", source, int(low.sum()))
        data = np.where(low, 0.0, data)
    peak = float(data.max())
    if peak > UINT16_MAX:
        log.warning("%s: maximum %.6g exceeds 65535; intensities rescaled by %.6g to fit uint16",
                    source, peak, UINT16_MAX / peak)
        data = data * (UINT16_MAX / peak)
    return np.rint(data).astype(np.uint16)


def canvas_size(height: int, width: int, size: int) -> int:
    """The padded square side: ``size`` when it holds the slice, else the next power of two that does."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"--size must be a power of two, got {size}")
    side = max(height, width)
    if size >= side:
        return size
    return 1 << (side - 1).bit_length()


def axial_slices(volume: np.ndarray, size: int, *, labels: bool, classes: int = 7) -> np.ndarray:
    """All axial slices of ``volume`` [x, y, z] as ``[z, size, size]``, padded and (if needed) block-reduced."""
    slices = np.ascontiguousarray(np.transpose(volume, (2, 1, 0)))
    depth, height, width = slices.shape
    canvas = canvas_size(height, width, size)
    top, left = (canvas - height) // 2, (canvas - width) // 2
    padded = np.zeros((depth, canvas, canvas), dtype=slices.dtype)
    padded[:, top:top + height, left:left + width] = slices
    if canvas == size:
        return padded
    factor = canvas // size
    blocks = padded.reshape(depth, size, factor, size, factor)
    if not labels:
        return np.rint(blocks.mean(axis=(2, 4))).astype(padded.dtype)
    # Majority vote per block: count each class in one pass, then argmax (first maximum = lower class on ties).
    counts = np.stack([(blocks == c).sum(axis=(2, 4), dtype=np.int32) for c in range(classes)], axis=-1)
    return counts.argmax(axis=-1).astype(np.uint8)
