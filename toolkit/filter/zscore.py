"""`tumorsynth filter zscore`: drop synthetic masks whose pixel-wise z-score norm against the real masks is too large.

The statistics are the per-pixel mean μ and population standard deviation σ (label values as numbers, over the batch
axis) of the masks the PGAN was trained on: the non-empty masks of the real store's training split, or of its reduced
prefix (the first ``manifest.reduced`` rows), reduced to the synthetic masks' size when the PGAN was trained smaller
(:func:`toolkit.data.labels.reduce_labels`). Every mask x of every split of the synthetic store is scored by
‖(x − μ)/σ‖₂ over all pixels and dropped when that norm exceeds the threshold (500 in the paper).

Zero-variance pixels (σ = 0, e.g. corners that are background in every real mask): a pixel equal to μ contributes 0;
any other value makes the norm infinite, so the mask is always dropped. The norm is never NaN and such a mask is never
silently kept. ``min_std`` (``--min-std``, default 0: the strict rule) floors σ instead: a pixel where the real masks
never vary then costs (Δ/min_std)². With few real masks or an undertrained generator (stray pixels on the image
border, as the CPU demo's PGAN makes) the strict rule drops every mask; the floor keeps the filter's ranking.

Work is spread over MPI ranks (run plainly, or under ``mpirun``/``srun``): shard i goes to rank i % size. Moments are
accumulated per shard in fixed 256-row blocks and merged in shard order after one ``allgather``, so any rank count gives
bit-identical statistics (merging per-rank partials in rank order would differ in the last bits with the rank count),
hence identical norms and decisions. One pass: each rank scores its shards and writes each one's kept rows as the
output shard of the same number (bounded memory, parallel writes, bytes independent of the rank count); rank 0 gathers
the norms and shard infos and writes the CSV and ``dropped.png`` (examples of dropped masks with their norms, as the
paper's Fig. 4), then the manifest, last.

One writer, one set of options: rank 0 takes the output store's lock (:class:`StoreWriter`, held on behalf of every
rank from before the first shard until the manifest) and records the options that define the output — the real and
synthetic stores' fingerprints, ``threshold``, ``reduced``, ``min_std``; if it cannot (another writer, other options),
every rank raises at once. A killed filter leaves no manifest: run it again with the same options and it recomputes
every shard (the CSV needs every row's norm anyway), each a pure function of the inputs and options, so the store is
the same as an uninterrupted one; other options are refused naming them, and so is a complete store made with other
options (one made with the same options is kept and its summary returned). The calibration folder likewise holds a
lock while it is written and records its options in ``.calibration.json``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import provenance
from toolkit.atomic import remove_stale_temps, write_bytes
from toolkit.data.labels import reduce_labels
from toolkit.data.store import (
    Manifest,
    ShardInfo,
    Store,
    StoreWriter,
    complete,
    open_shard,
    reading,
    shard_name,
    write_shard,
)
from toolkit.lock import WriterLock
from toolkit.mpi import from_root, world
from toolkit.report.figures import row_grid, save_figure

log = logging.getLogger(__name__)

DROPPED = "dropped.png"  # examples of dropped masks, written beside zscore.csv
CALIBRATION = ".calibration.json"  # the options a calibration folder was written with
SUMMARY = ("kept", "dropped", "dropped_percent", "threshold")
BLOCK = 256  # rows held in memory at a time: 256 × 256² float64 is 128 MiB
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

    def floored(self, min_std: float) -> Moments:
        """The same moments with the standard deviation raised to at least ``min_std`` (0: unchanged)."""
        if min_std <= 0:
            return self
        return Moments(self.count, self.mean, np.maximum(self.std, min_std) ** 2 * self.count)


def _blocks(path: Path, sha256: str, stop: int,
            fields: tuple[str, ...]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Rows [0, stop) of one shard as (first row, arrays) in blocks of BLOCK rows; a corrupt shard is named."""
    with open_shard(path, sha256) as f:
        for lo in range(0, stop, BLOCK):
            with reading(path):
                block = {name: f[name][lo:min(lo + BLOCK, stop)] for name in fields}
            yield lo, block


