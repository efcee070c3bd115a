"""The sharded HDF5 store (format ``tumorsynth-store/1``): manifest, shard writing, reading and verification.

Layout (DESIGN §4)::

    STORE/manifest.json            written last and atomically; a store without it is incomplete
    STORE/<split>/shard-00000.h5   image uint16 [n,S,S], or [n,C,S,S] for a store of C ≥ 2 modalities (absent in
                                   mask-only stores), label uint8 [n,S,S],
                                   subject fixed-length utf-8 [n], slice int16 [n], empty bool [n],
                                   class_pixels uint32 [n,K]
    STORE/.progress.jsonl          while a store is being written: one line per finished shard (removed at the end)
    STORE/.options.json            while a store is being written: the options and input fingerprints that define it
                                   (a resume with other ones is refused; copied into the manifest's provenance)
    STORE/.lock                    the writer's lock (toolkit.lock): one writer per store

Shard datasets are compressed with Blosc (LZ4, byte shuffle) through ``hdf5plugin`` by default, rather than DESIGN
§4's lzf: measured on phantom slices at 256², it reads 5× faster (94 vs 501 µs per image+label row), writes 4× faster
and is smaller (17.7 vs 21.9 KiB per row). Importing this module registers the filter; other HDF5 tools need
``HDF5_PLUGIN_PATH=$(python -c 'import hdf5plugin; print(hdf5plugin.PLUGIN_PATH)')``. A store can instead be written
(``compression``, :data:`CODECS`) with gzip + shuffle or no compression, HDF5 built-ins that every HDF5 build reads
(plain h5py, h5dump, HDFView, MATLAB); the manifest's ``compression`` says which (absent in no store written so far:
its absence means Blosc LZ4), and :mod:`toolkit.data.convert` rewrites a store with another.

Corruption is detected when rows are read. Blosc/LZ4 carries no checksum (of 40 random single-bit flips in a 256²
shard's chunk data, 27 read back as wrong rows without an error, in another draw 31), so every dataset also carries
HDF5's fletcher32 checksum, computed over the compressed chunk: all 40 flips then raise, for about 4 % more CPU time
per row read (measured in one run, per-row reads as the loader does them). Stores written before that have no
fletcher32: :func:`open_shard` checks such a shard's SHA-256 against the manifest when a process first opens it.
Either way a reader stops with :class:`CorruptShardError` naming the shard file.

A shard is built in memory (HDF5's core driver; its compressed bytes, about 18 MiB for 1024 rows at 256²) and written
with plain file I/O through :mod:`toolkit.atomic`: HDF5's own writes swallow a full disk's ENOSPC and can then crash
the process (measured: a segmentation fault, the temporary file left), whereas Python's raise, and become one
:class:`~toolkit.atomic.DiskError` naming the file, with the temporary file removed. Writing costs the same as before
(CPU time per shard within ±6 % in one run), and the bytes depend only on the rows, not on the writing process.

A store may hold several MR modalities per slice (``prepare --modality t1ce,flair``): the manifest's ``modality``
is then their comma-separated list in channel order and each image row is ``[C,S,S]``; a one-modality store keeps
DESIGN §4's ``[S,S]`` rows, so every store written before reads as it did. :attr:`Manifest.channels` says which.

Two per-row datasets go beyond DESIGN §4: ``empty`` (the mask is all background, so consumers such as the PGAN can
drop it without reading the label) and ``class_pixels`` (pixel count per class, so class frequencies and the U-Net's
class weights over any subset, e.g. the reduced prefix, come without reading labels). Rows are in shuffled order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import hdf5plugin
import numpy as np

from toolkit import provenance
from toolkit.atomic import naming_disk_errors, remove_stale_temps, write_bytes, write_json
from toolkit.data.labels import CLASS_NAMES
from toolkit.lock import WriterLock

FORMAT = "tumorsynth-store/1"
MANIFEST = "manifest.json"
PROGRESS = ".progress.jsonl"
OPTIONS = ".options.json"
SPLITS = ("train", "val", "test")
CODECS = ("blosc-lz4", "gzip", "none")
DEFAULT_CODEC = "blosc-lz4"
# codec → the filters of every shard dataset (fletcher32 in each: corruption is detected at read time, whatever the
# codec) and the manifest's ``compression`` value, which describes them
_FILTERS: dict[str, dict[str, Any]] = {
    "blosc-lz4": {**hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE), "fletcher32": True},
    "gzip": {"compression": "gzip", "compression_opts": 4, "shuffle": True, "fletcher32": True},
    "none": {"fletcher32": True},
}
_DESCRIPTIONS = {"blosc-lz4": "blosc-lz4-shuffle+fletcher32", "gzip": "gzip-4-shuffle+fletcher32",
                 "none": "none+fletcher32"}
# codec → the HDF5 filter ids its datasets carry (32001 Blosc, 1 deflate, 2 shuffle, 3 fletcher32)
FILTER_IDS = {"blosc-lz4": frozenset({32001, 3}), "gzip": frozenset({1, 2, 3}), "none": frozenset({3})}
COMPRESSION = _DESCRIPTIONS[DEFAULT_CODEC]
KINDS = ("real", "synthetic")

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A store is missing, incomplete or malformed; the message names the file and the field."""


