"""`tumorsynth bench zscore`: throughput of the z-score filter on one rank, over a generated mask-only store.

Masks are cheap, deterministic stand-ins for PGAN output: an elliptical "brain" whose tissue classes 1–3 come from
quantised, blocky (nearest-upsampled 8×8) noise, with a tumour of nested discs (classes 4–6) at a random place. The
real store is drawn from the same generator with another seed, so a realistic share of masks passes the threshold
and the filter's writing of kept rows is part of what is timed. Scaling over ranks: run the benchmark under
``mpirun -np R``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.data.store import StoreWriter
from toolkit.filter.zscore import filter_store

CHUNK = 1024  # masks generated (and written as one shard) at a time, to bound memory


def phantom_masks(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` random 7-class label maps [n, size, size] (uint8)."""
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = grid[None, :, None], grid[None, None, :]
    axes = rng.uniform(0.3, 0.42, (2, n, 1, 1)).astype(np.float32)
    brain = ((yy - 0.5) / axes[0]) ** 2 + ((xx - 0.5) / axes[1]) ** 2 < 1
    tissue = 1 + (rng.random((n, 8, 8)) * 3).astype(np.uint8)
    labels = np.where(brain, np.repeat(np.repeat(tissue, size // 8, axis=1), size // 8, axis=2), 0).astype(np.uint8)
    centre = rng.uniform(0.3, 0.7, (2, n, 1, 1)).astype(np.float32)
    radius = rng.uniform(0.04, 0.12, (n, 1, 1)).astype(np.float32)
    dist = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / radius
    for label, reach in ((4, 1.0), (5, 0.7), (6, 0.4)):  # oedema, enhancing, necrotic: outer to inner
        labels[dist < reach] = label
    return labels


def _mask_store(root: Path, n: int, size: int, seed: int, kind: str) -> Path:
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root, classes=7)
    shards = 0
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        writer.write("train", shards, label=phantom_masks(rng, rows, size), subject=[f"gen{seed}"] * rows,
                     slice_index=np.arange(start, start + rows) % 2**15)
        shards += 1
    writer.finish(kind=kind, image_size=size, has_image=False, shard_counts={"train": shards})
    return root


def bench_zscore(masks: int = 100_000, size: int = 256, seed: int = 0) -> dict[str, Any]:
    """Time :func:`filter_store` on ``masks`` generated masks at ``size``² against 2,048 real ones, on every rank of
    ``MPI.COMM_WORLD`` (run under ``mpirun -np R`` for R ranks); rank 0 returns the result, other ranks ``{}``.

    The stores are made by rank 0 beforehand, in a temporary folder beside the current one (all ranks must see it)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    tmp = tempfile.mkdtemp(prefix=".bench-zscore-", dir=".") if comm.Get_rank() == 0 else None
    root = Path(comm.bcast(tmp, root=0))
    try:
        if comm.Get_rank() == 0:
            _mask_store(root / "real", 2048, size, seed + 1, "real")
            _mask_store(root / "synthetic", masks, size, seed, "synthetic")
        comm.Barrier()
        begin = time.perf_counter()
        result = filter_store(root / "real", root / "synthetic", root / "kept", comm=comm)
        comm.Barrier()
        seconds = time.perf_counter() - begin
    finally:
        comm.Barrier()
        if comm.Get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
    if comm.Get_rank():
        return {}
    return {"bench": "zscore", "masks": masks, "size": size, "ranks": comm.Get_size(), "seconds": seconds,
            "masks_per_s": masks / seconds, "kept": result["kept"], "dropped_percent": result["dropped_percent"]}
