"""`tumorsynth prepare`: a BraTS cohort of NIfTI volumes → a real store (sharded HDF5 + PNG export).

Cohorts come in the layouts :mod:`toolkit.data.nifti` discovers (BraTS 2018–2021, BraTS 2023+, the Decathlon's
Task01_BrainTumour); the layout decides what the seg labels mean (:mod:`toolkit.data.labels`), unless ``labels``
(``--labels``) says otherwise. A cohort mixing layouts is refused unless ``labels`` is given. ``include``
(``--include GLOB``) selects subjects by name or by their folder under SRC. The manifest's provenance records the
layout, the label convention and where it came from, the voxel axis codes the volumes came in, the resection-cavity
voxels mapped to tissue (brats2023) and the cases skipped for want of a label (MSD).

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

``modality`` may name several modalities, comma-separated (``t1ce,flair``): each slice then stores one image channel
per modality, in that order (see :mod:`toolkit.data.store`), and PNGs go to ``png/<split>/image-<modality>/``.

The work folder goes once the manifest is written. A bad subject stops the run before any store is committed, unless
``skip_bad`` is set; then it is listed in the manifest. A fresh run stopped by a bad subject removes what it wrote; a
resumed one keeps every finished subject and shard, so it resumes once the file is fixed. Killing the process at any
point, or a full disk (one DiskError naming the file), leaves a folder that the next run resumes. A partial store
begun by a tumorsynth older than the options record (``.work/options.json``) is not resumed: remove it and prepare
again.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import io
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from tqdm import tqdm

from toolkit import __version__
from toolkit.atomic import write_bytes
from toolkit.data.labels import CONVENTIONS, compose_mask, resection_cavity, tumour_classes
from toolkit.data.nifti import (
    MODALITIES,
    MSD_LABEL_NAMES,
    Cohort,
    NiftiError,
    Subject,
    discover_cohort,
    load_subject,
)
from toolkit.data.png import png_name, write_png
from toolkit.data.slicing import BRATS_AXCODES, axial_slices, to_uint16
from toolkit.data.split import MODES, plan_split
from toolkit.data.store import (
    CODECS,
    DEFAULT_CODEC,
    OPTIONS,
    PROGRESS,
    Manifest,
    StoreWriter,
    complete,
    modality_list,
    shard_name,
    tidy,
)
from toolkit.data.tissue import segment_tissue
from toolkit.lock import LOCK, WriterLock
from toolkit.parallel import parallel_map

log = logging.getLogger(__name__)

WORK = ".work"
TISSUE_MODES = ("auto", "fast", "hmrf", "none")
INTENSITY_MODES = ("raw", "volume")
VOLUME_MEDIAN = 1000.0  # intensity="volume": each volume's brain median after scaling


class PrepareError(Exception):
    """Ingest cannot proceed; the message names the file or option at fault."""


@dataclass(frozen=True)
class PrepareConfig:
    """Options of one ingest; all but ``workers`` and ``skip_bad`` must match when a run is resumed.

    ``labels``: the label convention of the seg volumes (one of :data:`~toolkit.data.labels.CONVENTIONS`), None to
    infer it from the cohort's layout. ``include``: glob patterns (``fnmatch``, case-sensitive) selecting subjects; a
    subject is kept when any pattern matches its name, its folder's path under ``src`` (an MSD case:
    ``<folder>/<name>``), or a folder above it there (its path under ``src`` or its name), so ``("HGG",)`` (also with
    ``src`` one level above the HGG/ folder), ``("HGG/*",)`` and ``("Brats18_TCIA*",)`` all work; empty keeps every
    subject. A pattern matching no subject is an error. ``intensity``: ``raw`` stores the volumes' values (the paper);
    ``volume`` scales each modality of each subject so that its brain (non-zero) voxels have the median
    :data:`VOLUME_MEDIAN`, which removes the scanner's gain (BraTS institutions differ up to 10×) before any model
    sees the data: a mask → MR generator cannot know a subject's gain from its mask.
    """

    src: Path
    out: Path
    size: int = 256
    shard_size: int = 1024
    png: bool = True
    split: str = "slice"
    seed: int = 0
    modality: str = "t1ce"  # or several, comma-separated: the image channels in order (e.g. "t1ce,flair")
    tissue: str = "auto"
    intensity: str = "raw"
    workers: int = 1
    skip_bad: bool = False
    labels: str | None = None
    include: tuple[str, ...] = ()
    compression: str = DEFAULT_CODEC  # the shards' codec (toolkit.data.store.CODECS); gzip for plain HDF5 tools

    def __post_init__(self) -> None:
        if isinstance(self.include, str):  # one pattern given bare, as YAML or a caller may
            object.__setattr__(self, "include", (self.include,))
        object.__setattr__(self, "include", tuple(self.include))
        checks = {
            "split": (self.split in MODES, f"one of {MODES}"),
            "modality": (bool(self.modalities) and set(self.modalities) <= set(MODALITIES)
                         and len(set(self.modalities)) == len(self.modalities),
                         f"one of {MODALITIES}, or several of them comma-separated without repeats"),
            "tissue": (self.tissue in TISSUE_MODES, f"one of {TISSUE_MODES}"),
            "intensity": (self.intensity in INTENSITY_MODES, f"one of {INTENSITY_MODES}"),
            "size": (self.size >= 8 and not self.size & (self.size - 1), "a power of two ≥ 8"),
            "shard_size": (self.shard_size >= 1, "≥ 1"),
            "workers": (self.workers >= 1, "≥ 1"),
            "labels": (self.labels is None or self.labels in CONVENTIONS, f"one of {CONVENTIONS}"),
            "include": (all(isinstance(p, str) and p for p in self.include), "non-empty glob patterns"),
            "compression": (self.compression in CODECS, f"one of {CODECS}"),
        }
        for name, (ok, expected) in checks.items():
            if not ok:
                raise PrepareError(f"option --{name.replace('_', '-')} = {getattr(self, name)!r}: expected {expected}")

    @property
    def modalities(self) -> tuple[str, ...]:
        """The image channels' modalities in order."""
        return modality_list(self.modality) if isinstance(self.modality, str) else ()

    @property
    def classes(self) -> int:
        return 4 if self.tissue == "none" else 7

    def identity(self) -> dict[str, Any]:
        """The options that define the store's content (with the cohort's fingerprint, compared on resume)."""
        keys = ("size", "shard_size", "png", "split", "seed", "modality", "tissue")
        identity = {"src": str(Path(self.src).resolve()), **{k: getattr(self, k) for k in keys}}
        # Recorded only when set, so that the stores made before these options existed still match their re-runs.
        if self.labels is not None:
            identity["labels"] = self.labels
        if self.include:
            identity["include"] = list(self.include)
        if self.compression != DEFAULT_CODEC:
            identity["compression"] = self.compression
        if self.intensity != "raw":
            identity["intensity"] = self.intensity
        return identity


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
        cohort = discover_cohort(Path(config.src))
    except NiftiError as err:
        raise PrepareError(str(err)) from None
    subjects = select_subjects(cohort.subjects, config.include, Path(config.src))
    cohort = dataclasses.replace(cohort, subjects=subjects, unlabelled=tuple(
        case for case in cohort.unlabelled if not config.include or _selected(
            _selection_keys(case["subject"], Path(case["file"]).parent / case["subject"], Path(config.src)),
            config.include)))
    convention = _convention(cohort, config)
    options = {**config.identity(), "cohort": cohort_fingerprint(subjects, Path(config.src))}
    if complete(out, options) is not None:  # made with other options: OptionsChanged names them
        if any((out / name).exists() for name in (WORK, PROGRESS, OPTIONS)):  # a kill right after the manifest
            with WriterLock(out, "store"):
                tidy(out, (WORK,))
        return PrepareResult(out, None, resumed=False, already_complete=True, seconds=time.perf_counter() - start)
    _refuse_foreign(out)
    created = not out.exists()
    writer = StoreWriter(out, classes=config.classes, options=options, scratch=(WORK,),
                         compression=config.compression)
    if writer.resumed:
        log.info("%s: resuming an incomplete store", out)
    if cohort.unlabelled:
        log.warning("%s: skipping %d cases without a label (e.g. %s); listed in the manifest's provenance.unlabelled",
                    config.src, len(cohort.unlabelled), cohort.unlabelled[0]["file"])
    try:
        ingested, skipped = _ingest_subjects(subjects, config, convention, out / WORK)
        manifest = _write_store(writer, ingested, skipped, config, _provenance(cohort, config, convention, ingested))
    except NiftiError as err:
        if not writer.resumed:
            _discard(out, created)
        raise PrepareError(str(err)) from None
    finally:
        writer.close()
    return PrepareResult(out, manifest, resumed=writer.resumed, already_complete=False,
                         seconds=time.perf_counter() - start)