def _spread(tasks: list[Any], work: Callable[[Any], Any], comm: Any, *, everywhere: bool) -> list[Any] | None:
    """Run ``work`` on task i on rank i % size; the results in task order, on every rank or on rank 0 only."""
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = [(i, work(task)) for i, task in enumerate(tasks) if i % size == rank]
    parts = comm.allgather(mine) if everywhere else comm.gather(mine, root=0)
    pairs = None if parts is None else sorted((pair for part in parts for pair in part), key=lambda p: p[0])
    return None if pairs is None else [result for _, result in pairs]  # None: a non-root rank of a gather


def real_moments(store: Path, *, reduced: bool, size: int | None = None, comm: Any = None) -> Moments:
    """Moments of the non-empty training masks of ``store`` (only its reduced prefix when ``reduced``), reduced to
    ``size``² when given, on all ranks."""
    comm = world(comm)
    real = Store(store)
    size = size or real.manifest.image_size
    limit = real.manifest.reduced if reduced else real.split("train").n
    tasks, offset = [], 0
    for info, path in real.shards("train"):
        if offset < limit:
            tasks.append((path, info.sha256, min(info.n, limit - offset)))
        offset += info.n

    empty = Moments.of(np.zeros((0, size, size)))

    def shard_moments(task: tuple[Path, str, int]) -> Moments:
        total = empty
        for _, block in _blocks(*task, ("label", "empty")):
            total = total.merge(Moments.of(reduce_labels(block["label"][~block["empty"]], size)))
        return total

    merged = empty
    for part in _spread(tasks, shard_moments, comm, everywhere=True):  # shard order, whatever the rank count
        merged = merged.merge(part)
    if merged.count == 0:
        raise ValueError(f"{store}: no non-empty training masks to take statistics from")
    return merged


def norms(labels: np.ndarray, moments: Moments) -> np.ndarray:
    """‖(x − μ)/σ‖₂ per mask of ``labels`` [n,S,S] (float64 [n]); inf where a σ = 0 pixel differs from μ.

    Computed as two matrix products instead of a z-image per mask: with a = 1/σ² and b = μ/σ² on live pixels,
    ‖z‖² = x²·a − 2 x·b + Σ μ²/σ²; the same expansion with a = 1 on dead pixels is Σ (x − μ)², which is exactly zero
    (small integers in float64) unless a dead pixel differs from μ. Measured 1.7× faster than the direct form at 256².
    """
    if labels.shape[1:] != moments.mean.shape:
        raise ValueError(f"masks are {labels.shape[1:]}, statistics are {moments.mean.shape}")
    x = labels.reshape(len(labels), -1).astype(np.float64)
    weights, offsets = _norm_weights(moments)
    sums = np.square(x) @ weights[0] - 2 * (x @ weights[1]) + offsets
    out = np.sqrt(np.maximum(sums[:, 0], 0))
    out[sums[:, 1] > 0] = np.inf
    return out


def _norm_weights(moments: Moments) -> tuple[np.ndarray, np.ndarray]:
    """The [2, P, 2] weights and [2] offsets of :func:`norms`: column 0 live pixels (1/σ², μ/σ²), column 1 dead ones
    (1, μ)."""
    mean, std = moments.mean.ravel(), moments.std.ravel()
    live = std > 0
    inv_var = np.where(live, 1 / np.where(live, std, 1) ** 2, 0.0)
    dead = (~live).astype(np.float64)
    weights = np.stack([np.stack([inv_var, dead], 1), np.stack([mean * inv_var, mean * dead], 1)])
    offsets = np.array([(mean**2 * inv_var).sum(), (mean**2 * dead).sum()])
    return weights, offsets


@dataclass(frozen=True)
class _Keep:
    """Where and how :func:`_score` writes kept rows: the output store, the threshold and the fields to copy."""

    out: Path
    threshold: float
    fields: tuple[str, ...]
    classes: int


