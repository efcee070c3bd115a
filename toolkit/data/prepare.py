"""`tumorsynth prepare`: a BraTS cohort of NIfTI volumes → a real store (sharded HDF5 + PNG export).

The run holds the store's lock (:class:`StoreWriter`) throughout and, before it writes anything, records the options
that define the store's content with a fingerprint of the cohort (its subjects and their files): a resume with other
ones, or a complete store asked for with other ones, is refused naming the option. Two resumable phases under the
store folder:

1. per subject (parallel over ``--workers``): validate, build the 7-class mask (tissue from FSL FAST output or the
   built-in FAST-like segmentation; tumour overrides tissue), slice axially, pad/resize, and save the slices as
   ``.work/<subject>.{image,label}.npy`` (atomic; a finished subject is skipped on resume);
2. shuffle and split all slices, write the shards in row order through :class:`StoreWriter` (finished shards are skipped
   when their checksum holds), export PNGs (existing files are complete, since each is written atomically), and write
   the manifest last.

The work folder goes once the manifest is written. A bad subject stops the run before any store is committed, unless
``skip_bad`` is set; then it is listed in the manifest. A fresh run stopped by a bad subject removes what it wrote; a
resumed one keeps every finished subject and shard, so it resumes once the file is fixed. Killing the process at any
point, or a full disk (one DiskError naming the file), leaves a folder that the next run resumes. A partial store
begun by a tumorsynth older than the options record (``.work/options.json``) is not resumed: remove it and prepare
again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from toolkit import __version__
from toolkit.atomic import write_bytes
from toolkit.data.labels import compose_mask
from toolkit.data.nifti import MODALITIES, NiftiError, Subject, discover, load_subject
from toolkit.data.png import png_name, write_png
from toolkit.data.slicing import axial_slices, to_uint16
from toolkit.data.split import MODES, plan_split
from toolkit.data.store import OPTIONS, PROGRESS, Manifest, StoreWriter, complete, shard_name, tidy
from toolkit.data.tissue import segment_tissue
from toolkit.lock import LOCK, WriterLock
from toolkit.parallel import parallel_map

log = logging.getLogger(__name__)

WORK = ".work"
TISSUE_MODES = ("auto", "fast", "hmrf", "none")


class PrepareError(Exception):
    """Ingest cannot proceed; the message names the file or option at fault."""


@dataclass(frozen=True)
class PrepareConfig:
    """Options of one ingest; all but ``workers`` and ``skip_bad`` must match when a run is resumed."""

    src: Path
    out: Path
    size: int = 256
    shard_size: int = 1024
    png: bool = True
    split: str = "slice"
    seed: int = 0
    modality: str = "t1ce"
    tissue: str = "auto"
    workers: int = 1
    skip_bad: bool = False

    def __post_init__(self) -> None:
        checks = {
            "split": (self.split in MODES, f"one of {MODES}"),
            "modality": (self.modality in MODALITIES, f"one of {MODALITIES}"),
            "tissue": (self.tissue in TISSUE_MODES, f"one of {TISSUE_MODES}"),
            "size": (self.size >= 8 and not self.size & (self.size - 1), "a power of two ≥ 8"),
            "shard_size": (self.shard_size >= 1, "≥ 1"),
            "workers": (self.workers >= 1, "≥ 1"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise PrepareError(f"option --{name.replace('_', '-')} = {getattr(self, name)!r}: expected {expected}")

    @property
    def classes(self) -> int:
        return 4 if self.tissue == "none" else 7

    def identity(self) -> dict[str, Any]:
        """The options that define the store's content (with the cohort's fingerprint, compared on resume)."""
        keys = ("size", "shard_size", "png", "split", "seed", "modality", "tissue")
        return {"src": str(Path(self.src).resolve()), **{k: getattr(self, k) for k in keys}}


@dataclass(frozen=True)
class PrepareResult:
    """What a run did: the manifest, and whether it resumed or found the store already complete."""

    store: Path
    manifest: Manifest | None
    resumed: bool
    already_complete: bool
    seconds: float


def prepare(config: PrepareConfig) -> PrepareResult:
    """Ingest ``config.src`` into the store ``config.out`` (see the module docstring)."""
    start = time.perf_counter()
    out = Path(config.out)
    try:
        subjects = discover(Path(config.src))
    except NiftiError as err:
        raise PrepareError(str(err)) from None
    options = {**config.identity(), "cohort": cohort_fingerprint(subjects, Path(config.src))}
    if complete(out, options) is not None:  # made with other options: OptionsChanged names them
        if any((out / name).exists() for name in (WORK, PROGRESS, OPTIONS)):  # a kill right after the manifest
            with WriterLock(out, "store"):
                tidy(out, (WORK,))
        return PrepareResult(out, None, resumed=False, already_complete=True, seconds=time.perf_counter() - start)
    _refuse_foreign(out)
    created = not out.exists()
    writer = StoreWriter(out, classes=config.classes, options=options, scratch=(WORK,))
    if writer.resumed:
        log.info("%s: resuming an incomplete store", out)
    try:
        ingested, skipped = _ingest_subjects(subjects, config, out / WORK)
        manifest = _write_store(writer, ingested, skipped, config)
    except NiftiError as err:
        if not writer.resumed:
            _discard(out, created)
        raise PrepareError(str(err)) from None
    finally:
        writer.close()
    return PrepareResult(out, manifest, resumed=writer.resumed, already_complete=False,
                         seconds=time.perf_counter() - start)


def cohort_fingerprint(subjects: list[Subject], src: Path) -> str:
    """``sha256:<hex>`` of the cohort's subjects and their files (paths under ``src``): a cohort that gained or lost
    a subject or a volume since a store was begun would make another split. Contents are not hashed (that would read
    every volume), so a file repaired in place after an error keeps the cohort, and its store resumable."""
    entries = [[s.name, role, str(path.relative_to(src))] for s in subjects for role, path in sorted(s.files.items())]
    return "sha256:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _refuse_foreign(out: Path) -> None:
    """Refuse an output that is neither absent, empty, nor a store that this command began."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out}: exists and is not a folder; refusing to write into it")
    entries = {entry.name for entry in out.iterdir()} - {LOCK} if out.exists() else set()
    if not entries or OPTIONS in entries:
        return
    if (out / WORK / "options.json").exists():
        raise PrepareError(f"{out}: incomplete store begun by an older tumorsynth (.work/options.json), which cannot "
                           "be resumed; remove the folder and prepare again")
    raise PrepareError(f"{out}: exists and is not an incomplete tumorsynth store; refusing to write into it")