def select_subjects(subjects: list[Subject], include: tuple[str, ...], src: Path) -> list[Subject]:
    """The subjects that ``include`` selects (see :class:`PrepareConfig`); all of them when it is empty.

    Raises PrepareError naming a pattern that matches no subject (a typo would otherwise drop subjects silently).
    """
    if not include:
        return subjects
    keys = {s.name: _selection_keys(s.name, s.folder / s.name if s.layout == "msd" else s.folder, src)
            for s in subjects}
    unmatched = [p for p in include if not any(_selected(ks, (p,)) for ks in keys.values())]
    if unmatched:
        raise PrepareError(f"option --include {unmatched[0]!r} matches no subject under {src} (patterns match a "
                           "subject's name or its folder's path under SRC, e.g. 'HGG' or 'HGG/*')")
    chosen = [s for s in subjects if _selected(keys[s.name], include)]
    log.info("--include %s: %d of %d subjects", " ".join(include), len(chosen), len(subjects))
    return chosen


def _selection_keys(name: str, path: Path, src: Path) -> list[str]:
    """What an ``include`` pattern is matched against: the subject's name, its ``path`` under ``src`` (a BraTS
    subject's folder; an MSD case's folder / name), each folder above it there by path and by name."""
    try:
        rel = Path(path).relative_to(src)
    except ValueError:
        rel = Path(Path(path).name)
    parts = [p for p in rel.parts if p != "."]
    return [name, *("/".join(parts[:i]) for i in range(1, len(parts) + 1)), *parts[:-1]]