def _score(store: Store, splits: tuple[str, ...], moments: Moments, comm: Any, *, drop_empty: bool = False,
           keep: _Keep | None = None) -> list[dict[str, Any]] | None:
    """Per shard of ``splits`` (in order): norms, subjects and slices, gathered on rank 0 (None elsewhere).

    With ``keep``, each shard's rows with norm ≤ threshold are also written (by the rank that scored it) as the shard
    of the same split and number of ``keep.out``; its :class:`ShardInfo` (None when nothing was kept) comes back too.
    """
    tasks = [(split, k, path, info.sha256, info.n)
             for split in splits for k, (info, path) in enumerate(store.shards(split))]
    size = moments.mean.shape[-1]
    fields = ("label", "empty", "subject", "slice", *(keep.fields if keep else ()))

    def work(task: tuple[str, int, Path, str, int]) -> dict[str, Any]:
        split, k, path, sha256, n = task
        parts: dict[str, list[Any]] = {"norm": [], "subject": [], "slice": []}
        kept: dict[str, list[np.ndarray]] = {name: [] for name in (keep.fields if keep else ())}
        for _, block in _blocks(path, sha256, n, tuple(dict.fromkeys(fields))):
            rows = ~block["empty"] if drop_empty else np.ones(len(block["empty"]), bool)
            scores = norms(reduce_labels(block["label"][rows], size), moments)
            parts["norm"].append(scores)
            parts["subject"].extend(s.decode() for s in block["subject"][rows])
            parts["slice"].append(block["slice"][rows])
            if keep:
                chosen = np.flatnonzero(rows)[scores <= keep.threshold]
                for name in kept:
                    kept[name].append(block[name][chosen])
        result = {"split": split, "norm": np.concatenate(parts["norm"]) if n else np.zeros(0),
                  "subject": parts["subject"], "slice": np.concatenate(parts["slice"]) if n else np.zeros(0, int)}
        if keep:
            result["info"] = _write_kept(keep, split, k, {name: np.concatenate(v) for name, v in kept.items() if v})
        return result

    return _spread(tasks, work, comm, everywhere=False)


def _write_kept(keep: _Keep, split: str, index: int, rows: dict[str, np.ndarray]) -> ShardInfo | None:
    if not rows or not len(rows["label"]):
        return None  # nothing kept: no shard
    return write_shard(keep.out / shard_name(split, index), label=rows["label"], image=rows.get("image"),
                       subject=[s.decode() for s in rows["subject"]], slice_index=rows["slice"], classes=keep.classes)


def filter_store(real: Path, synthetic: Path, out: Path, *, threshold: float = 500.0, reduced: bool = False,
                 min_std: float = 0.0, comm: Any = None) -> dict[str, Any]:
    """Write the masks of ``synthetic`` whose norm is ≤ ``threshold`` to the store ``out`` plus ``out/zscore.csv``.

    A complete ``out`` made with the same options is kept (its summary comes back with ``already_complete``); one made
    with other options raises OptionsChanged. Collective over ``comm`` (default ``MPI.COMM_WORLD``); rank 0 writes and
    returns the summary, other ranks ``{}``.
    """
    if not threshold >= 0:  # NaN too: every comparison with it fails, so it would silently drop every mask
        raise ValueError(f"--threshold must be ≥ 0 (or inf to keep all), got {threshold}")
    comm = world(comm)
    out = Path(out)
    source = Store(synthetic)
    m = source.manifest
    real_size = Store(real).manifest.image_size
    if m.image_size > real_size:
        raise ValueError(f"{synthetic} is {m.image_size}², larger than the real masks of {real} ({real_size}²)")
    options = {**_inputs(real, synthetic), "threshold": threshold, "reduced": reduced, "min_std": min_std}

    def claim() -> Manifest | StoreWriter:
        manifest = complete(out, options)
        return manifest if manifest is not None else StoreWriter(out, classes=m.classes, options=options)

    got = from_root(comm, claim)
    if comm.bcast(isinstance(got, Manifest), root=0):
        log.info("%s: store is already complete", out)
        return {} if got is None else {**{k: got.provenance[k] for k in SUMMARY}, "already_complete": True,
                                       **_outputs(out, comm)}
    with got or contextlib.nullcontext():  # rank 0 gives the lock up on an error too
        return _filter(real, source, out, got, threshold=threshold, reduced=reduced, min_std=min_std, comm=comm)


