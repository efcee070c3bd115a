"""Axial slice bins: the labels of the slice-position-conditioned PGAN and the groups of per-bin statistics.

``SliceBins(count, lo, hi)`` cuts the slice indices [lo, hi) into ``count`` equal-width ranges (the paper's proposal:
e.g. 31 ranges of 5 of BraTS's 155 slices); ``lo``/``hi`` are taken from the training masks' slice indices
(:meth:`SliceBins.spanning`), so empty end slices, which the PGAN never sees, get no bin. A generated mask records its
bin as the bin's centre slice in the store's ``slice`` field (:meth:`centre`), so :meth:`of` maps real and generated
rows alike back to their bin; a store's manifest provenance holds the bins as ``slice_bins`` (:meth:`to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SliceBins:
    """``count`` equal-width bins over the slice indices [lo, hi)."""

    count: int
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"slice bins: expected at least one bin, got {self.count}")
        if self.hi - self.lo < self.count:
            raise ValueError(f"slice bins: {self.count} bins do not fit into slices [{self.lo}, {self.hi})")

    @classmethod
    def spanning(cls, count: int, slices: np.ndarray) -> SliceBins:
        """``count`` bins over the range of ``slices`` (the training masks' slice indices)."""
        slices = np.asarray(slices)
        if not len(slices) or slices.min() < 0:
            raise ValueError("slice bins need the slice index of every training mask (none is given, or one is < 0)")
        return cls(count, int(slices.min()), int(slices.max()) + 1)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SliceBins:
        return cls(int(doc["count"]), int(doc["lo"]), int(doc["hi"]))

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def of(self, slices: np.ndarray) -> np.ndarray:
        """The bin (int64) of each slice index; indices outside [lo, hi) go to the nearest end bin."""
        scaled = (np.asarray(slices, dtype=np.int64) - self.lo) * self.count // (self.hi - self.lo)
        return np.clip(scaled, 0, self.count - 1)

    def centre(self, bins: np.ndarray) -> np.ndarray:
        """The slice index (int64) a generated mask of each bin records: the middle of the bin's range, which
        :meth:`of` maps back to the bin."""
        bins = np.asarray(bins, dtype=np.int64)
        first = self.lo - (-bins * (self.hi - self.lo) // self.count)  # ceil: the first index of each bin
        last = self.lo - (-(bins + 1) * (self.hi - self.lo) // self.count) - 1
        return (first + last) // 2
