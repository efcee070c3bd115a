"""`tumorsynth store convert`: a complete store rewritten with another compression (:data:`~toolkit.data.store.CODECS`).

Blosc LZ4, the default, needs ``hdf5plugin`` (or ``HDF5_PLUGIN_PATH``) in every reader; gzip + shuffle and no
compression are HDF5 built-ins, so a converted store opens in plain h5py, h5dump, HDFView or MATLAB.

What stays: every dataset of every shard (names, dtypes, shapes, values; chunks as the store writer lays them out;
the variable-length strings of the first format's shards, which no filter takes, become today's fixed-length UTF-8),
the manifest (splits, row order, shard files and their statistics, provenance, ``created``) and the PNG export. What
changes: the shards' bytes, hence their ``sha256`` in the manifest, so ``store verify`` holds on the output; the
manifest's ``compression``; and its provenance, which gains a ``conversions`` entry (source folder, the fingerprint of
its manifest, both codecs, when) and, where it records the options that made the store, their ``compression`` follows
the new codec (recorded only when it is not the default, as ``prepare`` records it), so that ``prepare --compression
gzip`` re-run onto a store converted to gzip finds it complete, and any other re-run is refused naming the option.

How, so that OUT appears complete and verified or not at all:

1. OUT must not exist. The output is built in ``.<OUT name>.converting`` beside OUT under the writer lock
   (:class:`~toolkit.lock.WriterLock`) of that folder: a second conversion to the same OUT stops naming the holder,
   and what a killed one left there is removed first.
2. Each source shard is read once into memory; its bytes must match the manifest's sha256 (else
   :class:`~toolkit.data.store.CorruptShardError` naming it), its datasets are decoded from those very bytes
   (fletcher32 checked), written with the new codec (atomically: temporary file, fsync, rename), read back from the
   disk and compared with the source, dataset by dataset.
3. The PNGs are copied (each fsynced) and the manifest written; ``store verify`` must pass on the folder, which is then
   renamed to OUT (its parent fsynced). Files and folders get the modes the umask gives.

On any error the temporary folder is removed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from toolkit import __version__, provenance
from toolkit.atomic import fsync_dir, naming_disk_errors, write_bytes, write_json
from toolkit.data.store import (
    DEFAULT_CODEC,
    MANIFEST,
    CorruptShardError,
    Manifest,
    ShardInfo,
    SplitInfo,
    Store,
    StoreError,
    check_codec,
    dataset_codec,
    describe_codec,
    reading,
    shard_bytes,
    verify,
)
from toolkit.lock import LOCK, WriterLock

log = logging.getLogger(__name__)

_BLOCK = 128  # rows compared at a time when a written shard is read back (bounds the memory of the comparison)


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did: the new store's manifest, the codecs, shard count and sizes (bytes of all shards)."""

    store: Path
    source: Path
    manifest: Manifest
    source_codec: str
    shards: int
    pngs: int
    bytes: int
    source_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The ``store convert --json`` object."""
        return {"store": str(self.store), "source": str(self.source), "compression": self.manifest.codec,
                "source_compression": self.source_codec, "shards": self.shards, "pngs": self.pngs,
                "bytes": self.bytes, "source_bytes": self.source_bytes, "seconds": round(self.seconds, 2)}


def convert(source: str | os.PathLike[str], out: str | os.PathLike[str], compression: str) -> ConvertResult:
    """Write the store ``source`` anew as ``out`` with the codec ``compression`` (see the module docstring).

    Raises StoreError (CorruptShardError for a bad shard) naming the file, ValueError for an unknown codec,
    :class:`~toolkit.lock.LockedError` when another conversion to ``out`` is running.
    """
    start = time.perf_counter()
    codec = check_codec(compression)
    source, out = Path(source), Path(out)
    _refuse_existing(out)
    store = Store(source)  # not a (complete) store: StoreError naming it
    if not out.parent.is_dir():
        raise StoreError(f"{out.parent}: no such directory (the parent of OUT must exist)")
    work = out.parent / f".{out.name}.converting"
    lock = WriterLock(work, "store conversion").acquire()
    try:
        _empty(work)  # what a killed conversion left; ours to remove, since we hold the lock
        _refuse_existing(out)  # checked again under the lock: another conversion may have finished meanwhile
        manifest, sizes, pngs = _write(store, work, codec)
        problems = verify(Store(work))
        if problems:
            raise StoreError(f"{work}: the converted store fails verification: {'; '.join(problems)}")
        _refuse_existing(out)
        os.rename(work, out)
        fsync_dir(out.parent)
    except BaseException:
        _remove(work)
        raise
    finally:
        lock.release()
    log.info("%s: %d shards of %s rewritten with %s", out, len(sizes), source, codec)
    return ConvertResult(store=out, source=source, manifest=manifest, source_codec=store.manifest.codec,
                         shards=len(sizes), pngs=pngs, bytes=sum(new for new, _ in sizes),
                         source_bytes=sum(old for _, old in sizes), seconds=time.perf_counter() - start)


def _refuse_existing(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise StoreError(f"{out}: already exists; store convert writes a new store and never overwrites one")


def _empty(folder: Path) -> None:
    """Remove everything in ``folder`` but its lock file (unlinking that would let a second writer lock a new one)."""
    for entry in folder.iterdir():
        if entry.name == LOCK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _remove(folder: Path) -> None:
    """Remove the temporary folder of a failed conversion, its lock file last (the caller still holds the lock); a
    failure to is logged, not raised, so that the error that stopped the conversion is the one reported."""
    try:
        if folder.is_dir():
            _empty(folder)
            (folder / LOCK).unlink(missing_ok=True)
            folder.rmdir()
    except OSError as err:
        log.warning("%s: could not remove the temporary folder of the failed conversion (%s)", folder, err)


def _write(store: Store, work: Path, codec: str) -> tuple[Manifest, list[tuple[int, int]], int]:
    """Every shard, the PNGs and the manifest into ``work``; the manifest, (new, old) shard sizes, PNGs copied."""
    m = store.manifest
    splits, sizes = {}, []
    for split, info in m.splits.items():
        shards = []
        for shard in info.shards:
            parts = Path(shard.file).parts
            if Path(shard.file).is_absolute() or ".." in parts or len(parts) != 2:
                raise StoreError(f"{store.root / MANIFEST}: shard file {shard.file!r} is not <split>/<name>")
            new = convert_shard(store.root / shard.file, work / shard.file, shard, codec)
            shards.append(new)
            sizes.append(((work / new.file).stat().st_size, (store.root / shard.file).stat().st_size))
        splits[split] = SplitInfo(n=info.n, shards=tuple(shards))
    pngs = _copy_tree(store.root / "png", work / "png") if (store.root / "png").is_dir() else 0
    manifest = dataclasses.replace(m, splits=splits, compression=describe_codec(codec),
                                   provenance=_provenance(store, codec))
    write_json(work / MANIFEST, manifest.to_json())
    return manifest, sizes, pngs


def convert_shard(path: Path, dest: Path, info: ShardInfo, codec: str) -> ShardInfo:
    """Rewrite the shard ``path`` (manifest entry ``info``) as ``dest`` with ``codec``, read it back and compare every
    dataset with the source; the new entry (only ``sha256`` differs). CorruptShardError names a bad source shard."""
    with reading(path):
        data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise CorruptShardError(f"{path}: checksum mismatch with the manifest (corrupt shard); nothing converted")
    with reading(path), h5py.File(io.BytesIO(data), "r") as f:
        kinds = {name: type(f[name]) for name in f}
        if any(kind is not h5py.Dataset for kind in kinds.values()):
            raise StoreError(f"{path}: holds other HDF5 objects than datasets ({sorted(kinds)})")
        datasets = {name: _filterable(path, name, f[name][()], f[name].dtype) for name in f}
    new = shard_bytes(dest, datasets, codec)
    write_bytes(dest, new)
    _compare(dest, path, datasets, codec)
    return dataclasses.replace(info, sha256=hashlib.sha256(new).hexdigest())


def _filterable(path: Path, name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``array`` as it can be written with a codec: variable-length strings (the first format's ``subject``), which
    HDF5 filters cannot take, become fixed-length UTF-8 as :func:`~toolkit.data.store.write_shard` stores them now
    (checked to hold the same strings); any other array as it is."""
    string = h5py.check_string_dtype(dtype)
    if string is None or string.length is not None:
        return array
    encoded = [v if isinstance(v, bytes) else str(v).encode() for v in array.ravel()]
    fixed = np.array(encoded, dtype=h5py.string_dtype("utf-8", max((len(e) for e in encoded), default=1) or 1))
    fixed = fixed.reshape(array.shape)
    if not np.array_equal(fixed.astype(object), np.array(encoded, dtype=object).reshape(array.shape)):
        raise StoreError(f"{path}: dataset '{name}' holds strings that fixed-length UTF-8 cannot keep")
    return fixed