def _inputs(real: Path, synthetic: Path) -> dict[str, str]:
    """The fingerprints of the two input stores (each opened first, so that a missing one is a StoreError)."""
    return {name: provenance.fingerprint(Store(path).root) for name, path in (("real", real), ("synthetic", synthetic))}


def _outputs(out: Path, comm: Any) -> dict[str, Any]:
    return {"ranks": comm.Get_size(), "csv": str(out / "zscore.csv"),
            "figure": str(out / DROPPED) if (out / DROPPED).exists() else None}


def _filter(real: Path, source: Store, out: Path, writer: StoreWriter | None, *, threshold: float, reduced: bool,
            min_std: float, comm: Any) -> dict[str, Any]:
    """The filter proper, once rank 0 holds ``writer`` (None on the other ranks)."""
    m = source.manifest
    moments = real_moments(real, reduced=reduced, size=m.image_size, comm=comm).floored(min_std)
    splits = tuple(m.splits)
    fields = ("label", "subject", "slice", *(("image",) if m.has_image else ()))
    scored = _score(source, splits, moments, comm, keep=_Keep(out, threshold, fields, m.classes))
    if scored is None or writer is None:
        return {}
    csv_rows, shard_counts = [], {}
    for split in splits:
        parts = [s for s in scored if s["split"] == split]
        split_norms = np.concatenate([np.zeros(0), *(p["norm"] for p in parts)])
        subjects = [name for p in parts for name in p["subject"]]
        slices = np.concatenate([np.zeros(0, int), *(p["slice"] for p in parts)])
        csv_rows += [(split, row, subject, int(z), repr(float(v)), int(v <= threshold))
                     for row, (subject, z, v) in enumerate(zip(subjects, slices, split_norms))]
        infos = [p["info"] for p in parts if p["info"] is not None]
        for index, info in enumerate(infos):
            writer.record(split, index, info)
        shard_counts[split] = len(infos)
    total = len(csv_rows)
    kept_total = sum(row[-1] for row in csv_rows)
    summary = {"kept": kept_total, "dropped": total - kept_total,
               "dropped_percent": 100.0 * (total - kept_total) / total if total else 0.0, "threshold": threshold}
    # The CSV and the figure go before the manifest, which is written last: a complete store always has both.
    _write_csv(out / "zscore.csv", ("split", "row", "subject", "slice", "norm", "kept"), csv_rows)
    _dropped_grid(source, [(r[0], r[1], float(r[4])) for r in csv_rows if not r[5]], out / DROPPED)
    writer.finish(kind="synthetic", image_size=m.image_size, has_image=m.has_image, shard_counts=shard_counts,
                  reduced_fraction=m.reduced_fraction, modality=m.modality,
                  provenance={"filter": "zscore", "real": str(Path(real).resolve()),
                              "synthetic": str(source.root.resolve()), "reduced": reduced, "min_std": min_std,
                              "real_masks": moments.count, "source": m.provenance, **summary})
    log.info("zscore filter: kept %d, dropped %d (%.1f %%)", kept_total, total - kept_total, summary["dropped_percent"])
    return {**summary, **_outputs(out, comm)}


def _dropped_grid(source: Store, dropped: list[tuple[str, int, float]], path: Path, columns: int = 8) -> None:
    """Up to ``columns`` dropped masks, evenly spread from the largest norm down, with their norms (paper Fig. 4)."""
    if not dropped:
        return
    ranked = sorted(dropped, key=lambda d: -d[2])
    picks = [ranked[i] for i in sorted({round(k) for k in np.linspace(0, len(ranked) - 1, min(columns, len(ranked)))})]
    labels = np.stack([source.read(split, row, row + 1)["label"][0] for split, row, _ in picks])
    row_grid([("dropped", labels, True)], path, f"{len(dropped)} dropped masks (examples)",
             [f"‖z‖ = {norm:.0f}" if np.isfinite(norm) else "‖z‖ = ∞ (σ = 0)" for _, _, norm in picks])


