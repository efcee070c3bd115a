"""Cohort discovery and NIfTI validation for the releases users have: BraTS 2018–2021, BraTS 2023+ and the Medical
Segmentation Decathlon's Task01_BrainTumour.

Layouts (:data:`LAYOUTS`; a subject's layout also names its label convention, see :mod:`toolkit.data.labels`):

- ``brats2018``: a subject is a folder whose NIfTI files are named ``<folder>_<suffix>.nii[.gz]`` with suffixes t1,
  t1ce, t2, flair, seg (BraTS 2018–2021, e.g. ``Brats18_TCIA01_131_1``, ``BraTS2021_00000``);
- ``brats2023``: ``<folder>-<suffix>.nii[.gz]`` with t1n, t1c, t2w, t2f, seg (``BraTS-GLI-00000-000``; also MET,
  PED, SSA, MEN and the 2024 post-treatment glioma data);
- ``msd``: a folder holding ``dataset.json`` (at SRC or one level below it), ``imagesTr/BRATS_NNN.nii.gz`` 4-D
  volumes whose channels its ``modality`` field names (FLAIR, T1w, t1gd, T2w) and ``labelsTr/BRATS_NNN.nii.gz``.
  Cases without a label (``imagesTs``, or an image ``labelsTr`` lacks) are listed in :attr:`Cohort.unlabelled`;
  the ``._*`` files of macOS archives are ignored.

All suffixes map onto one vocabulary: t1, t1ce, t2, flair, seg, plus ``fast_seg`` for an FSL FAST tissue segmentation
placed beside a BraTS subject's volumes.

Validation is strict and names the file: readable, 3-D (an MSD image: 4-D with one channel per ``modality`` entry), the
same shape and affine as the subject's other volumes, finite values, seg labels within the label convention in force,
FAST labels ⊆ {0, 1, 2, 3}. Only the volumes a run needs are read in full; the headers of the other files present are
still checked for shape and affine. Every volume read is put into BraTS' voxel layout
(:func:`toolkit.data.slicing.to_brats_orientation`), and :class:`Volume` records the axis codes it came in. The
Decathlon wrote BraTS' arrays under an identity affine (its images are LPS but their header says RAS), so an MSD volume
whose affine is exactly the identity is taken as BraTS-oriented (``Volume.identity_header``); any other affine is
trusted.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from toolkit.data.labels import CONVENTION_LABELS, CONVENTIONS, FAST_LABELS
from toolkit.data.slicing import BRATS_AXCODES, axis_codes, to_brats_orientation

MODALITIES = ("t1", "t1ce", "t2", "flair")
LAYOUTS = ("brats2018", "brats2023", "msd")
_ALIASES = {
    "t1": "t1", "t1n": "t1", "t1w": "t1",
    "t1ce": "t1ce", "t1c": "t1ce", "t1gd": "t1ce",
    "t2": "t2", "t2w": "t2",
    "flair": "flair", "t2f": "flair",
    "seg": "seg",
    "fast_seg": "fast", "fastseg": "fast",
}
_SUFFIXES_2023 = frozenset({"t1n", "t1c", "t2w", "t2f"})
_NIFTI = re.compile(r"^(?P<stem>.+?)\.nii(\.gz)?$", re.IGNORECASE)
MSD_META = "dataset.json"
# What Task01_BrainTumour's dataset.json calls its labels (compared in lower case, "oedema" accepted).
MSD_LABEL_NAMES = {"1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}


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
    """One discovered subject: its name, folder, files by role (t1, t1ce, t2, flair, seg, fast) and release layout.

    An MSD case's modality roles all name its 4-D image; ``channels`` gives each one's channel index.
    """

    name: str
    folder: Path
    files: dict[str, Path]
    layout: str = "brats2018"
    channels: dict[str, int] | None = None

    def path(self, role: str) -> Path:
        """The file of ``role``, or a NiftiError naming the expected path."""
        if role not in self.files:
            if self.layout == "msd" and role in MODALITIES:
                raise NiftiError(self.folder.parent / MSD_META, f"field 'modality' names no {role} channel")
            sep = "-" if self.layout == "brats2023" else "_"
            expected = self.folder / f"{self.name}{sep}{role}.nii.gz"
            raise NiftiError(expected, f"missing {role} volume for subject {self.name}")
        return self.files[role]


@dataclass(frozen=True)
class Volume:
    """A validated volume in BraTS' voxel layout: data (values as stored on disk, not rescaled), the affine of the
    file, and the axis codes the file stored it in (``orientation``, e.g. "LPS"; ``identity_header`` when an MSD
    identity affine was taken as BraTS' layout, see the module docstring)."""

    data: np.ndarray
    affine: np.ndarray
    file: Path
    orientation: str = "".join(BRATS_AXCODES)
    identity_header: bool = False

    @property
    def reoriented(self) -> bool:
        """Whether the data were flipped or permuted into BraTS' layout."""
        return not self.identity_header and self.orientation != "".join(BRATS_AXCODES)


@dataclass(frozen=True)
class Cohort:
    """Everything under a source folder: the subjects with labels, sorted by name, and the cases without labels
    (``{"subject", "file"}``, MSD only). ``label_names`` is an MSD dataset.json's ``labels`` field (``meta`` names
    that file)."""

    root: Path
    subjects: list[Subject]
    unlabelled: tuple[dict[str, str], ...] = ()
    label_names: dict[str, Any] | None = None
    meta: Path | None = None

    @property
    def layouts(self) -> list[str]:
        """The layouts its subjects come in, in :data:`LAYOUTS` order."""
        present = {s.layout for s in self.subjects}
        return [layout for layout in LAYOUTS if layout in present]


def discover(src: Path) -> list[Subject]:
    """All subjects with labels under ``src`` (:func:`discover_cohort`), sorted by name."""
    return discover_cohort(src).subjects


def discover_cohort(src: Path) -> Cohort:
    """All subjects under ``src``: BraTS subject folders at any depth (e.g. HGG/ and LGG/ folders, symlinked folders
    followed) and the cases of an MSD dataset (``dataset.json`` at ``src`` or one level below).

    Raises NiftiError when ``src`` does not exist or holds no subject, and naming the file and field of a bad
    dataset.json.
    """
    src = Path(src)
    if not src.is_dir():
        raise NiftiError(src, "no such directory")
    found: dict[Path, dict[str, Path]] = {}
    layout: dict[Path, str] = {}
    for path in _nifti_files(src):
        match = _NIFTI.match(path.name)
        folder = path.parent.name
        if not match or not path.is_file():
            continue
        stem = match["stem"]
        if stem.startswith(folder) and len(stem) > len(folder) + 1 and stem[len(folder)] in "_-":
            suffix = stem[len(folder) + 1:].lower()
            role = _ALIASES.get(suffix)
            if role:
                found.setdefault(path.parent, {})[role] = path
                if stem[len(folder)] == "-" or suffix in _SUFFIXES_2023:
                    layout[path.parent] = "brats2023"
    subjects = [Subject(name=folder.name, folder=folder, files=files, layout=layout.get(folder, "brats2018"))
                for folder, files in found.items()]
    unlabelled: tuple[dict[str, str], ...] = ()
    label_names, meta = None, None
    for root in _msd_roots(src):
        cases, missing, label_names = _msd_cases(root)
        subjects += cases
        unlabelled += missing
        meta = root / MSD_META
    if not subjects:
        raise NiftiError(src, "no BraTS subjects found (expected folders like Brats18_X_1/ holding "
                              "Brats18_X_1_t1.nii.gz, …_t1ce, …_t2, …_flair, …_seg, BraTS 2023 folders like "
                              "BraTS-GLI-00000-000/ holding …-t1n.nii.gz, …-t1c, …-t2w, …-t2f, …-seg, or a "
                              "Decathlon dataset.json with imagesTr/ and labelsTr/)")
    names = [s.name for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise NiftiError(src, f"subject names occur in more than one folder: {duplicates}")
    return Cohort(root=src, subjects=sorted(subjects, key=lambda s: s.name), unlabelled=unlabelled,
                  label_names=label_names, meta=meta)


def _msd_roots(src: Path) -> list[Path]:
    """The MSD dataset folders: ``src`` when it holds dataset.json, else its sub-folders that do."""
    if (src / MSD_META).is_file():
        return [src]
    return sorted(p.parent for p in src.glob(f"*/{MSD_META}") if p.is_file())


def _msd_cases(root: Path) -> tuple[list[Subject], tuple[dict[str, str], ...], dict[str, Any] | None]:
    """The labelled cases of the MSD dataset ``root``, its unlabelled ones, and its dataset.json ``labels``."""
    meta_path = root / MSD_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise NiftiError(meta_path, f"unreadable dataset.json ({err})") from None
    if not isinstance(meta, dict):
        raise NiftiError(meta_path, "expected a JSON object")
    channels = _msd_channels(meta, meta_path)
    pairs: list[tuple[Path, Path]] = []
    training = meta.get("training")
    if training is None:  # no list: pair imagesTr/X with labelsTr/X
        pairs = [(image, root / "labelsTr" / image.name) for image in _msd_images(root / "imagesTr")
                 if (root / "labelsTr" / image.name).is_file()]
    elif not isinstance(training, list):
        raise NiftiError(meta_path, f"field 'training' is {type(training).__name__}, expected a list")
    else:
        for index, entry in enumerate(training):
            where = f"training[{index}]"
            if not isinstance(entry, dict):
                raise NiftiError(meta_path, f"field '{where}' is not an object with 'image' and 'label'")
            files = []
            for key in ("image", "label"):
                if not isinstance(entry.get(key), str):
                    raise NiftiError(meta_path, f"field '{where}.{key}' is missing or not a path")
                path = (root / entry[key]).resolve()
                if not path.is_file():
                    raise NiftiError(root / entry[key], f"listed in {meta_path.name} field '{where}.{key}' "
                                                        "but missing")
                files.append(root / os.path.normpath(entry[key]))
            pairs.append((files[0], files[1]))
    labelled = {image.resolve() for image, _ in pairs}
    subjects = [Subject(name=_stem(image), folder=image.parent, layout="msd", channels=channels,
                        files={**{role: image for role in channels}, "seg": label}) for image, label in pairs]
    candidates = [*_msd_images(root / "imagesTr"), *_msd_images(root / "imagesTs")]
    candidates += [root / os.path.normpath(p) for p in meta.get("test", ()) if isinstance(p, str)]
    unlabelled: dict[Path, dict[str, str]] = {}
    for image in candidates:
        if image.resolve() not in labelled and image.resolve() not in unlabelled and image.is_file():
            unlabelled[image.resolve()] = {"subject": _stem(image), "file": str(image)}
    names = meta.get("labels")
    return subjects, tuple(unlabelled.values()), names if isinstance(names, dict) else None


def _msd_channels(meta: dict[str, Any], meta_path: Path) -> dict[str, int]:
    """Role → channel index from dataset.json's ``modality`` field (e.g. {"0": "FLAIR", "1": "T1w", ...})."""
    modality = meta.get("modality")
    if not isinstance(modality, dict) or not modality:
        v2 = " (this looks like an nnU-Net v2 dataset, 'channel_names', which prepare does not read)" \
            if "channel_names" in meta else ""
        raise NiftiError(meta_path, "missing field 'modality' (channel index → name, e.g. "
                                    f'{{"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}}){v2}')
    channels: dict[str, int] = {}
    for key, name in modality.items():
        if not str(key).isdigit() or int(key) >= len(modality):
            raise NiftiError(meta_path, f"field 'modality' key {key!r} is not a channel index 0…{len(modality) - 1}")
        role = _ALIASES.get(str(name).lower())
        if role not in MODALITIES:
            raise NiftiError(meta_path, f"field 'modality.{key}' = {name!r} is no MR modality we know (expected "
                                        "FLAIR, T1w, t1gd, T2w or t1, t1ce, t2, flair)")
        if role in channels:
            raise NiftiError(meta_path, f"field 'modality' names {role} twice (channels {channels[role]} and {key})")
        channels[role] = int(key)
    return channels


def _stem(path: Path) -> str:
    """A NIfTI file's name without ``.nii[.gz]``."""
    match = _NIFTI.match(path.name)
    return match["stem"] if match else path.name


def _msd_images(folder: Path) -> list[Path]:
    """The NIfTI files of an MSD image folder, sorted; macOS ``._*`` resource files and hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NIFTI.match(p.name) and not p.name.startswith(".") and p.is_file())


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


def _header(path: Path, channels: int | None = None) -> nib.Nifti1Image:
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel raises several types for a damaged header
        raise NiftiError(path, f"unreadable NIfTI header ({err})") from None
    if channels is None and len(img.shape) != 3:
        raise NiftiError(path, f"expected a 3-D volume, got shape {img.shape}")
    if channels is not None and (len(img.shape) != 4 or img.shape[3] != channels):
        raise NiftiError(path, f"expected a 4-D volume of {channels} channels (dataset.json field 'modality'), "
                               f"got shape {img.shape}")
    return img


def _check_geometry(img: nib.Nifti1Image, path: Path, reference: tuple[tuple[int, ...], np.ndarray] | None) -> None:
    if reference is None:
        return
    shape, affine = reference
    if img.shape[:3] != shape:
        raise NiftiError(path, f"shape {img.shape[:3]} differs from the subject's other volumes {shape}")
    if not np.allclose(img.affine, affine, atol=1e-3):
        raise NiftiError(path, "affine differs from the subject's other volumes")


def load_subject(subject: Subject, roles: list[str], convention: str | None = None) -> dict[str, Volume]:
    """Read and validate the volumes of ``roles``, in BraTS' voxel layout; check the headers of every other file of the
    subject. Seg labels must lie within ``convention`` (default: the one the subject's layout implies).

    Raises NiftiError naming the first bad file.
    """
    convention = convention or subject.layout
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r} (expected one of {CONVENTIONS})")
    paths = {role: subject.path(role) for role in roles}
    paths.update({role: path for role, path in subject.files.items() if role not in paths})
    images = {p for role, p in paths.items() if subject.channels and role in subject.channels}
    headers: dict[Path, nib.Nifti1Image] = {}
    for path in paths.values():
        if path not in headers:
            headers[path] = _header(path, len(subject.channels) if path in images else None)
    first = headers[paths[roles[0]]]
    reference = (first.shape[:3], first.affine)
    for path, img in headers.items():
        _check_geometry(img, path, reference)
    return {role: _read(paths[role], headers[paths[role]], role, subject, convention) for role in roles}


def _read(path: Path, img: nib.Nifti1Image, role: str, subject: Subject, convention: str) -> Volume:
    channel = subject.channels.get(role) if subject.channels else None
    try:
        data = np.asanyarray(img.dataobj if channel is None else img.dataobj[..., channel])
    except Exception as err:  # truncated gzip streams raise EOFError, zlib.error or OSError
        raise NiftiError(path, f"unreadable image data ({type(err).__name__}: {err})") from None
    where = "" if channel is None else f"channel {channel} ({role}): "
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        raise NiftiError(path, f"{where}{bad} non-finite voxel values (NaN or Inf)")
    if role in ("seg", "fast"):
        allowed = CONVENTION_LABELS[convention] if role == "seg" else FAST_LABELS
        if data.dtype.kind == "f" and not np.array_equal(data, np.round(data)):
            raise NiftiError(path, "label volume holds non-integer values")
        present = set(np.unique(data).astype(int).tolist())
        if not present <= allowed:
            what = f"under the {convention} label convention " if role == "seg" else ""
            hint = ("; if this release numbers its labels otherwise, say which with --labels "
                    f"({', '.join(CONVENTIONS)})") if role == "seg" else ""
            raise NiftiError(path, f"labels {sorted(present - allowed)} not allowed {what}"
                                   f"(expected ⊆ {sorted(allowed)}){hint}")
        data = data.astype(np.uint8)
    affine = np.asarray(img.affine)
    try:
        codes = axis_codes(affine)
    except ValueError as err:
        raise NiftiError(path, str(err)) from None
    identity = subject.layout == "msd" and np.allclose(affine, np.eye(4), rtol=0, atol=1e-6)
    if not identity:
        data = to_brats_orientation(data, affine)
    return Volume(data=data, affine=affine, file=path, orientation=codes, identity_header=identity)