def _compare(dest: Path, source: Path, datasets: dict[str, np.ndarray], codec: str) -> None:
    """The shard file ``dest`` holds exactly ``datasets`` (read from ``source``), each with ``codec``'s filters."""
    with reading(dest), h5py.File(dest, "r") as f:
        if set(f) != set(datasets):
            raise StoreError(f"{dest}: datasets {sorted(f)} after writing, {sorted(datasets)} in {source}")
        for name, want in datasets.items():
            got = f[name]
            same_type = (got.dtype == want.dtype and got.shape == want.shape
                         and h5py.check_string_dtype(got.dtype) == h5py.check_string_dtype(want.dtype))
            if not same_type:
                raise StoreError(f"{dest}: dataset '{name}' is {got.dtype} {got.shape} after writing, "
                                 f"{want.dtype} {want.shape} in {source}")
            if dataset_codec(got) != codec:
                raise StoreError(f"{dest}: dataset '{name}' was not written with {codec}")
            blocks = [slice(lo, lo + _BLOCK) for lo in range(0, len(want), _BLOCK)] if want.ndim else [()]
            if not all(np.array_equal(got[rows], want[rows]) for rows in blocks):
                raise StoreError(f"{dest}: dataset '{name}' differs from {source} after writing")


def _copy_tree(src: Path, dest: Path) -> int:
    """Copy the files under ``src`` to ``dest``, each fsynced (modes from the umask); how many were copied."""
    copied = 0
    for folder, dirs, files in os.walk(src):
        dirs.sort()
        target = dest / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in sorted(files):
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # a temporary file a killed writer left
            with (open(Path(folder) / name, "rb") as reader, naming_disk_errors(target / name),
                  open(target / name, "wb") as writer):
                shutil.copyfileobj(reader, writer)
                writer.flush()
                os.fsync(writer.fileno())
            copied += 1
        fsync_dir(target)
    return copied


def _provenance(store: Store, codec: str) -> dict[str, Any]:
    """The source's provenance with this conversion appended and the recorded options' ``compression`` updated."""
    doc = dict(store.manifest.provenance)
    options = doc.get("options")
    if isinstance(options, dict):
        options = {key: value for key, value in options.items() if key != "compression"}
        if codec != DEFAULT_CODEC:
            options["compression"] = codec
        doc["options"] = options
    doc["conversions"] = [*doc.get("conversions", ()), {
        "tool": f"tumorsynth {__version__} store convert", "from": str(store.root.resolve()),
        "source": provenance.fingerprint(store.root), "source_compression": store.manifest.codec,
        "compression": codec, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }]
    return doc