def codec_of(compression: str) -> str:
    """The codec (one of :data:`CODECS`) of a manifest's ``compression`` value, e.g. ``gzip-4-shuffle+fletcher32`` →
    ``gzip``; ValueError for one that names none (the manifests written so far say ``blosc-lz4-shuffle``, with or
    without ``+fletcher32``)."""
    for codec in CODECS:
        if compression == codec or compression.startswith((f"{codec}-", f"{codec}+")):
            return codec
    raise ValueError(f"compression {compression!r} is none of {CODECS}")


def check_codec(codec: str) -> str:
    """``codec`` itself when it is one of :data:`CODECS`, else ValueError naming them."""
    if codec not in CODECS:
        raise ValueError(f"compression {codec!r}: expected one of {CODECS}")
    return codec


def describe_codec(codec: str) -> str:
    """The manifest's ``compression`` value for shards written with ``codec``, e.g. ``gzip-4-shuffle+fletcher32``."""
    return _DESCRIPTIONS[check_codec(codec)]


def filter_ids(dataset: h5py.Dataset) -> frozenset[int]:
    """The ids of the HDF5 filters ``dataset`` is written with."""
    plist = dataset.id.get_create_plist()
    return frozenset(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))


def dataset_codec(dataset: h5py.Dataset) -> str | None:
    """The codec whose filters ``dataset`` carries exactly, None when they are no codec's (e.g. no fletcher32)."""
    ids = filter_ids(dataset)
    return next((codec for codec, want in FILTER_IDS.items() if ids == want), None)


