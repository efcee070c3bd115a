"""Label schemes: the stored 7-class mask and the 4- and 2-class views derived from it on read.

Stored classes (uint8): 0 BG, 1 NCR/NET, 2 ED, 3 ET, 4 WM, 5 GM, 6 CSF. Tumour labels override tissue.
A store ingested with ``--tissue none`` holds the 4-class labels directly (classes = 4); its 2-class view derives the
same way. Views are lookup tables, so converting a batch is one fancy-indexing pass.

The numbers in a source segmentation mean what its release says (:data:`CONVENTIONS`):

- ``brats2018`` (BraTS 2018–2021): 1 NCR/NET, 2 ED, 4 ET;
- ``brats2023`` (BraTS 2023 and later: GLI, MET, PED, SSA, MEN): 1 NETC, 2 SNFH, 3 ET, and in the 2024 post-treatment
  glioma data 4 RC, the resection cavity: the number that means ET in 2018;
- ``msd`` (Medical Segmentation Decathlon Task01_BrainTumour): 1 edema, 2 non-enhancing tumour, 3 enhancing tumour.

A resection cavity is no tumour class of ours: its voxels take the tissue class underneath (background where the
tissue map has none), and the caller counts them (:func:`resection_cavity`).
"""

from __future__ import annotations

import numpy as np

CLASS_NAMES: dict[int, tuple[str, ...]] = {
    7: ("BG", "NCR/NET", "ED", "ET", "WM", "GM", "CSF"),
    4: ("BG", "NCR/NET", "ED", "ET"),
    2: ("BG", "tumour"),
}
BRATS_LABELS = frozenset({0, 1, 2, 4})
FAST_LABELS = frozenset({0, 1, 2, 3})  # FSL FAST: 0 outside, 1 CSF, 2 GM, 3 WM
RESECTION_CAVITY = 4  # in the brats2023 convention (BraTS 2024 post-treatment glioma)


def _table(pairs: dict[int, int]) -> np.ndarray:
    table = np.zeros(256, dtype=np.uint8)
    table[list(pairs)] = list(pairs.values())
    return table


# Source seg label -> stored tumour class, per convention (0 = no tumour: background, or RC, which takes the tissue).
# Labels outside a convention's set are rejected by validation before mapping.
_CONVENTION_TABLES: dict[str, np.ndarray] = {
    "brats2018": _table({1: 1, 2: 2, 4: 3}),
    "brats2023": _table({1: 1, 2: 2, 3: 3}),
    "msd": _table({1: 2, 2: 1, 3: 3}),
}
CONVENTIONS = tuple(_CONVENTION_TABLES)
# The labels each convention allows (validation refuses others, naming the file).
CONVENTION_LABELS: dict[str, frozenset[int]] = {
    "brats2018": BRATS_LABELS,
    "brats2023": frozenset({0, 1, 2, 3, RESECTION_CAVITY}),
    "msd": frozenset({0, 1, 2, 3}),
}
# FAST tissue label -> stored class.
_FAST_TO_CLASS = np.zeros(256, dtype=np.uint8)
_FAST_TO_CLASS[[1, 2, 3]] = [6, 5, 4]

# View tables indexed by stored class; 255 marks a class the stored scheme cannot hold.
_VIEWS: dict[tuple[int, int], np.ndarray] = {
    (7, 7): np.arange(7, dtype=np.uint8),
    (7, 4): np.array([0, 1, 2, 3, 0, 0, 0], dtype=np.uint8),
    (7, 2): np.array([0, 1, 1, 1, 0, 0, 0], dtype=np.uint8),
    (4, 4): np.arange(4, dtype=np.uint8),
    (4, 2): np.array([0, 1, 1, 1], dtype=np.uint8),
}


def tumour_classes(seg: np.ndarray, convention: str = "brats2018") -> np.ndarray:
    """The stored tumour class (1 NCR/NET, 2 ED, 3 ET; 0 elsewhere, resection cavity included) of each voxel of a
    source seg volume whose labels follow ``convention`` (one of :data:`CONVENTIONS`)."""
    try:
        table = _CONVENTION_TABLES[convention]
    except KeyError:
        raise ValueError(f"unknown label convention {convention!r} (expected one of {CONVENTIONS})") from None
    return table[seg.astype(np.uint8, copy=False)]


def resection_cavity(seg: np.ndarray, convention: str) -> np.ndarray:
    """Boolean mask of the resection-cavity voxels of ``seg`` (only the brats2023 convention has them)."""
    if convention != "brats2023":
        return np.zeros(seg.shape, dtype=bool)
    return seg == RESECTION_CAVITY


def compose_mask(seg: np.ndarray, tissue: np.ndarray | None, convention: str = "brats2018") -> np.ndarray:
    """Combine a seg volume (labels of ``convention``) and a FAST-convention tissue map into stored classes.

    With ``tissue=None`` the result is the 4-class scheme. Tumour voxels keep their tumour class whatever the tissue;
    resection-cavity voxels (brats2023 label 4) are no tumour, so they take the tissue class (or background).
    """
    mask = tumour_classes(seg, convention)
    if tissue is not None:
        tissue_class = _FAST_TO_CLASS[tissue.astype(np.uint8, copy=False)]
        mask = np.where(mask > 0, mask, tissue_class)
    return mask


def view_table(stored_classes: int, classes: int) -> np.ndarray:
    """Lookup table mapping stored class ids to the ``classes``-class view."""
    try:
        return _VIEWS[(stored_classes, classes)]
    except KeyError:
        raise ValueError(
            f"a {stored_classes}-class store has no {classes}-class view (available: "
            f"{sorted(c for s, c in _VIEWS if s == stored_classes)})"
        ) from None


def to_view(labels: np.ndarray, stored_classes: int, classes: int) -> np.ndarray:
    """Map stored labels to the ``classes``-class view (7, 4 or 2)."""
    return view_table(stored_classes, classes)[labels]


def reduce_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Label maps [n, S, S] → [n, size, size] as a mask GAN trained at ``size`` sees them and generates them: label
    values box-averaged over (S/size)² blocks, then rounded (half to even) to the nearest class, as generation rounds.
    """
    n, full = labels.shape[0], labels.shape[-1]
    if size == full:
        return labels
    if size > full or full % size:
        raise ValueError(f"cannot reduce {full}² masks to {size}²: the size must divide {full}")
    factor = full // size
    blocks = labels.reshape(n, size, factor, size, factor).mean(axis=(2, 4), dtype=np.float32)
    return np.round(blocks).astype(labels.dtype)
