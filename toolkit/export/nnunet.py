"""`tumorsynth export nnunet STORE OUT`: a real (+ synthetic) training mix as an nnU-Net v2 raw dataset of 2-D PNGs.

nnU-Net is what users would train instead of the paper's U-Net; this writes what its ``nnUNetv2_plan_and_preprocess
-d ID --verify_dataset_integrity`` reads. The format, as nnU-Net v2 documents it (documentation/dataset_format.md) and
checks it (nnunetv2/experiment_planning/verify_dataset_integrity.py)::

    OUT/DatasetNNN_NAME/dataset.json         channel_names, labels, numTraining, file_ending (the required keys)
    OUT/DatasetNNN_NAME/imagesTr/<case>_0000.png   one file per input channel: <case>_<4-digit channel>.png
    OUT/DatasetNNN_NAME/labelsTr/<case>.png        same shape as the images; integers 0…K−1, background 0
    OUT/DatasetNNN_NAME/imagesTs/, labelsTs/       our test split (nnU-Net itself never reads them)
    OUT/DatasetNNN_NAME/tumorsynth_cases.csv       ours: which store row each case came from

- ``NNN`` is the dataset id, three digits (1…999); nnU-Net finds a dataset by the prefix ``DatasetNNN`` alone, so a
  second folder with the same id (under any name) is refused.
- ``.png`` is read by nnU-Net's ``NaturalImage2DIO`` (``skimage.io.imread``: a 2-D array is one greyscale channel);
  dataset.json names it in ``overwrite_image_reader_writer``. PNG is lossless, as nnU-Net requires. Images are our
  uint16 intensities as 16-bit greyscale, labels 8-bit greyscale, both written by :mod:`toolkit.data.png`.
- ``labels`` maps name → integer (v2's direction), ``"background": 0``, then the class view's names in order, so the
  values are consecutive. ``channel_names`` is ``{"0": <the store's modality>}`` (e.g. ``T1ce``), or one entry per
  modality of a several-modality store (``{"0": "T1ce", "1": "FLAIR"}``, each case then has ``<case>_0000.png``,
  ``<case>_0001.png``); any name but ``CT`` gives per-case z-scoring, right for MR.

Training cases are the real store's train **and** val splits (nnU-Net holds out its own validation folds: 5-fold
cross-validation over imagesTr), followed by the first ``synthetic_n`` rows of the synthetic store's train split.
Case identifiers say where a case came from: ``real_<subject>_s<slice:03d>`` (the stem of the store's own PNG
export), ``syn_<row:06d>`` (the synthetic store's row). Test cases are the real test split, named the same way.

The dataset appears at once or not at all: it is written into ``OUT/.DatasetNNN_NAME.<random>.tmp`` (hidden, so
nnU-Net's ``DatasetNNN`` prefix search never sees it), every file and folder fsynced, then renamed. The writer holds
OUT's :class:`~toolkit.lock.WriterLock` (``OUT/.lock``), so two exports cannot claim one id, and removes temporary
folders a killed export left. Files and folders get the modes the umask gives. Every option and manifest is checked
before anything is written: a bad one raises :class:`NnUNetExportError` naming the option or the manifest field, and
creates nothing (not even OUT). A failure while writing (a corrupt shard, a full disk) removes the temporary folder;
only OUT and its lock file stay.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import provenance
from toolkit.atomic import fsync_dir, naming_disk_errors, umask
from toolkit.data.labels import CLASS_NAMES, view_table
from toolkit.data.png import encode_png, png_name
from toolkit.data.store import Store, StoreError, as_channels, open_shard, reading
from toolkit.lock import WriterLock

log = logging.getLogger(__name__)

DATASET_JSON = "dataset.json"
CASES = "tumorsynth_cases.csv"
FILE_ENDING = ".png"
READER = "NaturalImage2DIO"  # nnU-Net v2's reader/writer for .png (also .bmp, .tif)
TRAIN_SPLITS = ("train", "val")  # nnU-Net cross-validates over all training cases itself
VIEWS = (7, 4, 2)
CHANNEL_NAMES = {"t1": "T1", "t1ce": "T1ce", "t2": "T2", "flair": "FLAIR"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # the NAME of DatasetNNN_NAME
_CASE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a case identifier (a file name stem)
_BLOCK = 128  # rows per read: bounds memory at 128 × S² × (2C + 1) bytes


class NnUNetExportError(ValueError):
    """A store or option cannot be exported as asked; the message names the store or option and the field."""


@dataclass(frozen=True)
class Part:
    """A prefix of one store split, exported as cases of one kind (``real``/``syn``) into one half (``Tr``/``Ts``)."""

    store: Store
    split: str
    n: int
    kind: str
    half: str


@dataclass(frozen=True)
class Plan:
    """Everything an export will write, decided (and checked) before anything is."""

    folder: str
    dataset_id: int
    name: str
    classes: int
    channels: tuple[str, ...]  # nnU-Net's channel names, one per image channel of the stores
    parts: tuple[Part, ...]

    def count(self, half: str, kind: str | None = None) -> int:
        """Cases in ``half`` (``Tr``/``Ts``), of ``kind`` when given."""
        return sum(p.n for p in self.parts if p.half == half and kind in (None, p.kind))


def dataset_folder(dataset_id: int, name: str) -> str:
    """``DatasetNNN_NAME``; the id must have three digits and the name be a plain token."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise NnUNetExportError(f"--id: nnU-Net dataset ids have three digits (1…999), got {dataset_id!r}")
    if not _NAME.fullmatch(name):
        raise NnUNetExportError(f"--name: {name!r} must be letters, digits, '_' or '-' (it becomes the folder "
                                f"Dataset{dataset_id:03d}_{name})")
    return f"Dataset{dataset_id:03d}_{name}"