class CorruptShardError(StoreError):
    """A shard fails its checksum or cannot be read; the message names the shard file."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard file: its path relative to the store, row count, checksum and per-shard statistics."""

    file: str
    n: int
    sha256: str
    class_pixels: tuple[int, ...]
    empty: int
    intensity_max: int | None

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ShardInfo:
        """Inverse of ``dataclasses.asdict``."""
        return cls(**{**doc, "class_pixels": tuple(doc["class_pixels"])})


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split, in row order."""

    n: int
    shards: tuple[ShardInfo, ...]

    @property
    def class_pixels(self) -> tuple[int, ...]:
        """Total pixels per class over the split."""
        return tuple(int(v) for v in np.sum([s.class_pixels for s in self.shards], axis=0)) if self.shards else ()

    @property
    def empty(self) -> int:
        """Number of rows whose mask is all background."""
        return sum(s.empty for s in self.shards)


@dataclass(frozen=True)
class Manifest:
    """Everything a reader needs to know about a store; serialised as ``manifest.json``."""

    kind: str
    image_size: int
    classes: int
    has_image: bool
    splits: dict[str, SplitInfo]
    reduced_fraction: float = 0.2
    modality: str | None = None
    intensity_max: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    skipped: tuple[dict[str, str], ...] = ()
    created: str = ""
    compression: str = COMPRESSION
    format: str = FORMAT

    @property
    def modalities(self) -> tuple[str, ...]:
        """The image channels' modalities in order; empty when unrecorded."""
        return modality_list(self.modality)

    @property
    def channels(self) -> int:
        """Image channels per row: one per modality (1 for a store that records none)."""
        return max(1, len(self.modalities))

    def image_shape(self, n: int) -> tuple[int, ...]:
        """The shape of ``n`` stored image rows: ``(n, S, S)`` for one channel (DESIGN §4), ``(n, C, S, S)`` for
        C ≥ 2."""
        size = self.image_size
        return (n, size, size) if self.channels == 1 else (n, self.channels, size, size)

    @property
    def codec(self) -> str:
        """The codec of the shards (one of :data:`CODECS`)."""
        return codec_of(self.compression)

    @property
    def reduced(self) -> int:
        """Rows of the reduced training set: a prefix of the (shuffled) training split."""
        train = self.splits.get("train")
        return round(self.reduced_fraction * train.n) if train else 0

    def to_json(self) -> dict[str, Any]:
        """The JSON document written to ``manifest.json``."""
        return {
            "format": self.format,
            "kind": self.kind,
            "image_size": self.image_size,
            "classes": self.classes,
            "has_image": self.has_image,
            "compression": self.compression,
            "modality": self.modality,
            "intensity_max": self.intensity_max,
            "splits": {
                name: {"n": s.n, "empty": s.empty, "class_pixels": list(s.class_pixels),
                       "shards": [dataclasses.asdict(sh) for sh in s.shards]}
                for name, s in self.splits.items()
            },
            "reduced": {"fraction": self.reduced_fraction, "n": self.reduced},
            "provenance": self.provenance,
            "skipped": list(self.skipped),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], source: Path) -> Manifest:
        """Parse a manifest document; a missing or wrong field raises StoreError naming ``source`` and the field."""

        def need(obj: dict[str, Any], key: str, where: str) -> Any:
            if key not in obj:
                raise StoreError(f"{source}: missing field '{where}{key}'")
            return obj[key]

        if need(doc, "format", "") != FORMAT:
            raise StoreError(f"{source}: field 'format' is {doc['format']!r}, expected {FORMAT!r}")
        if need(doc, "kind", "") not in KINDS:
            raise StoreError(f"{source}: field 'kind' is {doc['kind']!r}, expected one of {KINDS}")
        splits = {}
        for name, s in need(doc, "splits", "").items():
            shards = tuple(ShardInfo.from_dict(sh) for sh in need(s, "shards", f"splits.{name}."))
            n = need(s, "n", f"splits.{name}.")
            if n != sum(sh.n for sh in shards):
                raise StoreError(f"{source}: field 'splits.{name}.n' = {n} disagrees with its shards")
            splits[name] = SplitInfo(n=n, shards=shards)
        reduced = need(doc, "reduced", "")
        # every manifest written so far has the field; one without it means the only codec there was then
        compression = doc.get("compression", DEFAULT_CODEC)
        try:
            codec_of(compression)
        except (ValueError, AttributeError):
            raise StoreError(f"{source}: field 'compression' is {compression!r}, expected one of {CODECS} "
                             "(optionally followed by its settings, e.g. 'gzip-4-shuffle+fletcher32')") from None
        return cls(
            kind=doc["kind"], image_size=need(doc, "image_size", ""), classes=need(doc, "classes", ""),
            has_image=need(doc, "has_image", ""), splits=splits, reduced_fraction=need(reduced, "fraction", "reduced."),
            compression=compression, modality=doc.get("modality"),
            intensity_max=doc.get("intensity_max"),
            provenance=doc.get("provenance", {}), skipped=tuple(doc.get("skipped", ())), created=doc.get("created", ""),
        )


def modality_list(modality: str | None) -> tuple[str, ...]:
    """A ``modality`` value (one name, or several comma-separated in channel order) as its names; () for none."""
    return tuple(modality.split(",")) if modality else ()


