"""`tumorsynth evaluate swd PGAN_RUN`: SWD of every tick snapshot against the real masks, spread over MPI ranks.

Run it plainly (one rank) or under ``mpirun -n K`` / ``srun --mpi=pmix``, each rank on its own GPU
(:func:`~toolkit.train.distributed.mpi_device`): rank 0 computes (or loads) the real set's
descriptors once and caches them in the run, ranks take the unscored snapshots round-robin, rank 0 gathers the rows and
writes ``swd.csv`` (atomically), ``swd.png`` (SWD versus tick) and the pointer ``snapshots/best`` (lowest average SWD).
A re-run scores only snapshots missing from ``swd.csv``.

Protocol (official): as many generated as real images (16,384 by default, fewer when the store has fewer non-empty
masks), both as label maps 0…6 at the generator's resolution; reals reduced to it as in training (box average in
[−1, 1], then rounded to the nearest class).
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.atomic import write_bytes
from toolkit.data.dataset import SliceDataset, Source
from toolkit.metrics.swd import (
    SWDConfig,
    cache_meta,
    descriptors,
    load_descriptors,
    save_descriptors,
    swd_from_descriptors,
)
from toolkit.mpi import world
from toolkit.report.figures import curve
from toolkit.train.distributed import mpi_device
from toolkit.train.generate import generate_labels, load_generator
from toolkit.train.pgan import reals_at, to_labels

log = logging.getLogger(__name__)


def real_masks(store: Path, n: int, resolution: int) -> np.ndarray:
    """The first ``n`` non-empty training masks of ``store`` at ``resolution`` (uint8 labels)."""
    data = SliceDataset([Source(store, "train", drop_empty=True)], classes=7, with_image=False)
    n = min(n, len(data))
    labels = torch.cat([data.collate(data.__getitems__(list(range(i, min(i + 512, n)))))["label"]
                        for i in range(0, n, 512)])
    return to_labels(reals_at(labels, resolution)[:, 0]).numpy()


def _read_scores(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        return {row["snapshot"]: row for row in csv.DictReader(handle)}


def _score(snapshot: Path, real_desc: list[torch.Tensor], n: int, seed: int, device: torch.device) -> dict[str, Any]:
    generator, meta = load_generator(snapshot, device)
    latents = torch.randn(n, generator.config.latent, generator=torch.Generator().manual_seed(seed))
    fake = generate_labels(generator, float(meta["lod"]), latents, batch=64)
    result = swd_from_descriptors(real_desc, descriptors(fake, SWDConfig(), seed, device), seed=seed)
    log.info("%s: SWD avg %.2f", snapshot.name, result["swd_x1e3_avg"])
    return {"snapshot": snapshot.stem, "tick": meta["tick"], "kimg": meta["kimg"],
            **{f"swd_{res}": v for res, v in result["swd_x1e3"].items()}, "swd_avg": result["swd_x1e3_avg"]}


def evaluate_snapshots(run_dir: Path, *, real: Path | None = None, images: int = 16384, seed: int = 0,
                       device: str | None = None) -> dict[str, Any]:
    """Score every unscored snapshot of ``run_dir`` (collectively over MPI ranks); rank 0 returns the summary."""
    comm = world()
    rank, size = comm.Get_rank(), comm.Get_size()
    run_dir = Path(run_dir)
    snapshots = sorted((run_dir / "snapshots").glob("tick-*.pt"))
    if not snapshots:
        raise FileNotFoundError(f"{run_dir / 'snapshots'}: no tick snapshots to evaluate")
    dev = mpi_device(comm, device)
    scored = _read_scores(run_dir / "swd.csv")
    todo = [s for s in snapshots if s.stem not in scored]
    cache = run_dir / "swd-real.pt"
    if rank == 0 and todo:
        _, meta = load_generator(snapshots[0], torch.device("cpu"))
        store = Path(real or meta["store"])
        resolution = torch.load(snapshots[0], weights_only=True)["model"]["resolution"]
        masks = real_masks(store, images, resolution)
        wanted = cache_meta(SWDConfig(), seed, len(masks), f"{store.resolve()}@{resolution}")
        try:
            load_descriptors(cache, wanted)
        except (FileNotFoundError, ValueError):
            save_descriptors(cache, descriptors(masks, SWDConfig(), seed, dev), wanted)
    comm.Barrier()
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
    table = sorted(scored.values(), key=lambda r: int(r["tick"]))
    _write_csv(run_dir / "swd.csv", table)
    best = min(table, key=lambda r: float(r["swd_avg"]))
    write_bytes(run_dir / "snapshots" / "best", f"{best['snapshot']}\n".encode())
    curve([int(r["tick"]) for r in table], [float(r["swd_avg"]) for r in table], run_dir / "swd.png",
          xlabel="tick", ylabel="SWD ×1e3 (avg over levels)", mark=int(best["tick"]))
    return {"snapshots": len(table), "scored_now": sum(len(p) for p in gathered), "ranks": size,
            "best": best["snapshot"], "best_swd_avg": float(best["swd_avg"])}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, buffer.getvalue().encode())