def _write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    write_bytes(path, buffer.getvalue().encode())


def calibrate(real: Path, synthetic: Path, out_dir: Path, *, thresholds: np.ndarray | None = None,
              reduced: bool = False, min_std: float = 0.0, comm: Any = None) -> dict[str, Any]:
    """Drop fractions versus threshold, for the synthetic masks and for real masks the statistics did not see.

    The real curve scores the non-empty masks of the real store's *validation* split against the training
    statistics (training masks would be scored against themselves and look better than unseen real data). The
    suggested threshold is the smallest threshold of the grid at which at most 1 % of those real masks would be
    dropped (None if no threshold of the grid achieves it). Default grid: 401 evenly spaced values from 0 to the
    largest finite norm seen (at least 1000). Writes ``out_dir/calibration.csv`` and ``out_dir/calibration.png``
    under ``out_dir``'s lock, refusing a folder calibrated with other options; collective over ``comm``, rank 0 returns
    the summary, other ranks ``{}``.
    """
    comm = world(comm)
    out_dir = Path(out_dir)
    options = {**_inputs(real, synthetic), "reduced": reduced, "min_std": min_std,
               "thresholds": None if thresholds is None else [float(t) for t in np.asarray(thresholds).ravel()]}
    lock = from_root(comm, lambda: _claim_calibration(out_dir, options))
    try:
        return _calibrate(real, synthetic, out_dir, thresholds=thresholds, reduced=reduced, min_std=min_std, comm=comm)
    finally:
        if lock is not None:
            lock.release()


def _claim_calibration(out_dir: Path, options: dict[str, Any]) -> WriterLock:
    """Rank 0's lock on the calibration folder, its own stale temporary files removed and its options checked."""
    lock = WriterLock(out_dir, "calibration").acquire()
    try:
        remove_stale_temps(out_dir, ("calibration.csv", "calibration.png", CALIBRATION))
        provenance.claim(out_dir / CALIBRATION, options)
    except BaseException:
        lock.release()
        raise
    return lock


def _calibrate(real: Path, synthetic: Path, out_dir: Path, *, thresholds: np.ndarray | None, reduced: bool,
               min_std: float, comm: Any) -> dict[str, Any]:
    moments = real_moments(real, reduced=reduced, size=Store(synthetic).manifest.image_size, comm=comm).floored(min_std)
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
    _write_csv(out_dir / "calibration.csv", ("threshold", "real_dropped", "synthetic_dropped"),
               [(repr(float(t)), repr(float(r)), repr(float(s))) for t, r, s in zip(thresholds, real_drop, synth_drop)])
    _plot(thresholds, real_drop, synth_drop, suggested, out_dir / "calibration.png")
    return {"suggested_threshold": suggested,
            "synthetic_dropped_at_suggested": float(synth_drop[ok[0]]) if len(ok) else None,
            "real_masks": len(real_norms), "synthetic_masks": len(synth_norms), "ranks": comm.Get_size(),
            "csv": str(out_dir / "calibration.csv"), "plot": str(out_dir / "calibration.png")}


def _plot(thresholds: np.ndarray, real_drop: np.ndarray, synth_drop: np.ndarray, suggested: float | None,
          path: Path) -> None:
    import matplotlib.pyplot as plt  # toolkit.report.figures selected the file-only Agg backend

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(thresholds, 100 * real_drop, label="real (validation)")
    ax.plot(thresholds, 100 * synth_drop, label="synthetic")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", linewidth=1, label=f"suggested {suggested:.0f}")
    ax.set(xlabel="threshold on ‖z‖₂", ylabel="masks dropped (%)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
