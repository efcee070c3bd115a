"""Axial slicing of a volume into square 2-D slices: orientation, zero padding to the canvas, optional downsampling,
uint16 MR.

Slices are axial because BraTS stores its volumes with voxel axes L, P, S (``nibabel.aff2axcodes`` of its affine
``diag(-1, -1, 1)``): the third axis runs inferior → superior. A volume stored otherwise (RAS, LAS, sagittal or coronal
slabs, axes permuted) is first put into that layout by :func:`to_brats_orientation` — flips and axis permutations
read from the affine, no resampling — so any orientation of one subject gives the same slices, and a BraTS-oriented
volume passes through untouched (its store is byte for byte what it was before orientation was handled).

A volume indexed ``[x, y, z]`` becomes ``[z, y, x]`` slices (rows follow the y axis, so anterior is at the top for
BraTS' affine). Slices are zero-padded centrally to a power-of-two canvas (240 → 256). Sizes below the canvas are
reached by block reduction: the block mean for MR (then rounded) and the block majority for masks (ties go to the lower
class), so the CPU demo can run at 64² or 128² from the same cohort.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

log = logging.getLogger(__name__)

UINT16_MAX = np.iinfo(np.uint16).max
BRATS_AXCODES = ("L", "P", "S")  # BraTS' voxel axes: x toward the left, y toward posterior, z toward superior


def axis_codes(affine: np.ndarray) -> str:
    """The directions the voxel axes of ``affine`` point to, e.g. ``"LPS"`` for BraTS or ``"RAS"``; ValueError when
    an axis has no direction (a singular affine)."""
    codes = nib.aff2axcodes(np.asarray(affine))
    if None in codes:
        raise ValueError(f"the affine gives voxel axes no clear direction (axis codes {codes})")
    return "".join(codes)


def to_brats_orientation(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` (3-D, or with trailing channel axes) with its first three axes flipped and permuted from the layout
    ``affine`` gives them into BraTS' L, P, S layout; returned as is when it is in that layout already."""
    source = orientations.io_orientation(np.asarray(affine))
    if np.isnan(source).any():
        raise ValueError("the affine gives voxel axes no clear direction")
    transform = orientations.ornt_transform(source, orientations.axcodes2ornt(BRATS_AXCODES))
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return volume
    return orientations.apply_orientation(volume, transform)


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
