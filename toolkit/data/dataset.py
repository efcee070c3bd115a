"""Torch datasets over stores: which rows of which stores a run trains or evaluates on, read fast.

A :class:`Source` names a store split and a row selection (a prefix of the shuffled rows, optionally without the
all-background rows); a :class:`SliceDataset` concatenates sources, e.g. 5,208 real + 4,792 synthetic slices, and
serves ``{"image": uint16 [C,S,S], "label": uint8 [S,S], "source": int, "index": int}`` (C: the stores' modalities,
which every source must share) with labels in the requested
class view: the stored types, so a batch crosses to the GPU in a quarter of the bytes of float32 + int64 and is
converted there. Images keep their raw intensities: normalisation belongs to the trainer (:meth:`intensity_stats`).

Reading: each process (the main one or a DataLoader worker) opens every shard it needs once, lazily; handles are keyed
by pid and never pickled, so a dataset built in the parent is safe to send to forked or spawned workers. A batch is
read with one h5py call per row, in (shard, row) order: with (1,S,S) chunks every row is its own chunk, and a
fancy-index or union-hyperslab read of several rows takes HDF5's irregular-selection path, measured far slower than
per-row reads. The per-row cost is then the chunk decompression itself (see toolkit.data.store). A corrupt shard
(fletcher32 mismatch, or, in a store without fletcher32, a checksum mismatch on first open) stops the reader with
:class:`~toolkit.data.store.CorruptShardError` naming the shard file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from toolkit.data.labels import view_table
from toolkit.data.store import SPLITS, Store, as_channels, open_shard, reading

log = logging.getLogger(__name__)

# Random access to (1,S,S) chunks never hits HDF5's chunk cache, so it would only cost memory per open dataset.
_H5_OPTIONS = {"rdcc_nbytes": 0}
_STATS_BLOCK = 64  # rows per read when streaming a shard for statistics


class DatasetError(ValueError):
    """A source cannot be served as asked (mask-only store with images requested, too many rows, size mismatch)."""


@dataclass(frozen=True)
class Source:
    """One store split and which of its rows to serve.

    ``n`` selects a prefix of the split's shuffled rows: None for all, an int, or ``"reduced"`` for the manifest's
    reduced training prefix. ``drop_empty`` then removes the all-background rows *within* that prefix, so the
    prefix (and with it the set of subjects a reduced run may see) does not depend on the flag.
    """

    store: Path
    split: str = "train"
    n: int | Literal["reduced"] | None = None
    drop_empty: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "store", Path(self.store))
        if self.split not in SPLITS:
            raise DatasetError(f"{self.store}: split must be one of {SPLITS}, got {self.split!r}")
        count = isinstance(self.n, (int, np.integer)) and not isinstance(self.n, bool)
        if not (self.n is None or self.n == "reduced" or (count and self.n >= 0)):
            raise DatasetError(f"{self.store}: n must be None, 'reduced' or a count >= 0, got {self.n!r}")


class IntensityStats(NamedTuple):
    """Image statistics over the served rows: the maximum and the mean of ``image / max`` over every channel, and
    each channel's maximum."""

    max: float
    mean: float
    channel_max: tuple[float, ...]


class _Batch(list):
    """The samples of one :meth:`SliceDataset.__getitems__` call, carrying the batch tensors they are views of."""

    def __init__(self, samples: list[dict[str, Any]], batch: dict[str, torch.Tensor]) -> None:
        super().__init__(samples)
        self.batch = batch