def _discard(out: Path, created: bool) -> None:
    """Remove what a fresh run wrote: the folder if the run created it, else everything in it but the lock file."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for entry in out.iterdir():
        if entry.is_dir():
            shutil.rmtree(entry)
        elif entry.name != LOCK:
            entry.unlink()


def _ingest_subjects(subjects: list[Subject], config: PrepareConfig,
                     work: Path) -> tuple[list[tuple[str, int]], list[dict[str, str]]]:
    """Phase 1 over all subjects; returns (name, slice count) of the good ones and the skipped ones."""
    ingested, skipped = [], []
    jobs = [(subject, config, work) for subject in subjects]
    results = parallel_map(_ingest_one, jobs, config.workers, desc="subjects")
    for subject, (depth, error) in zip(subjects, results):
        if error is None:
            ingested.append((subject.name, depth))
            continue
        if not config.skip_bad:
            raise error
        log.warning("skipping subject %s: %s", subject.name, error)
        skipped.append({"subject": subject.name, "file": str(error.file), "error": error.problem})
    if not ingested:
        raise NiftiError(Path(config.src), "no valid subject left to ingest")
    return ingested, skipped


def _ingest_one(job: tuple[Subject, PrepareConfig, Path]) -> tuple[int, NiftiError | None]:
    """Phase 1 for one subject; returns (slice count, None) or (0, the validation error)."""
    subject, config, work = job
    image_path, label_path = work / f"{subject.name}.image.npy", work / f"{subject.name}.label.npy"
    if image_path.exists() and label_path.exists():
        return int(np.load(label_path, mmap_mode="r").shape[0]), None
    try:
        image, mask = _subject_mask(subject, config)
    except NiftiError as err:
        return 0, err
    for path, array in ((image_path, axial_slices(image, config.size, labels=False)),
                        (label_path, axial_slices(mask, config.size, labels=True, classes=config.classes))):
        # Saved to memory, then written by Python: numpy writes a real file with C fwrite, and reports a full disk as a
        # short write without errno, which could not be told from other errors.
        buffer = io.BytesIO()
        np.save(buffer, array)
        write_bytes(path, buffer.getvalue())
    return int(image.shape[2]), None


def _subject_mask(subject: Subject, config: PrepareConfig) -> tuple[np.ndarray, np.ndarray]:
    """The subject's MR volume (uint16) and stored-class mask volume."""
    use_fast = config.tissue == "fast" or (config.tissue == "auto" and "fast" in subject.files)
    tissue_role = "t1" if "t1" in subject.files else "t1ce"
    roles = [config.modality, "seg"]
    if use_fast:
        roles.append("fast")
    elif config.tissue != "none" and tissue_role not in roles:
        roles.append(tissue_role)
    volumes = load_subject(subject, roles)
    image = to_uint16(volumes[config.modality].data, volumes[config.modality].file)
    seg = volumes["seg"].data
    if config.tissue == "none":
        tissue = None
    elif use_fast:
        tissue = volumes["fast"].data
    else:
        reference = volumes[tissue_role].data
        brain = (reference > 0) | (image > 0) | (seg > 0)
        tissue = segment_tissue(reference, brain, exclude=seg > 0)
    return image, compose_mask(seg, tissue)