def label_names(classes: int) -> dict[str, int]:
    """nnU-Net v2's ``labels``: name → integer, ``background`` 0, then the view's class names (consecutive)."""
    return {"background": 0, **{name: k for k, name in enumerate(CLASS_NAMES[classes]) if k}}


def _open(path: Path, option: str, kind: str) -> Store:
    """The store ``path`` of ``option``, which must be of ``kind`` and hold images."""
    try:
        store = Store(path)
    except StoreError as err:
        raise NnUNetExportError(f"{option}: {err}") from None
    m, manifest = store.manifest, store.root / "manifest.json"
    if m.kind != kind:
        raise NnUNetExportError(f"{manifest}: field 'kind' is {m.kind!r}; {option} takes a {kind} store")
    if not m.has_image:
        raise NnUNetExportError(f"{manifest}: field 'has_image' is false (a mask-only store); nnU-Net trains on "
                                "image/label pairs")
    return store


def _checked_view(store: Store, classes: int) -> None:
    try:
        view_table(store.manifest.classes, classes)
    except ValueError as err:
        raise NnUNetExportError(f"{store.root / 'manifest.json'}: field 'classes': {err}") from None


def plan_export(real: Path, *, dataset_id: int, name: str, classes: int, synthetic: Path | None = None,
                synthetic_n: int | None = None) -> Plan:
    """Check the inputs and decide the cases; reads manifests only and writes nothing."""
    folder = dataset_folder(dataset_id, name)
    if classes not in VIEWS:
        raise NnUNetExportError(f"--classes: must be one of {VIEWS}, got {classes!r}")
    store = _open(real, "STORE", "real")
    _checked_view(store, classes)
    m = store.manifest
    if not m.modality:
        raise NnUNetExportError(f"{store.root / 'manifest.json'}: field 'modality' is missing; nnU-Net's "
                                "channel_names needs it")
    parts = [Part(store, split, m.splits[split].n, "real", "Tr") for split in TRAIN_SPLITS if split in m.splits]
    if synthetic is None:
        if synthetic_n is not None:
            raise NnUNetExportError("--synthetic-n: needs --synthetic STORE")
    else:
        syn = _open(synthetic, "--synthetic", "synthetic")
        _checked_view(syn, classes)
        sm, manifest = syn.manifest, syn.root / "manifest.json"
        if sm.image_size != m.image_size:
            raise NnUNetExportError(f"{manifest}: field 'image_size' is {sm.image_size}, the real store's is "
                                    f"{m.image_size}")
        if (sm.modality and sm.modality != m.modality) or sm.channels != m.channels:
            raise NnUNetExportError(f"{manifest}: field 'modality' is {sm.modality!r}, the real store's is "
                                    f"{m.modality!r}; nnU-Net's channels must hold the same modalities")
        available = sm.splits["train"].n if "train" in sm.splits else 0
        n = available if synthetic_n is None else synthetic_n
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise NnUNetExportError(f"--synthetic-n: must be a count ≥ 0, got {synthetic_n!r}")
        if n > available:
            raise NnUNetExportError(f"--synthetic-n: {n} is more than the {available} synthetic pairs in "
                                    f"{manifest} (field 'splits.train.n')")
        if n:
            parts.append(Part(syn, "train", n, "syn", "Tr"))
    if "test" in m.splits:
        parts.append(Part(store, "test", m.splits["test"].n, "real", "Ts"))
    plan = Plan(folder=folder, dataset_id=dataset_id, name=name, classes=classes,
                channels=tuple(CHANNEL_NAMES.get(name, name) for name in m.modalities), parts=tuple(parts))
    if not plan.count("Tr"):
        raise NnUNetExportError(f"{store.root / 'manifest.json'}: fields 'splits.train.n' and 'splits.val.n' hold no "
                                "rows (and no synthetic pairs are added): nnU-Net needs training cases")
    return plan