class SliceDataset(Dataset):
    """The rows of one or more :class:`Source` s, concatenated in order, with labels in a ``classes``-class view."""

    def __init__(self, sources: Sequence[Source], classes: int = 7, with_image: bool = True) -> None:
        if not sources:
            raise DatasetError("a SliceDataset needs at least one source")
        self.sources = tuple(sources)
        self.classes = classes
        self.with_image = with_image
        self.kinds: list[str] = []
        self.image_size = 0
        self.channels = 0  # image channels per row, the same in every source (checked when images are served)
        self.modalities: tuple[str, ...] = ()  # theirs in order, where a source records them
        self._tables: list[np.ndarray | None] = []  # stored class -> view class per source; None is the identity
        self._paths: list[Path] = []  # every shard of every source; ``_shard`` indexes this list
        self._sha256: list[str] = []  # their manifest checksums, for shards without fletcher32
        self._has_image: list[bool] = []
        src, shard, local = [], [], []
        for i, source in enumerate(self.sources):
            s_shard, s_local = self._add_source(source)
            src.append(np.full(len(s_local), i, dtype=np.int32))
            shard.append(s_shard)
            local.append(s_local)
        self._src = np.concatenate(src)
        self._shard = np.concatenate(shard)
        self._local = np.concatenate(local)
        self._pid = os.getpid()
        self._open: dict[int, tuple[h5py.File, h5py.Dataset, h5py.Dataset | None]] = {}
        log.info("dataset: %s (%d classes)", self.describe(), classes)

    def _add_source(self, source: Source) -> tuple[np.ndarray, np.ndarray]:
        """Check ``source`` against the others and return its rows as (global shard id, row within shard)."""
        store = Store(source.store)
        m = store.manifest
        if self.with_image and not m.has_image:
            raise DatasetError(f"{store.root}: mask-only store (no images) but the dataset was asked for images")
        if self.image_size and m.image_size != self.image_size:
            raise DatasetError(f"{store.root}: image size {m.image_size} differs from the first source's "
                               f"{self.image_size}")
        self.image_size = m.image_size
        if self.with_image:
            first = self.modalities
            if self.channels and (m.channels != self.channels or (first and m.modalities and m.modalities != first)):
                raise DatasetError(f"{store.root}: images of modality {m.modality!r} ({m.channels} channels), but the "
                                   f"first source's are {','.join(first) or 'unrecorded'} ({self.channels}); every "
                                   "source must hold the same modalities in the same order")
            self.channels, self.modalities = m.channels, first or m.modalities
        table = view_table(m.classes, self.classes)
        self._tables.append(None if np.array_equal(table, np.arange(m.classes)) else table)
        self.kinds.append(m.kind)
        self._has_image.append(m.has_image)
        split = store.split(source.split)
        if source.n == "reduced":
            if source.split != "train":
                raise DatasetError(f"{store.root}: n='reduced' is a prefix of the train split, not {source.split}")
            count = m.reduced
        else:
            count = split.n if source.n is None else source.n
        if count > split.n:
            raise DatasetError(f"{store.root}: asked for {count} rows of split '{source.split}', which has {split.n}")
        ends = np.cumsum([sh.n for sh in split.shards], dtype=np.int64)  # int even for a split without shards
        starts = ends - np.array([sh.n for sh in split.shards], dtype=np.int64)
        rows = np.arange(count, dtype=np.int64)
        first = len(self._paths)
        for info, path in store.shards(source.split):
            self._paths.append(path)
            self._sha256.append(info.sha256)
        if source.drop_empty:
            used = np.searchsorted(starts, count, side="left")  # shards overlapping the prefix
            empty = [self._read_small(first + k, "empty") for k in range(used)]
            rows = rows[~np.concatenate([*empty, np.zeros(0, bool)])[:count]]
        shard = np.searchsorted(ends, rows, side="right")
        return (first + shard).astype(np.int32), rows - starts[shard]

    def _read_small(self, shard: int, name: str) -> np.ndarray:
        """A whole per-row dataset (``empty``, ``class_pixels``) of one shard."""
        with self._open_shard(shard) as f, reading(self._paths[shard]):
            return f[name][:]

    def _open_shard(self, shard: int, **options: Any) -> h5py.File:
        return open_shard(self._paths[shard], self._sha256[shard], **options)

    def __len__(self) -> int:
        return len(self._local)

    def describe(self) -> str:
        """Row counts by store kind in source order, e.g. ``"5,208 real + 4,792 synthetic"``."""
        counts: dict[str, int] = {}
        for kind, rows in zip(self.kinds, np.bincount(self._src, minlength=len(self.sources))):
            counts[kind] = counts.get(kind, 0) + int(rows)
        return " + ".join(f"{n:,} {kind}" for kind, n in counts.items())

    def __getstate__(self) -> dict[str, Any]:
        # h5py handles cannot cross processes; each process reopens what it reads.
        return {**self.__dict__, "_open": {}, "_pid": None}

    def _datasets(self, shard: int) -> tuple[h5py.File, h5py.Dataset, h5py.Dataset | None]:
        """This process's open (file, label, image) for ``shard``, opened on first use."""
        if self._pid != os.getpid():
            # Handles inherited through fork belong to the parent's HDF5 state: forget them, never use them.
            self._open, self._pid = {}, os.getpid()
        entry = self._open.get(shard)
        if entry is None:
            f = self._open_shard(shard, **_H5_OPTIONS)
            entry = self._open[shard] = (f, f["label"], f["image"] if self.with_image else None)
        return entry

    def close(self) -> None:
        """Close the shard files this process opened."""
        if self._pid == os.getpid():
            for f, _, _ in self._open.values():
                f.close()
        self._open = {}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Samples for ``indices`` in the order given; torch's DataLoader calls this once per batch.

        The fetcher hands the result straight to ``collate_fn``, and the default collate wants a list of samples, so
        that is what comes back: views into one batch tensor per field, so reads, view mapping and dtype conversions
        happen once per batch. The default collate then costs one copy (a stack); :meth:`collate` costs none.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        idx = np.where(idx < 0, idx + len(self), idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for a dataset of {len(self)} rows")
        shard, local, src = self._shard[idx], self._local[idx], self._src[idx]
        size = self.image_size
        label = np.empty((len(idx), size, size), dtype=np.uint8)
        image = np.empty((len(idx), self.channels, size, size), dtype=np.uint16) if self.with_image else None
        for j in np.lexsort((local, shard)):  # shard by shard, rows ascending: sequential within each file
            _, label_ds, image_ds = self._datasets(int(shard[j]))
            with reading(self._paths[shard[j]]):
                label[j] = label_ds[local[j]]
                if image is not None:
                    image[j] = image_ds[local[j]]  # a [S,S] row fills the one channel, a [C,S,S] row all C
        for s in np.unique(src):
            table = self._tables[s]
            if table is not None:
                rows = np.flatnonzero(src == s)
                label[rows] = table[label[rows]]
        batch = {"label": torch.from_numpy(label), "source": torch.from_numpy(src.astype(np.int64)),
                 "index": torch.from_numpy(idx)}
        if image is not None:
            batch["image"] = torch.from_numpy(image)
        samples = [{key: value[j] if key in ("label", "image") else int(value[j]) for key, value in batch.items()}
                   for j in range(len(idx))]
        return _Batch(samples, batch)

    @staticmethod
    def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A DataLoader ``collate_fn`` that returns a :meth:`__getitems__` batch as is, without the default's copy.

        Anything else (samples gathered item by item) goes to torch's ``default_collate``; the result is the same.
        """
        return samples.batch if isinstance(samples, _Batch) else default_collate(samples)

    def _served_by_shard(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(source, shard id, ascending rows within the shard) for every shard with served rows."""
        # Rows were laid out source by source and shard by shard, so each shard's rows are one contiguous run.
        cuts = np.flatnonzero(np.diff(self._shard)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(self._shard)]):
            if hi > lo:
                yield int(self._src[lo]), int(self._shard[lo]), self._local[lo:hi]

    def class_pixels(self) -> np.ndarray:
        """Pixels per class (in the dataset's view) over exactly the served rows, from the per-row counts."""
        totals = np.zeros(self.classes, dtype=np.int64)
        for src, shard, rows in self._served_by_shard():
            stored = self._read_small(shard, "class_pixels")[rows].sum(axis=0, dtype=np.int64)
            table = self._tables[src]
            np.add.at(totals, np.arange(len(stored)) if table is None else table, stored)
        return totals

    def intensity_stats(self) -> IntensityStats:
        """Maximum image intensity over the served rows and the mean of ``image / max``, streamed shard by shard."""
        for source, has_image in zip(self.sources, self._has_image):
            if not has_image:
                raise DatasetError(f"{source.store}: mask-only store has no image intensities")
        total, count = 0, 0
        channel_peak = np.zeros(self.channels or 1, dtype=np.int64)
        for _, shard, rows in self._served_by_shard():
            with self._open_shard(shard) as f, reading(self._paths[shard]):
                for lo in range(int(rows[0]), int(rows[-1]) + 1, _STATS_BLOCK):
                    wanted = rows[(rows >= lo) & (rows < lo + _STATS_BLOCK)]
                    if wanted.size:
                        block = f["image"][lo:int(wanted[-1]) + 1][wanted - lo]
                        channel_peak = np.maximum(channel_peak, as_channels(block).max(axis=(0, 2, 3)))
                        total += int(block.sum(dtype=np.uint64))
                        count += block.size
        peak = int(channel_peak.max())
        return IntensityStats(max=float(peak), mean=total / (count * peak) if peak else 0.0,
                              channel_max=tuple(float(v) for v in channel_peak))