def as_channels(image: np.ndarray) -> np.ndarray:
    """Stored image rows (``[n,S,S]`` or ``[n,C,S,S]``) as ``[n,C,S,S]``, a view."""
    return image[:, None] if image.ndim == 3 else image


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(split: str, index: int) -> str:
    """Relative path of shard ``index`` of ``split``."""
    return f"{split}/shard-{index:05d}.h5"


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Turn an error of HDF5 while reading the shard ``path`` (a fletcher32 mismatch, a damaged header, a failing
    disk) into CorruptShardError naming the file."""
    try:
        yield
    except OSError as err:
        raise CorruptShardError(f"{path}: cannot read the shard ({err}); it is corrupt or unreadable "
                                "(`tumorsynth store verify` checks every shard)") from err


# Shards without fletcher32 whose checksum held in this process: (path, sha256, size, mtime_ns); a changed file is
# checked again.
_verified: set[tuple[str, str, int, int]] = set()


def open_shard(path: Path, sha256: str, **options: Any) -> h5py.File:
    """Open a shard for reading (``options`` go to ``h5py.File``); CorruptShardError names it when it is corrupt.

    A shard with fletcher32 is checked chunk by chunk as it is read (wrap reads in :func:`reading`); one without (a
    store written before fletcher32) is checked against its manifest ``sha256`` on its first open in this process.
    """
    with reading(path):
        f = h5py.File(path, "r", **options)
        try:
            if not all(f[name].fletcher32 for name in f):
                stat = os.stat(path)
                key = (str(Path(path).resolve()), sha256, stat.st_size, stat.st_mtime_ns)
                if key not in _verified:
                    if sha256_file(path) != sha256:
                        raise CorruptShardError(f"{path}: checksum mismatch with the manifest (corrupt shard)")
                    _verified.add(key)
        except BaseException:
            f.close()
            raise
    return f


def write_shard(path: Path, *, label: np.ndarray, subject: Sequence[str], slice_index: np.ndarray,
                classes: int, image: np.ndarray | None = None, compression: str = DEFAULT_CODEC) -> ShardInfo:
    """Atomically write one shard file and return its info (``file`` relative to the split's parent folder).

    ``compression`` is the codec of every dataset (one of :data:`CODECS`).

    Rows are checked before anything is written: a label ≥ ``classes`` raises StoreError naming the shard. A full
    disk raises :class:`~toolkit.atomic.DiskError` naming the file, and leaves no temporary file.
    """
    n, size = label.shape[0], label.shape[-1]
    if label.dtype != np.uint8 or label.shape != (n, size, size) or n == 0:
        raise ValueError(f"{path}: label must be uint8 [n,S,S] with n ≥ 1, got {label.dtype} {label.shape}")
    if image is not None and (image.dtype != np.uint16 or image.shape[0] != n or image.shape[-2:] != (size, size)
                              or image.ndim not in (3, 4) or (image.ndim == 4 and image.shape[1] < 2)):
        raise ValueError(f"{path}: image must be uint16 [n,S,S] or [n,C,S,S] with C ≥ 2 (label {label.shape}), got "
                         f"{image.dtype} {image.shape}")
    if len(subject) != n or len(slice_index) != n:
        raise ValueError(f"{path}: subject and slice must have one entry per row")
    peak = int(label.max())
    if peak >= classes:
        raise StoreError(f"{path}: label {peak} in a store of {classes} classes (labels must be 0…{classes - 1}); "
                         "nothing written")
    # Per-row class histogram, a bincount per row: measured 1.8× faster at 256² than one bincount over all rows
    # offset into per-row bin blocks, which first builds an int64 copy 8× the size of the labels.
    class_pixels = np.zeros((n, classes), dtype=np.uint32)
    for row, values in zip(class_pixels, label.reshape(n, -1)):
        row[:] = np.bincount(values, minlength=classes)
    empty = class_pixels[:, 0] == size * size
    # Fixed-length UTF-8, stored inline: variable-length strings live in HDF5's global heap, whose unused bytes
    # are not guaranteed to be initialised, and shard checksums must not depend on the writer's memory.
    encoded = [name.encode() for name in subject]
    width = max((len(e) for e in encoded), default=1) or 1
    rows = {"image": image, "label": label,
            "subject": np.array(encoded, dtype=h5py.string_dtype("utf-8", width)),
            "slice": np.asarray(slice_index, dtype=np.int16), "empty": empty, "class_pixels": class_pixels}
    data = shard_bytes(path, {name: array for name, array in rows.items() if array is not None}, compression)
    write_bytes(path, data)
    return ShardInfo(
        file=f"{path.parent.name}/{path.name}", n=n, sha256=hashlib.sha256(data).hexdigest(),
        class_pixels=tuple(int(v) for v in class_pixels.sum(0)), empty=int(empty.sum()),
        intensity_max=int(image.max()) if image is not None else None,
    )


def shard_bytes(path: Path, datasets: dict[str, np.ndarray], compression: str = DEFAULT_CODEC) -> bytes:
    """The bytes of an HDF5 file holding ``datasets`` with the codec ``compression``, built in memory (nothing of it
    touches the disk; ``path`` only names it). Arrays keep their dtype, h5py's string metadata included."""
    filters = _FILTERS[check_codec(compression)]
    with h5py.File(str(path), "w", driver="core", backing_store=False) as f:
        for name, array in datasets.items():
            # image and label rows are their own chunks (random access reads one row); per-row metadata is one chunk
            chunks = (1, *array.shape[1:]) if name in ("image", "label") else array.shape
            f.create_dataset(name, data=array, dtype=array.dtype, chunks=chunks, **filters)
        f.flush()
        return f.id.get_file_image()


class StoreWriter:
    """Writes a store shard by shard; resumable: finished shards are logged and skipped when their checksum holds.

    The writer holds the store's :class:`~toolkit.lock.WriterLock` from construction until :meth:`finish` or
    :meth:`close` (a second writer fails at once, naming the holder), removes temporary files a killed writer left,
    and records ``options`` (what defines the store's content: the command's options and its inputs' fingerprints) in
    ``.options.json``, refusing a resume with other ones; :meth:`finish` copies them into the manifest's provenance.
    Callers decide shard boundaries deterministically, ask :meth:`done` before computing a shard, write it with
    :meth:`write`, and call :meth:`finish` last, which writes the manifest and removes the progress log and the
    ``scratch`` folders (names under the root holding the caller's intermediate files, e.g. prepare's ``.work``).
    ``resumed`` says whether an earlier run had recorded the options (the store is being resumed). ``compression`` is
    the codec of the shards :meth:`write` writes, recorded in the manifest (a caller that resumes must make it part of
    ``options``, so that a store never mixes codecs).
    """

    def __init__(self, root: Path, *, classes: int, options: dict[str, Any] | None = None,
                 scratch: Sequence[str] = (), compression: str = DEFAULT_CODEC) -> None:
        self.root = Path(root)
        self.classes = classes
        self.compression = check_codec(compression)
        self.options = options
        self.scratch = tuple(scratch)
        self.resumed = False
        self._lock = WriterLock(self.root, "store").acquire()
        try:
            if (self.root / MANIFEST).exists():
                raise StoreError(f"{self.root}: store is already complete (manifest.json exists)")
            if options is not None:  # first: a refused resume touches nothing
                self.resumed = provenance.claim(self.root / OPTIONS, options)
            stale = remove_stale_temps(self.root)
            if stale:
                log.info("%s: removed %d temporary files of a killed writer", self.root, stale)
            self._done = self._progress()
        except BaseException:
            self._lock.release()
            raise

    def _progress(self) -> dict[tuple[str, int], ShardInfo]:
        """The shards logged by earlier runs whose files still match their checksums."""
        done: dict[tuple[str, int], ShardInfo] = {}
        progress = self.root / PROGRESS
        if progress.exists():
            for line in progress.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-append: its shard is simply redone
                info = ShardInfo.from_dict(entry["info"])
                path = self.root / info.file
                if path.exists() and sha256_file(path) == info.sha256:
                    done[(entry["split"], entry["index"])] = info
                else:
                    log.warning("%s: shard %s failed its checksum; it will be rewritten", self.root, info.file)
        return done

    def close(self) -> None:
        """Give up the store's lock without finishing (the store stays incomplete and resumable)."""
        self._lock.release()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def done(self, split: str, index: int) -> ShardInfo | None:
        """The info of a shard finished earlier (checksum verified), else None."""
        return self._done.get((split, index))

    def write(self, split: str, index: int, **rows: Any) -> ShardInfo:
        """Write shard ``index`` of ``split`` (keyword arguments as :func:`write_shard`) and log it."""
        return self.record(split, index, write_shard(self.root / shard_name(split, index), classes=self.classes,
                                                     compression=self.compression, **rows))

    def record(self, split: str, index: int, info: ShardInfo) -> ShardInfo:
        """Log shard ``index`` of ``split``, written by :func:`write_shard` (possibly by another process)."""
        line = json.dumps({"split": split, "index": index, "info": dataclasses.asdict(info)}) + "\n"
        # a torn last line is skipped on resume (see _progress)
        with naming_disk_errors(self.root / PROGRESS), open(self.root / PROGRESS, "a") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self._done[(split, index)] = info
        return info

    def finish(self, *, kind: str, image_size: int, has_image: bool, shard_counts: dict[str, int],
               **fields: Any) -> Manifest:
        """Write the manifest (last, atomically) from the logged shards; every shard must be done."""
        splits = {}
        for split, count in shard_counts.items():
            missing = [i for i in range(count) if (split, i) not in self._done]
            if missing:
                raise StoreError(f"{self.root}: split '{split}' lacks shards {missing}")
            shards = tuple(self._done[(split, i)] for i in range(count))
            splits[split] = SplitInfo(n=sum(s.n for s in shards), shards=shards)
        maxima = [s.intensity_max for sp in splits.values() for s in sp.shards if s.intensity_max is not None]
        if self.options is not None:
            fields["provenance"] = {**fields.get("provenance", {}), "options": self.options}
        fields.setdefault("compression", describe_codec(self.compression))
        manifest = Manifest(
            kind=kind, image_size=image_size, classes=self.classes, has_image=has_image, splits=splits,
            intensity_max=max(maxima) if maxima else None,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields,
        )
        write_json(self.root / MANIFEST, manifest.to_json())
        tidy(self.root, self.scratch)
        self.close()
        return manifest


def tidy(root: Path, scratch: Sequence[str] = ()) -> None:
    """Remove a finished writer's bookkeeping (progress log, options record) and its ``scratch`` folders from the
    complete store ``root``; the caller holds the store's lock."""
    (root / PROGRESS).unlink(missing_ok=True)
    (root / OPTIONS).unlink(missing_ok=True)
    for name in scratch:
        shutil.rmtree(root / name, ignore_errors=True)


def complete(root: Path, options: dict[str, Any] | None = None) -> Manifest | None:
    """The manifest of the complete store ``root``, None when it is incomplete or absent; with ``options``, a complete
    store made with other ones raises :class:`~toolkit.provenance.OptionsChanged` naming them (a re-run with other
    options must not report "complete")."""
    if not (Path(root) / MANIFEST).exists():
        return None
    manifest = Store(root).manifest
    if options is not None:
        provenance.compare(manifest.provenance.get("options", {}), options, root)
    return manifest


class Store:
    """Read access to a complete store: manifest, shard paths and row ranges."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        path = self.root / MANIFEST
        if not self.root.is_dir():
            raise StoreError(f"{self.root}: no such store directory")
        if not path.exists():
            raise StoreError(f"{self.root}: incomplete store (no manifest.json); re-run the command that writes it")
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{path}: not valid JSON ({err})") from None
        self.manifest = Manifest.from_json(doc, path)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k} {v.n}" for k, v in self.manifest.splits.items())
        return f"Store({str(self.root)!r}, {self.manifest.kind}, {self.manifest.classes} classes, {counts})"

    def split(self, name: str) -> SplitInfo:
        """The split ``name``; StoreError if the store has none."""
        try:
            return self.manifest.splits[name]
        except KeyError:
            raise StoreError(f"{self.root}: no split '{name}' (has {sorted(self.manifest.splits)})") from None

    def shards(self, split: str) -> Iterator[tuple[ShardInfo, Path]]:
        """Shard infos and absolute paths of ``split`` in row order."""
        for info in self.split(split).shards:
            yield info, self.root / info.file

    def read(self, split: str, start: int = 0, stop: int | None = None,
             fields: Sequence[str] = ("label",)) -> dict[str, np.ndarray]:
        """Rows ``[start, stop)`` of ``split`` as arrays, reading only the shards that overlap the range; a corrupt
        shard raises CorruptShardError naming it."""
        info = self.split(split)
        stop = info.n if stop is None else min(stop, info.n)
        parts: dict[str, list[np.ndarray]] = {f: [] for f in fields}
        offset = 0
        for shard, path in self.shards(split):
            lo, hi = max(start - offset, 0), min(stop - offset, shard.n)
            if lo < hi:
                with open_shard(path, shard.sha256) as f, reading(path):
                    for name in fields:
                        parts[name].append(f[name][lo:hi])
            offset += shard.n
        return {name: (np.concatenate(p) if p else np.empty((0,))) for name, p in parts.items()}


def verify(store: Store) -> list[str]:
    """Recompute every shard's checksum and check its datasets (dtypes, shapes, the manifest's codec); returns one
    message per problem (empty if sound)."""
    problems = []
    m = store.manifest
    filters = FILTER_IDS[m.codec]
    # stores written before fletcher32 say so by its absence from the description (their per-row metadata was not
    # compressed at all, so only image and label are checked)
    allowed = {filters} if "+fletcher32" in m.compression else {filters, filters - {3}}
    for split in m.splits:
        for info, path in store.shards(split):
            if not path.exists():
                problems.append(f"{path}: missing shard")
                continue
            if sha256_file(path) != info.sha256:
                problems.append(f"{path}: checksum mismatch (corrupt shard)")
                continue
            try:
                with h5py.File(path, "r") as f:
                    expected = {"label": (np.uint8, (info.n, m.image_size, m.image_size))}
                    if m.has_image:
                        expected["image"] = (np.uint16, m.image_shape(info.n))
                    for name, (dtype, shape) in expected.items():
                        if name not in f or f[name].dtype != dtype or f[name].shape != shape:
                            problems.append(f"{path}: dataset '{name}' is not {np.dtype(dtype)} {shape}")
                    wrong = [name for name in ("image", "label") if name in f and filter_ids(f[name]) not in allowed]
                    if wrong:
                        problems.append(f"{path}: datasets {wrong} are not written with the manifest's compression "
                                        f"{m.compression!r}")
            except OSError as err:
                problems.append(f"{path}: unreadable ({err})")
    return problems


def summary(store: Store) -> dict[str, Any]:
    """The ``store info`` JSON object (DESIGN §3 keys plus class frequencies and empty counts)."""
    m = store.manifest
    names = CLASS_NAMES.get(m.classes)
    freqs = {}
    for split, info in m.splits.items():
        pixels = np.asarray(info.class_pixels, dtype=np.float64)
        total = pixels.sum()
        share = pixels / total if total else pixels
        freqs[split] = {(names[i] if names else str(i)): float(v) for i, v in enumerate(share)}
    return {
        "format": m.format,
        "compression": m.codec,
        "kind": m.kind,
        "image_size": m.image_size,
        "classes": m.classes,
        "modality": m.modality,
        "intensity_max": m.intensity_max,
        "splits": {k: v.n for k, v in m.splits.items()},
        "reduced": m.reduced,
        "empty": {k: v.empty for k, v in m.splits.items()},
        "class_frequencies": freqs,
        "skipped": list(m.skipped),
        "provenance": m.provenance,
    }
