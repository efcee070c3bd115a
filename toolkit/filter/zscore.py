"""`tumorsynth filter zscore`: drop synthetic masks whose pixel-wise z-score norm against the real masks is too large.

The statistics are the per-pixel mean μ and population standard deviation σ (label values as numbers, over the batch
axis) of the masks the PGAN was trained on: the non-empty masks of the real store's training split, or of its reduced
prefix (the first ``manifest.reduced`` rows). Every mask x of every split of the synthetic store is scored by
‖(x − μ)/σ‖₂ over all pixels and dropped when that norm exceeds the threshold (500 in the paper).

Zero-variance pixels (σ = 0, e.g. corners that are background in every real mask): a pixel equal to μ contributes 0;
any other value makes the norm infinite, so the mask is always dropped. The norm is never NaN and such a mask is never
silently kept.

Work is spread over MPI ranks (run plainly, or under ``mpirun``/``srun``): shard i goes to rank i % size. Moments are
accumulated per shard in fixed 256-row blocks and merged in shard order after one ``allgather``, so any rank count gives
bit-identical statistics (merging per-rank partials in rank order would differ in the last bits with the rank count),
hence identical norms, decisions and output shards. Rank 0 gathers the norms and writes the output.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from toolkit.atomic import atomic_path, write_bytes
from toolkit.data.store import Store, StoreWriter

log = logging.getLogger(__name__)

BLOCK = 256  # rows held in memory at a time: 256 × 256² float64 is 128 MiB
SHARD_SIZE = 1024  # rows per shard of the filtered store
MAX_REAL_DROP = 0.01  # calibration: the suggested threshold drops at most 1 % of real masks


@dataclass(frozen=True)
class Moments:
    """Count, per-pixel mean and sum of squared deviations (M2) of a batch of masks, in float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, batch: np.ndarray) -> Moments:
        """The moments of ``batch`` [n, ...] over its first axis (zeros when n = 0)."""
        x = np.asarray(batch, dtype=np.float64)
        if len(x) == 0:
            return cls(0, np.zeros(x.shape[1:]), np.zeros(x.shape[1:]))
        mean = x.mean(axis=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: Moments) -> Moments:
        """The moments of both batches together (Chan, Golub & LeVeque's pairwise update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation, sqrt(M2 / count)."""
        return np.sqrt(self.m2 / self.count)


def _world(comm: Any) -> Any:
    if comm is None:
        from mpi4py import MPI  # lazy: importing the module must not initialise MPI

        comm = MPI.COMM_WORLD
    return comm


