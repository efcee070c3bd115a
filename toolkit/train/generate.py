"""`tumorsynth generate masks`: a PGAN snapshot → a mask-only synthetic store, in batches, resumable by shard.

Shard k's latents come from a generator seeded by (seed, k), so a killed generation resumes by skipping finished
shards (checksums verified by :class:`StoreWriter`) and produces the same store as an uninterrupted one. Generator
outputs in [−1, 1] are mapped back to label values 0…6, rounded to the nearest class and clipped.

Run it plainly or under ``mpirun -n K`` / ``srun --mpi=pmix``: ranks take the shards round-robin, each on its own GPU
(:func:`~toolkit.train.distributed.mpi_device`), and rank 0 finishes the store (:mod:`toolkit.train.ranks`); since
shard k depends on k only, the store is byte-identical for any rank count.

A slice-conditioned snapshot (``model.label_size`` > 0) also draws each shard's labels (axial bins) from that
(seed, k) generator, after the latents, in proportion to the snapshot's ``bin_counts`` (the training masks per bin), so
the store stays byte-identical for any rank count; each row records its bin's centre slice
(:meth:`~toolkit.data.bins.SliceBins.centre`) in the ``slice`` field (unconditioned rows: −1), and the manifest's
provenance holds the bins as ``slice_bins``.

The store records what defines it (:mod:`toolkit.provenance`): ``n``, ``seed``, ``shard_size``, ``png``, the resolved
snapshot file, its fingerprint and resolution (and ``label_size`` for a conditioned snapshot). ``--snapshot best`` is
resolved first, so a resume after `evaluate swd` moved the ``best`` pointer (or after the snapshot file changed) is
refused naming ``snapshot``, as is a resume with another ``--n`` or ``--seed``, and a complete store made with other
options is refused rather than reported complete.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import provenance
from toolkit.config import from_dict
from toolkit.data.bins import SliceBins
from toolkit.data.prepare import export_png
from toolkit.data.store import Manifest, shard_name
from toolkit.models.pgan import Generator, PGANConfig
from toolkit.mpi import world
from toolkit.train.distributed import mpi_device
from toolkit.train.pgan import to_labels
from toolkit.train.ranks import open_store, write_shards
from toolkit.train.sampling import epoch_seed

log = logging.getLogger(__name__)


def snapshot_path(run_dir: Path, snapshot: str = "best") -> Path:
    """Resolve ``best`` (the pointer `evaluate swd` writes), a tick name such as ``tick-0012`` or a file path."""
    run_dir = Path(run_dir)
    if snapshot == "best":
        pointer = run_dir / "snapshots" / "best"
        if not pointer.exists():
            raise FileNotFoundError(f"{pointer}: no best snapshot yet; run `tumorsynth evaluate swd {run_dir}` first")
        snapshot = pointer.read_text().strip()
    path = Path(snapshot) if snapshot.endswith(".pt") and Path(snapshot).exists() else (
        run_dir / "snapshots" / f"{Path(snapshot).stem}.pt")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such snapshot")
    return path


def load_generator(path: Path, device: torch.device) -> tuple[Generator, dict[str, Any]]:
    """The EMA generator of a snapshot, in eval mode, and the snapshot's metadata (lod, kimg, tick, store)."""
    snap = torch.load(path, map_location="cpu", weights_only=True)
    generator = Generator(from_dict(PGANConfig, snap["model"], source=str(path)))
    generator.load_state_dict(snap["G_ema"], strict=True)
    return generator.to(device).eval(), {k: v for k, v in snap.items() if k != "G_ema"}


def snapshot_bins(meta: dict[str, Any], source: Path) -> tuple[SliceBins, list[int]] | None:
    """The slice bins and training masks per bin of a conditioned snapshot (None for an unconditioned one)."""
    label_size = int(meta["model"].get("label_size", 0))
    if not label_size:
        return None
    if "slice_bins" not in meta or "bin_counts" not in meta:
        raise ValueError(f"{source}: a slice-conditioned snapshot (label_size {label_size}) without slice_bins and "
                         "bin_counts")
    bins, counts = SliceBins.from_dict(meta["slice_bins"]), [int(c) for c in meta["bin_counts"]]
    if bins.count != label_size or len(counts) != label_size or sum(counts) < 1:
        raise ValueError(f"{source}: slice_bins {bins} and bin_counts {counts} do not fit label_size {label_size}")
    return bins, counts


