"""Lossless greyscale PNG export with pypng: uint16 MR and uint8 masks, each file written atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import png

from toolkit.atomic import write_bytes


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a 2-D uint8 or uint16 array (16-bit rows are packed big-endian, as PNG requires)."""
    if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"PNG export takes 2-D uint8/uint16 arrays, got {array.dtype} {array.shape}")
    height, width = array.shape
    bitdepth = array.dtype.itemsize * 8
    rows = np.ascontiguousarray(array.astype(">u2") if bitdepth == 16 else array).view(np.uint8)
    buffer = io.BytesIO()
    png.Writer(width, height, greyscale=True, bitdepth=bitdepth).write_packed(buffer, rows.reshape(height, -1))
    return buffer.getvalue()


def write_png(path: Path, array: np.ndarray) -> None:
    """Atomically write ``array`` as a greyscale PNG."""
    write_bytes(path, encode_png(array))


def read_png(path: Path) -> np.ndarray:
    """A greyscale PNG as uint8 or uint16, exactly as written."""
    width, height, rows, info = png.Reader(filename=str(path)).read()
    if info["planes"] != 1:
        raise ValueError(f"{path}: expected a greyscale PNG, got {info['planes']} planes")
    dtype = np.uint16 if info["bitdepth"] > 8 else np.uint8
    return np.vstack([np.asarray(row, dtype=dtype) for row in rows]).reshape(height, width)


def png_name(subject: str, slice_index: int) -> str:
    """File name of one slice: ``<subject>_s<slice:03d>.png``; synthetic rows (slice −1) are ``<subject>.png``."""
    return f"{subject}.png" if slice_index < 0 else f"{subject}_s{slice_index:03d}.png"