def _selected(keys: list[str], include: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for key in keys for pattern in include)


def _convention(cohort: Cohort, config: PrepareConfig) -> str:
    """The label convention in force: ``config.labels``, else the one the layout of the (selected) cohort implies."""
    if config.labels is not None:
        return config.labels
    layouts = cohort.layouts
    if len(layouts) > 1:
        examples = ", ".join(f"{layout} (e.g. {next(s.name for s in cohort.subjects if s.layout == layout)})"
                             for layout in layouts)
        raise PrepareError(f"{config.src}: holds subjects of more than one release layout: {examples}; their labels "
                           "mean different things, so prepare each release into its own store (select one with "
                           "--include), or say what every label means with --labels")
    layout = layouts[0]
    if layout == "msd" and cohort.label_names is not None:
        names = {str(k): str(v).lower().replace("oedema", "edema") for k, v in cohort.label_names.items()}
        expected = {k: v.replace("tumour", "").replace("tumor", "").strip() for k, v in MSD_LABEL_NAMES.items()}
        if any(not names.get(k, "").startswith(v) for k, v in expected.items()):
            raise PrepareError(f"{cohort.meta}: field 'labels' = {cohort.label_names} is not Task01_BrainTumour's "
                               "(1 edema, 2 non-enhancing tumour, 3 enhancing tumour); say what the labels mean with "
                               f"--labels ({', '.join(CONVENTIONS)})")
    return layout


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


def _ingest_subjects(subjects: list[Subject], config: PrepareConfig, convention: str,
                     work: Path) -> tuple[list[tuple[str, int, dict[str, Any]]], list[dict[str, str]]]:
    """Phase 1 over all subjects; returns (name, slice count, facts) of the good ones and the skipped ones."""
    ingested, skipped = [], []
    jobs = [(subject, config, convention, work) for subject in subjects]
    results = parallel_map(_ingest_one, jobs, config.workers, desc="subjects")
    for subject, (depth, facts, error) in zip(subjects, results):
        if error is None:
            ingested.append((subject.name, depth, facts))
            continue
        if not config.skip_bad:
            raise error
        log.warning("skipping subject %s: %s", subject.name, error)
        skipped.append({"subject": subject.name, "file": str(error.file), "error": error.problem})
    if not ingested:
        raise NiftiError(Path(config.src), "no valid subject left to ingest")
    return ingested, skipped