def draw_bins(counts: list[int], n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels (int64, CPU) drawn with replacement in proportion to ``counts`` (the training masks per bin)."""
    return torch.multinomial(torch.tensor(counts, dtype=torch.float64), n, replacement=True, generator=generator)


@torch.no_grad()
def generate_labels(generator: Generator, lod: float, latents: torch.Tensor, batch: int,
                    labels: torch.Tensor | None = None) -> np.ndarray:
    """Label maps uint8 [n, R, R] for ``latents`` (and, for a conditioned generator, the bins ``labels``: int64
    [n]), ``batch`` at a time."""
    device = next(generator.parameters()).device
    latents = latents.to(device)  # one upload, and one download at the end: no host synchronisation per batch
    labels = None if labels is None else labels.to(device)
    parts = []
    for i in range(0, len(latents), batch):
        part_labels = None if labels is None else labels[i:i + batch]
        parts.append(to_labels(generator(latents[i:i + batch], lod, part_labels)[:, 0]))
    return torch.cat(parts).cpu().numpy()


def generate_masks(run_dir: Path, n: int, out: Path, *, snapshot: str = "best", seed: int = 0,
                   shard_size: int = 1024, batch: int = 64, device: str | None = None, png: bool = False,
                   comm: Any = None) -> Manifest | None:
    """Write ``n`` generated masks as the train split of the synthetic store ``out`` (optionally with a PNG export);
    a complete store made with the same options is kept as it is (with other ones: OptionsChanged). Collective over
    ``comm`` (default ``MPI.COMM_WORLD``); rank 0 returns the manifest, other ranks None."""
    comm = world(comm)
    out = Path(out)
    if n < 1:
        raise ValueError(f"--n must be ≥ 1, got {n}")
    path = snapshot_path(run_dir, snapshot)
    fingerprint = provenance.fingerprint(path)  # on every rank: open_store refuses ranks that loaded other files
    generator, meta = load_generator(path, mpi_device(comm, device))
    latent, lod = generator.config.latent, float(meta["lod"])
    conditioning = snapshot_bins(meta, path)
    options = {"n": n, "seed": seed, "shard_size": shard_size, "png": png, "snapshot": path.name,
               "snapshot_fingerprint": fingerprint, "resolution": generator.config.resolution,
               **({"label_size": generator.config.label_size} if conditioning else {})}  # absent: unconditioned
    complete, writer = open_store(out, 7, options, comm)
    if complete:
        log.info("%s: store is already complete", out)
        return writer  # rank 0: the manifest; other ranks None
    shards = -(-n // shard_size)

    def make(split: str, k: int) -> dict[str, Any]:
        first = k * shard_size
        rows = min(shard_size, n - first)
        stream = torch.Generator().manual_seed(epoch_seed(seed, k))
        z = torch.randn(rows, latent, generator=stream)
        labels, slices = None, np.full(rows, -1)
        if conditioning:
            bins, counts = conditioning
            labels = draw_bins(counts, rows, stream)  # after the latents: they are those of an unconditioned run
            slices = bins.centre(labels.numpy())
        return {"label": generate_labels(generator, lod, z, batch, labels),
                "subject": [f"{path.stem}-{first + i:07d}" for i in range(rows)], "slice_index": slices}

    with writer or contextlib.nullcontext():  # rank 0 gives the lock up on an error too (the store stays resumable)
        writer = write_shards(writer, out, 7, [("train", k) for k in range(shards)], make, comm)
        if writer is None:
            return None
        if png:
            for k in range(shards):
                export_png((out, out / shard_name("train", k), ()))  # masks only: no image channels
        return writer.finish(kind="synthetic", image_size=generator.config.resolution, has_image=False,
                             shard_counts={"train": shards},
                             provenance={"generator_run": str(Path(run_dir).resolve()), "snapshot": path.name,
                                         "tick": meta.get("tick"), "kimg": meta.get("kimg"), "seed": seed, "n": n,
                                         "source_store": meta.get("store"),
                                         **({"slice_bins": conditioning[0].to_dict()} if conditioning else {})})