def dataset_json(plan: Plan) -> dict[str, Any]:
    """The dataset.json document: nnU-Net v2's required keys, its optional ones, and our provenance."""
    stores = {}
    for part in plan.parts:
        entry = stores.setdefault(part.kind, {"store": str(part.store.root.resolve()),
                                              "fingerprint": provenance.fingerprint(part.store.root), "rows": {}})
        entry["rows"][part.split] = part.n
    return {
        "channel_names": {str(c): name for c, name in enumerate(plan.channels)},
        "labels": label_names(plan.classes),
        "numTraining": plan.count("Tr"),
        "file_ending": FILE_ENDING,
        "overwrite_image_reader_writer": READER,
        "name": plan.folder,
        "description": f"tumorsynth export: {plan.count('Tr', 'real')} real + {plan.count('Tr', 'syn')} synthetic "
                       f"training slices, {plan.count('Ts')} real test slices, {plan.classes}-class view",
        "reference": "tumorsynth export nnunet",
        "numTest": plan.count("Ts"),
        "tumorsynth": {"classes": plan.classes, "train_splits": list(TRAIN_SPLITS), "test_split": "test",
                       "real": stores.get("real"), "synthetic": stores.get("syn"), "cases": CASES},
    }


def _rows(part: Part, classes: int) -> Iterator[tuple[int, str, int, np.ndarray, np.ndarray]]:
    """``(row, subject, slice, image [C,S,S], label in the view)`` for the first ``part.n`` rows of the part's
    split."""
    table = view_table(part.store.manifest.classes, classes)
    row = 0
    for info, path in part.store.shards(part.split):
        take = min(info.n, part.n - row)
        if take <= 0:
            return
        with open_shard(path, info.sha256) as f, reading(path):
            for lo in range(0, take, _BLOCK):
                hi = min(lo + _BLOCK, take)
                labels = f["label"][lo:hi]
                if labels.size and int(labels.max()) >= len(table):
                    raise StoreError(f"{path}: label {int(labels.max())} in a store of {len(table)} classes")
                images = as_channels(f["image"][lo:hi])
                subjects, slices = f["subject"].asstr()[lo:hi], f["slice"][lo:hi]
                for image, label, subject, slice_index in zip(images, table[labels], subjects, slices):
                    yield row, str(subject), int(slice_index), image, label
                    row += 1


def case_id(kind: str, row: int, subject: str, slice_index: int) -> str:
    """``real_<subject>_s<slice:03d>`` (the store's PNG stem) or ``syn_<row:06d>``."""
    return f"syn_{row:06d}" if kind == "syn" else "real_" + png_name(subject, slice_index)[: -len(".png")]