def _ingest_one(job: tuple[Subject, PrepareConfig, str, Path]) -> tuple[int, dict[str, Any], NiftiError | None]:
    """Phase 1 for one subject; returns (slice count, facts, None) or (0, {}, the validation error). The facts (source
    orientation, resection-cavity voxels) are saved beside the slices, before them, so a resume finds them."""
    subject, config, convention, work = job
    image_path, label_path = work / f"{subject.name}.image.npy", work / f"{subject.name}.label.npy"
    facts_path = work / f"{subject.name}.facts.json"
    if image_path.exists() and label_path.exists():
        facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
        return int(np.load(label_path, mmap_mode="r").shape[0]), facts, None
    try:
        image, mask, facts = _subject_mask(subject, config, convention)
    except NiftiError as err:
        return 0, {}, err
    write_bytes(facts_path, json.dumps(facts).encode())
    channels = [axial_slices(volume, config.size, labels=False) for volume in image]
    slices = channels[0] if len(channels) == 1 else np.stack(channels, axis=1)  # the store's [z,S,S] or [z,C,S,S]
    for path, array in ((image_path, slices),
                        (label_path, axial_slices(mask, config.size, labels=True, classes=config.classes))):
        # Saved to memory, then written by Python: numpy writes a real file with C fwrite, and reports a full disk as a
        # short write without errno, which could not be told from other errors.
        buffer = io.BytesIO()
        np.save(buffer, array)
        write_bytes(path, buffer.getvalue())
    return int(image.shape[3]), facts, None


