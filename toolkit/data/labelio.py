"""Loading label arrays for the ``dice`` command: ``.npy``, ``.png``, ``.nii``/``.nii.gz`` files and store directories.

Every loader returns a non-negative integer array as stored in the file (no view mapping, except for stores when
``classes`` is given); any problem raises :class:`LabelIOError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from toolkit.data.labels import to_view
from toolkit.data.png import read_png
from toolkit.data.store import Store, StoreError


class LabelIOError(ValueError):
    """A label file is missing, unreadable, of an unknown type, or holds non-label values; the message names it."""


def _load_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _load_nifti(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


_LOADERS: dict[str, Callable[[Path], np.ndarray]] = {
    ".npy": _load_npy,
    ".png": read_png,
    ".nii": _load_nifti,
    ".nii.gz": _load_nifti,
}


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def _as_labels(array: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels from ``array``; floats are accepted only when every value is a whole number (NIfTI often)."""
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise LabelIOError(f"{path}: holds non-integer values; expected class labels")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iub":
        raise LabelIOError(f"{path}: dtype {array.dtype} is not a label type")
    if array.size and array.min() < 0:
        raise LabelIOError(f"{path}: holds negative values; expected class labels")
    return array


def load_labels(path: str | os.PathLike[str], split: str = "test", classes: int | None = None) -> np.ndarray:
    """Load a label array from ``path``: a ``.npy``/``.png``/``.nii``/``.nii.gz`` file or a store directory.

    For a store, the rows of ``split`` are returned ([n,S,S] uint8), mapped to the ``classes``-class view when
    ``classes`` is given (e.g. 4 for a 7-class store). For files, ``classes`` only checks that every label is below it.
    """
    path = Path(path)
    if path.is_dir():
        try:
            store = Store(path)
            labels = store.read(split)["label"]
        except StoreError as err:
            raise LabelIOError(str(err)) from err
        return labels if classes is None else to_view(labels, store.manifest.classes, classes)
    loader = _LOADERS.get(_suffix(path))
    if loader is None:
        raise LabelIOError(f"{path}: unknown label file type (expected {', '.join(_LOADERS)} or a store directory)")
    if not path.exists():
        raise LabelIOError(f"{path}: no such file")
    try:
        labels = _as_labels(loader(path), path)
    except LabelIOError:
        raise
    except Exception as err:  # each reader raises its own exception types for a corrupt file
        raise LabelIOError(f"{path}: cannot read ({type(err).__name__}: {err})") from err
    if classes is not None and labels.size and labels.max() >= classes:
        raise LabelIOError(f"{path}: holds label {labels.max()}, not a {classes}-class label array")
    return labels