def _write(path: Path, data: bytes) -> None:
    """Write and fsync one file of the (not yet visible) dataset; ``open`` gives it the umask's mode."""
    with naming_disk_errors(path), open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_cases(root: Path, plan: Plan) -> list[list[Any]]:
    """Write every case's PNGs under ``root``; returns the rows of the cases table."""
    for half in ("Tr", "Ts"):
        for sub in ("images", "labels"):
            (root / f"{sub}{half}").mkdir()
    table: list[list[Any]] = []
    seen: dict[tuple[str, str], str] = {}
    for part in plan.parts:
        for row, subject, slice_index, image, label in _rows(part, plan.classes):
            case = case_id(part.kind, row, subject, slice_index)
            where = f"{part.store.root} split '{part.split}' row {row}"
            if not _CASE.fullmatch(case):
                raise NnUNetExportError(f"{where}: subject {subject!r} makes the case identifier {case!r}, which is "
                                        "not a plain file name (letters, digits, '.', '_', '-')")
            if (part.half, case) in seen:
                raise NnUNetExportError(f"{where}: case {case} (subject {subject!r}, slice {slice_index}) occurs "
                                        f"twice (also {seen[(part.half, case)]})")
            seen[(part.half, case)] = where
            for channel, plane in enumerate(image):
                _write(root / f"images{part.half}" / f"{case}_{channel:04d}{FILE_ENDING}", encode_png(plane))
            _write(root / f"labels{part.half}" / f"{case}{FILE_ENDING}", encode_png(label))
            table.append([case, f"images{part.half}", part.kind, str(part.store.root.resolve()), part.split, row,
                          subject, slice_index])
    return table


def _taken(out: Path, dataset_id: int) -> list[str]:
    """Dataset folders of ``out`` with this id (nnU-Net matches the ``DatasetNNN`` prefix only)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())


def _refuse_taken(out: Path, plan: Plan) -> None:
    taken = _taken(out, plan.dataset_id)
    if taken:
        raise FileExistsError(f"{out / taken[0]}: nnU-Net dataset id {plan.dataset_id:03d} is taken (nnU-Net tells "
                              f"datasets apart by id alone); remove it or choose another --id")


def export_nnunet(real: str | os.PathLike[str], out: str | os.PathLike[str], *, dataset_id: int, name: str,
                  classes: int, synthetic: str | os.PathLike[str] | None = None,
                  synthetic_n: int | None = None) -> dict[str, Any]:
    """Write ``OUT/DatasetNNN_NAME`` from the real store ``real`` (+ ``synthetic``) and return a summary:
    ``{"dataset", "id", "name", "classes", "numTraining", "real", "synthetic", "test", "labels", "channel_names"}``.
    """
    out = Path(out)
    plan = plan_export(Path(real), dataset_id=dataset_id, name=name, classes=classes,
                       synthetic=Path(synthetic) if synthetic is not None else None, synthetic_n=synthetic_n)
    _refuse_taken(out, plan)  # before OUT is created or locked: a refused export leaves nothing
    doc = dataset_json(plan)
    with WriterLock(out, "nnU-Net raw folder"):
        _refuse_taken(out, plan)  # again, under the lock: another export may have finished meanwhile
        for stale in out.glob(".Dataset*.tmp"):
            if stale.is_dir():  # no other export runs (we hold the lock): a killed one left it
                log.info("%s: removing the temporary folder of an interrupted export", stale)
                shutil.rmtree(stale, ignore_errors=True)
        with naming_disk_errors(out):
            tmp = Path(tempfile.mkdtemp(prefix=f".{plan.folder}.", suffix=".tmp", dir=out))
        try:
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would hide the dataset from the group
            log.info("%s: exporting %d training and %d test cases", out / plan.folder, plan.count("Tr"),
                     plan.count("Ts"))
            table = _write_cases(tmp, plan)
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerow(["case", "folder", "kind", "store", "split", "row", "subject", "slice"])
            writer.writerows(table)
            _write(tmp / CASES, text.getvalue().encode())
            _write(tmp / DATASET_JSON, (json.dumps(doc, indent=2) + "\n").encode())
            for sub in sorted(p for p in tmp.iterdir() if p.is_dir()):
                fsync_dir(sub)
            fsync_dir(tmp)
            with naming_disk_errors(out / plan.folder):
                os.rename(tmp, out / plan.folder)
            fsync_dir(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"dataset": str(out / plan.folder), "id": plan.dataset_id, "name": plan.name, "classes": plan.classes,
            "numTraining": doc["numTraining"], "real": plan.count("Tr", "real"), "synthetic": plan.count("Tr", "syn"),
            "test": plan.count("Ts"), "labels": doc["labels"], "channel_names": doc["channel_names"]}