def _blocks(path: Path, stop: int, fields: tuple[str, ...]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Rows [0, stop) of one shard as (first row, arrays) in blocks of BLOCK rows."""
    with h5py.File(path, "r") as f:
        for lo in range(0, stop, BLOCK):
            yield lo, {name: f[name][lo:min(lo + BLOCK, stop)] for name in fields}


def _spread(tasks: list[Any], work: Callable[[Any], Any], comm: Any, *, everywhere: bool) -> list[Any] | None:
    """Run ``work`` on task i on rank i % size; the results in task order, on every rank or on rank 0 only."""
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = [(i, work(task)) for i, task in enumerate(tasks) if i % size == rank]
    parts = comm.allgather(mine) if everywhere else comm.gather(mine, root=0)
    pairs = None if parts is None else sorted((pair for part in parts for pair in part), key=lambda p: p[0])
    return None if pairs is None else [result for _, result in pairs]  # None: a non-root rank of a gather


def real_moments(store: Path, *, reduced: bool, comm: Any = None) -> Moments:
    """Moments of the non-empty training masks of ``store`` (only its reduced prefix when ``reduced``), on all ranks."""
    comm = _world(comm)
    real = Store(store)
    limit = real.manifest.reduced if reduced else real.split("train").n
    tasks, offset = [], 0
    for info, path in real.shards("train"):
        if offset < limit:
            tasks.append((path, min(info.n, limit - offset)))
        offset += info.n

    empty = Moments.of(np.zeros((0, real.manifest.image_size, real.manifest.image_size)))

    def shard_moments(task: tuple[Path, int]) -> Moments:
        total = empty
        for _, block in _blocks(*task, ("label", "empty")):
            total = total.merge(Moments.of(block["label"][~block["empty"]]))
        return total

    merged = empty
    for part in _spread(tasks, shard_moments, comm, everywhere=True):  # shard order, whatever the rank count
        merged = merged.merge(part)
    if merged.count == 0:
        raise ValueError(f"{store}: no non-empty training masks to take statistics from")
    return merged


def norms(labels: np.ndarray, moments: Moments) -> np.ndarray:
    """‖(x − μ)/σ‖₂ per mask of ``labels`` [n,S,S] (float64 [n]); inf where a σ = 0 pixel differs from μ."""
    if labels.shape[1:] != moments.mean.shape:
        raise ValueError(f"masks are {labels.shape[1:]}, statistics are {moments.mean.shape}")
    x = labels.reshape(len(labels), -1)
    mean, std = moments.mean.ravel(), moments.std.ravel()
    live, dead = np.flatnonzero(std > 0), np.flatnonzero(std == 0)
    z = (x[:, live] - mean[live]) / std[live]
    out = np.sqrt(np.einsum("ij,ij->i", z, z))
    out[(x[:, dead] != mean[dead]).any(axis=1)] = np.inf
    return out


def _score(store: Store, splits: tuple[str, ...], moments: Moments, comm: Any, *,
           drop_empty: bool = False) -> list[dict[str, Any]] | None:
    """Per shard of ``splits`` (in order): norms, subjects and slices, gathered on rank 0 (None elsewhere)."""
    tasks = [(split, path, info.n) for split in splits for info, path in store.shards(split)]

    def work(task: tuple[str, Path, int]) -> dict[str, Any]:
        split, path, n = task
        parts: dict[str, list[Any]] = {"norm": [], "subject": [], "slice": []}
        for _, block in _blocks(path, n, ("label", "empty", "subject", "slice")):
            keep = ~block["empty"] if drop_empty else np.ones(len(block["empty"]), bool)
            parts["norm"].append(norms(block["label"][keep], moments))
            parts["subject"].extend(s.decode() for s in block["subject"][keep])
            parts["slice"].append(block["slice"][keep])
        return {"split": split, "norm": np.concatenate(parts["norm"]) if n else np.zeros(0),
                "subject": parts["subject"], "slice": np.concatenate(parts["slice"]) if n else np.zeros(0, int)}

    return _spread(tasks, work, comm, everywhere=False)


def filter_store(real: Path, synthetic: Path, out: Path, *, threshold: float = 500.0, reduced: bool = False,
                 comm: Any = None) -> dict[str, Any]:
    """Write the masks of ``synthetic`` whose norm is ≤ ``threshold`` to the store ``out`` plus ``out/zscore.csv``.

    Collective over ``comm`` (default ``MPI.COMM_WORLD``); rank 0 writes and returns the summary, other ranks ``{}``.
    """
    comm = _world(comm)
    moments = real_moments(real, reduced=reduced, comm=comm)
    source = Store(synthetic)
    m = source.manifest
    if (m.image_size,) * 2 != moments.mean.shape:
        raise ValueError(f"{synthetic} is {m.image_size}², {real} is {moments.mean.shape[0]}²")
    splits = tuple(m.splits)
    scored = _score(source, splits, moments, comm)
    if scored is None:
        return {}
    csv_rows, shard_counts, kept_total, writer = [], {}, 0, StoreWriter(out, classes=m.classes)
    fields = ("label", "subject", "slice", *(("image",) if m.has_image else ()))
    for split in splits:
        parts = [s for s in scored if s["split"] == split]
        keep = np.concatenate([p["norm"] for p in parts]) <= threshold if parts else np.zeros(0, bool)
        row = 0
        for part in parts:
            for norm, subject, slice_index in zip(part["norm"], part["subject"], part["slice"]):
                csv_rows.append((split, row, subject, int(slice_index), repr(float(norm)), int(keep[row])))
                row += 1
        shard_counts[split] = _write_kept(source, split, keep, writer, fields)
        kept_total += int(keep.sum())
    total = len(csv_rows)
    summary = {"kept": kept_total, "dropped": total - kept_total,
               "dropped_percent": 100.0 * (total - kept_total) / total if total else 0.0, "threshold": threshold}
    # The CSV goes before the manifest, which is written last: a complete store always has its CSV.
    _write_csv(Path(out) / "zscore.csv", ("split", "row", "subject", "slice", "norm", "kept"), csv_rows)
    writer.finish(kind="synthetic", image_size=m.image_size, has_image=m.has_image, shard_counts=shard_counts,
                  reduced_fraction=m.reduced_fraction, modality=m.modality,
                  provenance={"filter": "zscore", "real": str(Path(real).resolve()),
                              "synthetic": str(Path(synthetic).resolve()), "reduced": reduced,
                              "real_masks": moments.count, "source": m.provenance, **summary})
    log.info("zscore filter: kept %d, dropped %d (%.1f %%)", kept_total, total - kept_total, summary["dropped_percent"])
    return {**summary, "ranks": comm.Get_size(), "csv": str(Path(out) / "zscore.csv")}


def _write_kept(source: Store, split: str, keep: np.ndarray, writer: StoreWriter, fields: tuple[str, ...]) -> int:
    """Copy the kept rows of ``split`` into shards of SHARD_SIZE rows (skipping shards a resumed run finished)."""
    buffer: dict[str, list[np.ndarray]] = {name: [] for name in fields}
    held, index, offset = 0, 0, 0

    def flush(rows: int) -> None:
        nonlocal held, index
        joined = {name: np.concatenate(parts) for name, parts in buffer.items()}
        if writer.done(split, index) is None:
            writer.write(split, index, label=joined["label"][:rows], image=joined["image"][:rows]
                         if "image" in joined else None, subject=[s.decode() for s in joined["subject"][:rows]],
                         slice_index=joined["slice"][:rows])
        for name in buffer:
            buffer[name] = [joined[name][rows:]]
        held -= rows
        index += 1

    for info, path in source.shards(split):
        mask = keep[offset:offset + info.n]
        offset += info.n
        if not mask.any():
            continue  # nothing kept: do not even read (or decompress) the shard
        for lo, block in _blocks(path, info.n, fields):
            rows = mask[lo:lo + BLOCK]
            for name in fields:
                buffer[name].append(block[name][rows])
            held += int(rows.sum())
            while held >= SHARD_SIZE:
                flush(SHARD_SIZE)
    if held:
        flush(held)
    return index


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    write_bytes(path, buffer.getvalue().encode())


def calibrate(real: Path, synthetic: Path, out_dir: Path, *, thresholds: np.ndarray | None = None,
              reduced: bool = False, comm: Any = None) -> dict[str, Any]:
    """Drop fractions versus threshold, for the synthetic masks and for real masks the statistics did not see.

    The real curve scores the non-empty masks of the real store's *validation* split against the training
    statistics (training masks would be scored against themselves and look better than unseen real data). The
    suggested threshold is the smallest threshold of the grid at which at most 1 % of those real masks would be
    dropped (None if no threshold of the grid achieves it). Default grid: 401 evenly spaced values from 0 to the
    largest finite norm seen (at least 1000). Writes ``out_dir/calibration.csv`` and ``out_dir/calibration.png``;
    collective over ``comm``, rank 0 returns the summary, other ranks ``{}``.
    """
    comm = _world(comm)
    moments = real_moments(real, reduced=reduced, comm=comm)
    synth = _score(Store(synthetic), tuple(Store(synthetic).manifest.splits), moments, comm)
    held_out = _score(Store(real), ("val",), moments, comm, drop_empty=True)
    if synth is None or held_out is None:
        return {}
    synth_norms, real_norms = (np.concatenate([np.zeros(0), *(p["norm"] for p in s)]) for s in (synth, held_out))
    if not len(real_norms) or not len(synth_norms):
        raise ValueError(f"calibration needs non-empty validation masks in {real} and masks in {synthetic}")
    if thresholds is None:
        finite = np.concatenate([real_norms, synth_norms])
        finite = finite[np.isfinite(finite)]
        thresholds = np.linspace(0.0, max(1000.0, float(finite.max()) if len(finite) else 0.0), 401)
    thresholds = np.sort(np.asarray(thresholds, dtype=np.float64))
    # Fraction of norms strictly above each threshold, from sorted norms: non-increasing in the threshold.
    real_drop = 1.0 - np.searchsorted(np.sort(real_norms), thresholds, side="right") / len(real_norms)
    synth_drop = 1.0 - np.searchsorted(np.sort(synth_norms), thresholds, side="right") / len(synth_norms)
    ok = np.flatnonzero(real_drop <= MAX_REAL_DROP)
    suggested = float(thresholds[ok[0]]) if len(ok) else None
    out_dir = Path(out_dir)
    _write_csv(out_dir / "calibration.csv", ("threshold", "real_dropped", "synthetic_dropped"),
               [(repr(float(t)), repr(float(r)), repr(float(s))) for t, r, s in zip(thresholds, real_drop, synth_drop)])
    _plot(thresholds, real_drop, synth_drop, suggested, out_dir / "calibration.png")
    return {"suggested_threshold": suggested,
            "synthetic_dropped_at_suggested": float(synth_drop[ok[0]]) if len(ok) else None,
            "real_masks": len(real_norms), "synthetic_masks": len(synth_norms), "ranks": comm.Get_size(),
            "csv": str(out_dir / "calibration.csv"), "plot": str(out_dir / "calibration.png")}


def _plot(thresholds: np.ndarray, real_drop: np.ndarray, synth_drop: np.ndarray, suggested: float | None,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on cluster nodes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(thresholds, 100 * real_drop, label="real (validation)")
    ax.plot(thresholds, 100 * synth_drop, label="synthetic")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", linewidth=1, label=f"suggested {suggested:.0f}")
    ax.set(xlabel="threshold on ‖z‖₂", ylabel="masks dropped (%)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