def _subject_mask(subject: Subject, config: PrepareConfig,
                  convention: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The subject's MR volumes (uint16 ``[C, x, y, z]``, one per modality) and stored-class mask volume, in BraTS'
    voxel layout, and its facts."""
    use_fast = config.tissue == "fast" or (config.tissue == "auto" and "fast" in subject.files)
    tissue_role = "t1" if "t1" in subject.files else "t1ce"
    roles = [*config.modalities, "seg"]
    if use_fast:
        roles.append("fast")
    elif config.tissue != "none" and tissue_role not in roles:
        roles.append(tissue_role)
    volumes = load_subject(subject, roles, convention)
    image = np.stack([to_uint16(_standardised(volumes[m].data, config.intensity), volumes[m].file)
                      for m in config.modalities])
    seg = volumes["seg"].data
    if config.tissue == "none":
        tissue = None
    elif use_fast:
        tissue = volumes["fast"].data
    else:
        reference = volumes[tissue_role].data
        brain = (reference > 0) | (image > 0).any(axis=0) | (seg > 0)
        # A resection cavity is segmented with the tissue (its voxels take the tissue class found there).
        tissue = segment_tissue(reference, brain, exclude=tumour_classes(seg, convention) > 0)
    source = volumes["seg"]
    facts: dict[str, Any] = {"orientation": source.orientation, "reoriented": source.reoriented,
                             "identity_header": source.identity_header}
    if convention == "brats2023":
        facts["resection_cavity_voxels"] = int(resection_cavity(seg, convention).sum())
        if facts["resection_cavity_voxels"]:
            log.debug("%s: %d resection-cavity voxels mapped to the tissue underneath", source.file,
                      facts["resection_cavity_voxels"])
    return image, compose_mask(seg, tissue, convention), facts


def _standardised(volume: np.ndarray, intensity: str) -> np.ndarray:
    """``volume`` as it is stored: unchanged (``raw``), or scaled so its non-zero voxels' median is
    :data:`VOLUME_MEDIAN` (``volume``; an all-zero volume stays zero)."""
    if intensity == "raw":
        return volume
    data = np.asarray(volume, dtype=np.float64)
    brain = data[data > 0]
    return data * (VOLUME_MEDIAN / float(np.median(brain))) if brain.size else data


def _provenance(cohort: Cohort, config: PrepareConfig, convention: str,
                ingested: list[tuple[str, int, dict[str, Any]]]) -> dict[str, Any]:
    """What the manifest records of the source beyond the options: layout, label convention, orientation,
    resection-cavity voxels (brats2023), unlabelled cases (MSD). Logs the resection-cavity warning."""
    facts = {name: f for name, _, f in ingested}
    doc: dict[str, Any] = {
        "layout": "+".join(cohort.layouts),
        "labels": {"convention": convention, "from": "--labels" if config.labels else "layout"},
        "orientation": {
            "target": "".join(BRATS_AXCODES),
            "source": dict(sorted(Counter(f["orientation"] for f in facts.values() if "orientation" in f).items())),
            "reoriented": sorted(n for n, f in facts.items() if f.get("reoriented")),
            "identity_header_read_as_brats": sum(bool(f.get("identity_header")) for f in facts.values()),
        },
    }
    if convention == "brats2023":
        cavities = {n: f["resection_cavity_voxels"] for n, f in facts.items() if f.get("resection_cavity_voxels")}
        doc["resection_cavity_voxels"] = sum(cavities.values())
        doc["resection_cavity_subjects"] = dict(sorted(cavities.items()))
        if cavities:
            log.warning("%d resection-cavity voxels (label 4, BraTS 2024 post-treatment) in %d subjects are no tumour "
                        "class: mapped to the tissue underneath (background where there is none); counted in the "
                        "manifest's provenance.resection_cavity_voxels", doc["resection_cavity_voxels"], len(cavities))
    if cohort.unlabelled:
        doc["unlabelled"] = list(cohort.unlabelled)
    return doc


def _write_store(writer: StoreWriter, ingested: list[tuple[str, int, dict[str, Any]]], skipped: list[dict[str, str]],
                 config: PrepareConfig, source: dict[str, Any]) -> Manifest:
    """Phase 2: split, write shards, export PNGs, write the manifest (which removes the work folder)."""
    out, work = Path(config.out), Path(config.out) / WORK
    names = [name for name, _, _ in ingested]
    depths = np.array([depth for _, depth, _ in ingested])
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
        jobs = [(out, f, config.modalities) for f in shard_files]
        list(parallel_map(export_png, jobs, config.workers, desc="png shards"))
    return writer.finish(
        kind="real", image_size=config.size, has_image=True, shard_counts=shard_counts, modality=config.modality,
        skipped=tuple(skipped),
        provenance={"tool": f"tumorsynth {__version__} prepare", "subjects": len(names), **source},
    )


def export_png(job: tuple[Path, Path, tuple[str, ...]]) -> int:
    """Write the PNGs of one shard that do not exist yet; returns how many were written. ``job`` is (store, shard,
    the store's modalities): a one-channel image goes to ``png/<split>/image/``, channel ``c`` of several to
    ``png/<split>/image-<modality c>/``."""
    store, shard, modalities = job
    split = shard.parent.name
    written = 0
    with h5py.File(shard, "r") as f:
        subjects = f["subject"].asstr()[:]
        slices = f["slice"][:]
        planes = [("label", None)]
        if "image" in f:
            several = f["image"].ndim == 4
            planes += [(f"image-{name}", c) for c, name in enumerate(modalities)] if several else [("image", None)]
        for folder_name, channel in planes:
            data = f["label" if folder_name == "label" else "image"]
            folder = store / "png" / split / folder_name
            for row, (subject, z) in enumerate(zip(subjects, slices)):
                path = folder / png_name(subject, int(z))
                if not path.exists():
                    write_png(path, data[row] if channel is None else data[row, channel])
                    written += 1
    return written


def result_json(result: PrepareResult) -> dict[str, Any]:
    """A JSON summary of a run for the command line."""
    doc: dict[str, Any] = {"store": str(result.store), "resumed": result.resumed,
                           "already_complete": result.already_complete, "seconds": round(result.seconds, 2)}
    if result.manifest is not None:
        doc["splits"] = {k: v.n for k, v in result.manifest.splits.items()}
        doc["skipped"] = list(result.manifest.skipped)
        doc["unlabelled"] = [case["subject"] for case in result.manifest.provenance.get("unlabelled", ())]
    return doc

