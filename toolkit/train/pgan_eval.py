"""`tumorsynth evaluate swd PGAN_RUN`: SWD of every tick snapshot against the real masks, spread over MPI ranks.

Run it plainly (one rank) or under ``mpirun -n K`` / ``srun --mpi=pmix``, each rank on its own GPU
(:func:`~toolkit.train.distributed.mpi_device`): rank 0 computes (or loads) the real set's
descriptors once and caches them in the run, ranks take the unscored snapshots round-robin, rank 0 gathers the rows and
writes ``swd.csv`` (atomically), ``swd.png`` (SWD versus tick) and the pointer ``snapshots/best`` (lowest average SWD).
A re-run scores only snapshots missing from ``swd.csv``.

Rows are compared only with rows made the same way: ``RUN/swd/options.json`` records, before the first row, what
defines them — ``--images``, ``--seed``, the real store's fingerprint (``--real``, or the store the PGAN trained on)
and the metric's parameters. A re-run with other ones is refused naming them, and ``swd.csv``, ``swd.png`` and
``snapshots/best`` stay untouched (to score another way, move ``swd.csv`` and ``swd/`` away first); so is a
``swd.csv`` without that record (rows of unknown options).

One evaluator per run: rank 0 holds the lock of ``RUN/swd/`` (not of ``RUN``, which is the trainer's) for the whole
evaluation, and removes the temporary files a killed evaluation left (its own only: ``RUN`` is shared with the
trainer). A PGAN run that is still training (``RUN``'s lock held) is refused at once: its snapshot set is still
growing, so ``best`` would be a best-so-far that a later evaluation moves under a running ``generate masks``, and a
trainer restarting meanwhile removes every temporary file in ``RUN``, the evaluation's in-flight ones included.
When rank 0 cannot start (held, changed options), every rank raises at once (:func:`toolkit.mpi.from_root`).

Protocol (official): as many generated as real images, both as label maps 0…6 at the generator's resolution; reals
reduced to it as in training (box average in [−1, 1], then rounded to the nearest class). The real set is the run's own
training set, as the official code scores a run against the dataset it trained on: the non-empty masks of the store's
training split, or of its reduced prefix (the first 20 %) for a run that trained on that (``reduced`` in its snapshots;
a snapshot without it trained on the full split). The reduced set is repeated in order up to ``--images`` (16,384 by
default), as the official dataset reader repeats its records; the full set keeps its earlier rule (the first
``--images`` masks, fewer when the store has fewer), so that tables scored before stay comparable. ``swd.csv`` says
which set in its ``real_set`` column (``full`` or ``reduced``), and a reduced set is part of the recorded options
(``"real_set": "reduced"``; a record without the key means full).

A slice-conditioned run (``model.label_size`` > 0) generates its fakes with labels (axial bins) drawn in proportion
to the snapshot's ``bin_counts`` from the seed's generator, after the latents. With ``per_bin``, the best snapshot of
such a run is also scored bin by bin: ``swd-bins.csv`` holds per bin its slice range, the real masks of the real set
that fall into it (without the reduced set's repeats) and the SWD between them and as many masks generated for that
bin (latents seeded by (seed, bin)); a bin without real masks gets no SWD. It is rewritten on every per-bin run.
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import provenance
from toolkit.atomic import remove_stale_temps, write_bytes
from toolkit.data.bins import SliceBins
from toolkit.data.dataset import SliceDataset, Source
from toolkit.data.store import Store
from toolkit.lock import LockedError, WriterLock, describe, holder
from toolkit.metrics.swd import (
    SWDConfig,
    cache_meta,
    descriptors,
    load_descriptors,
    save_descriptors,
    swd_from_descriptors,
)
from toolkit.mpi import from_root, world
from toolkit.report.figures import curve
from toolkit.train.distributed import mpi_device
from toolkit.train.generate import draw_bins, generate_labels, load_generator, snapshot_bins
from toolkit.train.pgan import mask_slices, reals_at, to_labels
from toolkit.train.sampling import epoch_seed

log = logging.getLogger(__name__)

EVAL = "swd"  # RUN/swd/: the evaluation's lock and options record
OPTIONS = "options.json"
TABLE, FIGURE, CACHE, BEST = "swd.csv", "swd.png", "swd-real.pt", "best"  # RUN/swd.*, RUN/snapshots/best
BIN_TABLE = "swd-bins.csv"  # RUN/swd-bins.csv: the best snapshot per slice bin (conditioned runs, per_bin)


REAL_SETS = ("full", "reduced")  # the real sets a run is scored against: its training split or the reduced prefix


def real_masks(store: Path, n: int, resolution: int, *, reduced: bool = False) -> np.ndarray:
    """The real set of ``store`` at ``resolution`` (uint8 labels): the first ``n`` non-empty training masks (fewer if
    the split has fewer), or with ``reduced`` the non-empty masks of the reduced training prefix, repeated in order to
    exactly ``n`` (the official reader's repeat)."""
    source = Source(store, "train", n="reduced" if reduced else None, drop_empty=True)
    data = SliceDataset([source], classes=7, with_image=False)
    count = min(n, len(data))
    if count == 0:
        raise ValueError(f"{store}: no non-empty masks in the {'reduced prefix of the ' * reduced}training split")
    labels = torch.cat([data.collate(data.__getitems__(list(range(i, min(i + 512, count)))))["label"]
                        for i in range(0, count, 512)])
    masks = to_labels(reals_at(labels, resolution)[:, 0]).numpy()
    if reduced and count < n:
        log.info("%s: %d non-empty masks in the reduced prefix, repeated to %d", store, count, n)
        masks = masks[np.arange(n) % count]
    return masks


def _read_scores(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        return {row["snapshot"]: row for row in csv.DictReader(handle)}


def _score(snapshot: Path, real_desc: list[torch.Tensor], n: int, seed: int, device: torch.device) -> dict[str, Any]:
    generator, meta = load_generator(snapshot, device)
    stream = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, generator.config.latent, generator=stream)
    conditioning = snapshot_bins(meta, snapshot)
    labels = None if conditioning is None else draw_bins(conditioning[1], n, stream)  # the training bin frequencies
    fake = generate_labels(generator, float(meta["lod"]), latents, batch=64, labels=labels)
    result = swd_from_descriptors(real_desc, descriptors(fake, SWDConfig(), seed, device), seed=seed)
    log.info("%s: SWD avg %.2f", snapshot.name, result["swd_x1e3_avg"])
    return {"snapshot": snapshot.stem, "tick": meta["tick"], "kimg": meta["kimg"],
            **{f"swd_{res}": v for res, v in result["swd_x1e3"].items()}, "swd_avg": result["swd_x1e3_avg"]}


@dataclass(frozen=True)
class _Claim:
    """What rank 0 holds and learnt while claiming the evaluation."""

    lock: WriterLock
    snapshots: list[Path]
    store: Path
    fingerprint: str
    resolution: int
    reduced: bool  # the real set: the reduced training prefix (tiled), else the full training split

    @property
    def real_set(self) -> str:
        return REAL_SETS[self.reduced]


def evaluate_snapshots(run_dir: Path, *, real: Path | None = None, images: int = 16384, seed: int = 0,
                       device: str | None = None, reduced: bool | None = None, per_bin: bool = False) -> dict[str, Any]:
    """Score every unscored snapshot of ``run_dir`` (collectively over MPI ranks); rank 0 returns the summary.

    ``reduced``: score against the reduced training prefix (True) or the full training split (False); None takes
    what the run trained on, as its snapshots record it. ``per_bin`` (slice-conditioned runs only): also score the
    best snapshot per slice bin into ``swd-bins.csv`` (on rank 0); the summary then has ``swd_bins``."""
    comm = world()
    run_dir = Path(run_dir)
    dev = mpi_device(comm, device)
    claim = from_root(comm, lambda: _claim(run_dir, real, images, seed, reduced, per_bin))
    try:
        summary = _evaluate(run_dir, claim, images, seed, dev, comm)
        if per_bin and summary:  # rank 0, after the others are done: one snapshot, scored bin by bin
            summary["swd_bins"] = _score_bins(run_dir, claim, summary["best"], images, seed, dev)
        return summary
    finally:
        if claim is not None:
            claim.lock.release()


def _claim(run_dir: Path, real: Path | None, images: int, seed: int, reduced: bool | None, per_bin: bool) -> _Claim:
    """Rank 0: refuse a run in training, take the evaluation's lock, remove its stale temporary files, check the
    options its rows were made with."""
    snapshots = sorted((run_dir / "snapshots").glob("tick-*.pt"))
    if not snapshots:
        raise FileNotFoundError(f"{run_dir / 'snapshots'}: no tick snapshots to evaluate")
    if (trainer := holder(run_dir)) is not None:
        raise LockedError(f"{run_dir}: this PGAN run is still being trained by {describe(trainer)}; evaluate its "
                          "snapshots once the training has stopped")
    lock = WriterLock(run_dir / EVAL, "SWD evaluation").acquire()
    try:
        first = torch.load(snapshots[0], map_location="cpu", weights_only=True)
        if per_bin and not first["model"].get("label_size", 0):
            raise ValueError(f"{run_dir}: per-bin SWD needs a slice-conditioned PGAN run (model.label_size > 0); "
                             "this one is unconditioned")
        store = Path(real or first["store"])
        fingerprint = provenance.fingerprint(Store(store).root)
        reduced = bool(first.get("reduced", False)) if reduced is None else reduced  # older snapshots: full
        options = {"images": images, "seed": seed, "real": fingerprint, "swd": asdict(SWDConfig()),
                   **({"real_set": "reduced"} if reduced else {})}  # absent: full, as recorded before the key
        record, table = run_dir / EVAL / OPTIONS, run_dir / TABLE
        if table.exists() and not record.exists():
            raise provenance.OptionsChanged(f"{table}: rows of unknown options (no {record}); move it away to score "
                                            "the snapshots again")
        try:
            provenance.claim(record, options)
        except provenance.OptionsChanged as err:
            raise provenance.OptionsChanged(f"{err}. Rows made another way are never compared with new ones: to score "
                                            f"with these options, move {table} and {run_dir / EVAL} away") from None
        removed = (remove_stale_temps(run_dir, (TABLE, FIGURE, CACHE, BIN_TABLE)) + remove_stale_temps(run_dir / EVAL)
                   + remove_stale_temps(run_dir / "snapshots", (BEST,)))
        if removed:
            log.info("%s: removed %d temporary files of a killed evaluation", run_dir, removed)
        return _Claim(lock, snapshots, store, fingerprint, int(first["model"]["resolution"]), reduced)
    except BaseException:
        lock.release()
        raise


def _evaluate(run_dir: Path, claim: _Claim | None, images: int, seed: int, dev: torch.device,
              comm: Any) -> dict[str, Any]:
    rank, size = comm.Get_rank(), comm.Get_size()
    scored = _read_scores(run_dir / TABLE) if claim else {}
    todo = comm.bcast([s for s in claim.snapshots if s.stem not in scored] if claim else None, root=0)
    cache = run_dir / CACHE
    if todo:  # rank 0 caches the real set's descriptors; an error there stops every rank
        from_root(comm, lambda: _cache_real(claim, cache, images, seed, dev))
    rows = []
    if todo:
        real_desc = load_descriptors(cache)
        n = real_desc[0].shape[0] // SWDConfig().patches_per_image
        rows = [_score(s, real_desc, n, seed, dev) for s in todo[rank::size]]
    gathered = comm.gather(rows, root=0)
    if rank != 0:
        return {}
    for part in gathered:
        scored.update({row["snapshot"]: row for row in part})
    for row in scored.values():  # rows of a table from before the column were made against the same (full) set
        row["real_set"] = claim.real_set
    table = sorted(scored.values(), key=lambda r: int(r["tick"]))
    _write_csv(run_dir / TABLE, table)
    best = min(table, key=lambda r: float(r["swd_avg"]))
    write_bytes(run_dir / "snapshots" / BEST, f"{best['snapshot']}\n".encode())
    curve([int(r["tick"]) for r in table], [float(r["swd_avg"]) for r in table], run_dir / FIGURE,
          xlabel="tick", ylabel="SWD ×1e3 (avg over levels)", mark=int(best["tick"]))
    return {"snapshots": len(table), "scored_now": sum(len(p) for p in gathered), "ranks": size,
            "best": best["snapshot"], "best_swd_avg": float(best["swd_avg"]), "real_set": claim.real_set}


def _cache_real(claim: _Claim, cache: Path, images: int, seed: int, dev: torch.device) -> None:
    """Rank 0: the real set's descriptors in ``cache``, unless it already holds them (same source and protocol)."""
    masks = real_masks(claim.store, images, claim.resolution, reduced=claim.reduced)
    source = f"{claim.store.resolve()}@{claim.resolution} ({claim.fingerprint})"
    wanted = cache_meta(SWDConfig(), seed, len(masks), source + " reduced prefix, repeated" * claim.reduced)
    try:
        load_descriptors(cache, wanted)
    except (FileNotFoundError, ValueError):
        save_descriptors(cache, descriptors(masks, SWDConfig(), seed, dev), wanted)


def _score_bins(run_dir: Path, claim: _Claim, snapshot: str, images: int, seed: int,
                dev: torch.device) -> list[dict[str, Any]]:
    """Rank 0: ``swd-bins.csv`` for ``snapshot``: per bin, the real set's masks in it against as many masks generated
    for it."""
    path = run_dir / "snapshots" / f"{snapshot}.pt"
    generator, meta = load_generator(path, dev)
    bins, _ = snapshot_bins(meta, path)
    masks = real_masks(claim.store, images, claim.resolution, reduced=claim.reduced)
    slices = mask_slices(claim.store, claim.reduced)
    count = min(len(masks), len(slices))  # the real set without the reduced set's repeats
    masks, real_bins = masks[:count], bins.of(slices[:count])
    rows = []
    for b in range(bins.count):
        real = masks[real_bins == b]
        first, last = (int(v) for v in _bin_range(bins, b))
        row: dict[str, Any] = {"snapshot": snapshot, "bin": b, "first_slice": first, "last_slice": last,
                               "real": len(real), "swd_avg": ""}
        if len(real):
            latents = torch.randn(len(real), generator.config.latent,
                                  generator=torch.Generator().manual_seed(epoch_seed(seed, b)))
            labels = torch.full((len(real),), b, dtype=torch.int64)
            fake = generate_labels(generator, float(meta["lod"]), latents, batch=64, labels=labels)
            result = swd_from_descriptors(descriptors(real, SWDConfig(), seed, dev),
                                          descriptors(fake, SWDConfig(), seed, dev), seed=seed)
            row["swd_avg"] = result["swd_x1e3_avg"]
            log.info("%s bin %d (slices %d–%d, %d real): SWD avg %.2f", snapshot, b, first, last, len(real),
                     result["swd_x1e3_avg"])
        rows.append(row)
    _write_csv(run_dir / BIN_TABLE, rows)
    return rows


def _bin_range(bins: SliceBins, b: int) -> tuple[int, int]:
    """The first and last slice index of bin ``b``."""
    indices = np.arange(bins.lo, bins.hi)
    inside = indices[bins.of(indices) == b]
    return inside[0], inside[-1]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buffer.getvalue().encode())
