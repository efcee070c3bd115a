"""BraTS cohort discovery and NIfTI validation.

A subject is a folder whose NIfTI files are named ``<folder>_<suffix>.nii[.gz]`` (BraTS 2018–2021) or
``<folder>-<suffix>.nii[.gz]`` (BraTS 2023). Suffixes of all those releases map onto one vocabulary: t1, t1ce, t2,
flair, seg, plus ``fast_seg`` for an FSL FAST tissue segmentation placed beside the volumes.

Validation is strict and names the file: readable, 3-D, the same shape and affine as the subject's other volumes, finite
values, seg labels ⊆ {0, 1, 2, 4}, FAST labels ⊆ {0, 1, 2, 3}. Only the volumes a run needs are read in full; the
headers of the other modalities present are still checked for shape and affine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from toolkit.data.labels import BRATS_LABELS, FAST_LABELS

MODALITIES = ("t1", "t1ce", "t2", "flair")
_ALIASES = {
    "t1": "t1", "t1n": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
    "seg": "seg",
    "fast_seg": "fast", "fastseg": "fast",
}
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)


class NiftiError(Exception):
    """A subject's file is missing or invalid; ``file`` names it and the message says what is wrong."""

    def __init__(self, file: Path, problem: str) -> None:
        super().__init__(f"{file}: {problem}")
        self.file = Path(file)
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # Rebuild from (file, problem) when the error crosses a process boundary (worker pools).
        return (type(self), (self.file, self.problem))


@dataclass(frozen=True)
class Subject:
    """One discovered subject: its name, folder and files by role (t1, t1ce, t2, flair, seg, fast)."""

    name: str
    folder: Path
    files: dict[str, Path]

    def path(self, role: str) -> Path:
        """The file of ``role``, or a NiftiError naming the expected path."""
        if role not in self.files:
            expected = self.folder / f"{self.name}_{role}.nii.gz"
            raise NiftiError(expected, f"missing {role} volume for subject {self.name}")
        return self.files[role]


@dataclass(frozen=True)
class Volume:
    """A validated volume: data (as stored on disk, not rescaled) and the affine it shares with its subject."""

    data: np.ndarray
    affine: np.ndarray
    file: Path


def discover(src: Path) -> list[Subject]:
    """All subjects under ``src`` (any depth, e.g. HGG/ and LGG/ folders, symlinked folders followed), sorted by name.

    Raises NiftiError when ``src`` does not exist or holds no subject.
    """
    src = Path(src)
    if not src.is_dir():
        raise NiftiError(src, "no such directory")
    found: dict[Path, dict[str, Path]] = {}
    for path in _nifti_files(src):
        match = _NIFTI.match(path.name)
        folder = path.parent.name
        if not match or not path.is_file():
            continue
        stem = match["stem"]
        if stem.startswith(folder) and len(stem) > len(folder) + 1 and stem[len(folder)] in "_-":
            role = _ALIASES.get(stem[len(folder) + 1:].lower())
            if role:
                found.setdefault(path.parent, {})[role] = path
    subjects = [Subject(name=folder.name, folder=folder, files=files) for folder, files in found.items()]
    if not subjects:
        raise NiftiError(src, "no BraTS subjects found (expected folders like Brats18_X_1/ holding "
                              "Brats18_X_1_t1.nii.gz, …_t1ce, …_t2, …_flair, …_seg)")
    names = [s.name for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise NiftiError(src, f"subject names occur in more than one folder: {duplicates}")
    return sorted(subjects, key=lambda s: s.name)


def _nifti_files(src: Path) -> Iterator[Path]:
    """Every ``*.nii*`` file under ``src`` in sorted order, following symlinked folders (a cohort assembled from links
    to subject folders elsewhere); each real folder is walked once, so a symlink loop, or two links to one folder,
    neither hangs nor yields a subject twice."""
    seen: set[str] = set()
    for root, dirs, files in os.walk(src, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        yield from (Path(root) / name for name in sorted(files) if _NIFTI.match(name))


def _header(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises several types for a damaged header
        raise NiftiError(path, f"unreadable NIfTI header ({err})") from None
    if len(img.shape) != 3:
        raise NiftiError(path, f"expected a 3-D volume, got shape {img.shape}")
    return img


def _check_geometry(img: nib.Nifti1Image, path: Path, reference: tuple[tuple[int, ...], np.ndarray] | None) -> None:
    if reference is None:
        return
    shape, affine = reference
    if img.shape != shape:
        raise NiftiError(path, f"shape {img.shape} differs from the subject's other volumes {shape}")
    if not np.allclose(img.affine, affine, atol=1e-3):
        raise NiftiError(path, "affine differs from the subject's other volumes")


def load_subject(subject: Subject, roles: list[str]) -> dict[str, Volume]:
    """Read and validate the volumes of ``roles``; check the headers of every other file of the subject.

    Raises NiftiError naming the first bad file.
    """
    headers = {role: _header(subject.path(role)) for role in roles}
    headers.update({role: _header(path) for role, path in subject.files.items() if role not in headers})
    first = headers[roles[0]]
    reference = (first.shape, first.affine)
    for role, img in headers.items():
        _check_geometry(img, subject.files[role], reference)
    return {role: _read(subject.files[role], headers[role], role) for role in roles}


def _read(path: Path, img: nib.Nifti1Image, role: str) -> Volume:
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # truncated gzip streams raise EOFError, zlib.error or OSError
        raise NiftiError(path, f"unreadable image data ({type(err).__name__}: {err})") from None
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise NiftiError(path, f"{bad} non-finite voxel values (NaN or Inf)")
    if role in ("seg", "fast"):
        allowed = BRATS_LABELS if role == "seg" else FAST_LABELS
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            raise NiftiError(path, "label volume holds non-integer values")
        present = set(np.unique(data).astype(int).tolist())
        if not present <= allowed:
            raise NiftiError(path, f"labels {sorted(present - allowed)} not allowed (expected ⊆ {sorted(allowed)})")
        data = data.astype(np.uint8)
    return Volume(data=data, affine=np.asarray(img.affine), file=path)