def _write_store(writer: StoreWriter, ingested: list[tuple[str, int]], skipped: list[dict[str, str]],
                 config: PrepareConfig) -> Manifest:
    """Phase 2: split, write shards, export PNGs, write the manifest (which removes the work folder)."""
    out, work = Path(config.out), Path(config.out) / WORK
    names = [name for name, _ in ingested]
    depths = np.array([depth for _, depth in ingested])
    starts = np.concatenate([[0], np.cumsum(depths)[:-1]])
    images = [np.load(work / f"{n}.image.npy", mmap_mode="r") for n in names]
    labels = [np.load(work / f"{n}.label.npy", mmap_mode="r") for n in names]
    shard_counts = {}
    for split, rows in plan_split(depths, config.split, config.seed).items():
        shard_counts[split] = -(-len(rows) // config.shard_size)
        for index in tqdm(range(shard_counts[split]), desc=f"{split} shards", disable=None):
            if writer.done(split, index):
                continue
            chunk = rows[index * config.shard_size:(index + 1) * config.shard_size]
            owner = np.searchsorted(starts, chunk, side="right") - 1
            local = chunk - starts[owner]
            writer.write(split, index,
                         image=np.stack([images[s][z] for s, z in zip(owner, local)]),
                         label=np.stack([labels[s][z] for s, z in zip(owner, local)]),
                         subject=[names[s] for s in owner], slice_index=local)
    if config.png:
        shard_files = [out / shard_name(split, i) for split, count in shard_counts.items() for i in range(count)]
        list(parallel_map(export_png, [(out, f) for f in shard_files], config.workers, desc="png shards"))
    return writer.finish(
        kind="real", image_size=config.size, has_image=True, shard_counts=shard_counts, modality=config.modality,
        skipped=tuple(skipped), provenance={"tool": f"tumorsynth {__version__} prepare", "subjects": len(names)},
    )


def export_png(job: tuple[Path, Path]) -> int:
    """Write the PNGs of one shard that do not exist yet; returns how many were written."""
    store, shard = job
    split = shard.parent.name
    written = 0
    with h5py.File(shard, "r") as f:
        subjects = f["subject"].asstr()[:]
        slices = f["slice"][:]
        for field in ("image", "label"):
            if field not in f:
                continue
            folder = store / "png" / split / field
            for row, (subject, z) in enumerate(zip(subjects, slices)):
                path = folder / png_name(subject, int(z))
                if not path.exists():
                    write_png(path, f[field][row])
                    written += 1
    return written


def result_json(result: PrepareResult) -> dict[str, Any]:
    """A JSON summary of a run for the command line."""
    doc: dict[str, Any] = {"store": str(result.store), "resumed": result.resumed,
                           "already_complete": result.already_complete, "seconds": round(result.seconds, 2)}
    if result.manifest is not None:
        doc["splits"] = {k: v.n for k, v in result.manifest.splits.items()}
        doc["skipped"] = list(result.manifest.skipped)
    return doc

