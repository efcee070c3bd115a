"""`tumorsynth generate images`: a SPADE run's generator × a (kept) mask store → a paired synthetic store.

Every row of every split of the mask store gets one synthetic MR slice; shard k of the output holds exactly the rows
of shard k of the input, so a killed synthesis resumes by skipping finished shards (checksums verified by
:class:`StoreWriter`). The generator runs in eval mode (BatchNorm on running statistics) with no noise input, so the
output is a pure function of the masks and the weights. Images are written as native uint16 with the intensity maximum
the generator was trained with; the provenance names the SPADE run, its epoch and the mask store (with that store's own
provenance, so a synthetic store traces back to the PGAN snapshot).

Run it plainly or under ``mpirun -n K`` / ``srun --mpi=pmix``: ranks take the shards round-robin, each on its own GPU
(:func:`~toolkit.train.distributed.mpi_device`), and rank 0 finishes the store — PNG export, manifest, preview
(:mod:`toolkit.train.ranks`); output shard k depends on input shard k only, so the store is byte-identical for any
rank count.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from toolkit.data.prepare import export_png
from toolkit.data.store import MANIFEST, Manifest, Store
from toolkit.models.spade import one_hot
from toolkit.mpi import world
from toolkit.report.figures import row_grid
from toolkit.train.distributed import mpi_device
from toolkit.train.ranks import write_shards
from toolkit.train.spade import GENERATOR, load_generator, to_uint16

log = logging.getLogger(__name__)

PREVIEW = "preview.png"


@torch.no_grad()
def synthesize(G: torch.nn.Module, labels: np.ndarray, intensity_max: float, batch: int) -> np.ndarray:
    """uint16 images [n, R, R] for uint8 masks [n, R, R], ``batch`` at a time."""
    device = next(G.parameters()).device
    classes = G.cfg.label_nc
    parts = []
    for i in range(0, len(labels), batch):
        segmap = one_hot(torch.from_numpy(labels[i:i + batch]).to(device), classes)
        parts.append(to_uint16(G(segmap)[:, 0], intensity_max).cpu())
    return torch.cat(parts).numpy().astype(np.uint16)


def generate_images(run_dir: Path, masks: Path, out: Path, *, batch: int = 16, device: str | None = None,
                    png: bool = False, comm: Any = None) -> Manifest | None:
    """Write the paired synthetic store ``out`` for every mask of ``masks``; a complete store is kept as it is.
    Collective over ``comm`` (default ``MPI.COMM_WORLD``); rank 0 returns the manifest, other ranks None."""
    comm = world(comm)
    out = Path(out)
    if (out / MANIFEST).exists():  # checked on every rank, so that all of them stop
        log.info("%s: store is already complete", out)
        return Store(out).manifest if comm.Get_rank() == 0 else None
    source = Store(masks)
    path = Path(run_dir) / GENERATOR
    if not path.exists():
        raise FileNotFoundError(f"{path}: no generator yet; train SPADE first (`tumorsynth train spade`)")
    G, meta = load_generator(path, mpi_device(comm, device))
    m = source.manifest
    if m.image_size != G.cfg.resolution or m.classes != G.cfg.label_nc:
        raise ValueError(f"{source.root}: {m.classes}-class {m.image_size}² masks, but the generator in {path} "
                         f"takes {G.cfg.label_nc}-class {G.cfg.resolution}² masks")
    intensity_max = float(meta["intensity_max"])
    inputs = {(split, k): shard_path for split in m.splits for k, (_, shard_path) in enumerate(source.shards(split))}

    def make(split: str, k: int) -> dict[str, Any]:
        with h5py.File(inputs[(split, k)], "r") as f:
            labels, subjects, slices = f["label"][:], f["subject"].asstr()[:], f["slice"][:]
        return {"label": labels, "image": synthesize(G, labels, intensity_max, batch), "subject": list(subjects),
                "slice_index": slices}

    writer = write_shards(out, m.classes, list(inputs), make, comm)
    if writer is None:
        return None
    if png:
        for split, k in inputs:
            export_png((out, out / writer.done(split, k).file))
    manifest = writer.finish(kind="synthetic", image_size=m.image_size, has_image=True,
                             shard_counts={split: len(m.splits[split].shards) for split in m.splits},
                             reduced_fraction=m.reduced_fraction, modality=meta.get("modality"),
                             provenance={"spade_run": str(Path(run_dir).resolve()), "epoch": meta["epoch"],
                                         "spade_store": meta["store"], "masks": str(source.root.resolve()),
                                         "masks_provenance": m.provenance})
    preview(out)
    return manifest


def preview(store: Path, columns: int = 8) -> Path | None:
    """A mask / synthetic MR grid of the first rows of the store's first split (the paper's Figs 5–6); None when the
    store is empty (e.g. every mask was filtered out)."""
    s = Store(store)
    split = next(iter(s.manifest.splits))
    if not s.manifest.splits[split].n:
        return None
    rows = s.read(split, 0, columns, fields=("label", "image"))
    return row_grid([("mask", rows["label"], True), ("synthetic MR", rows["image"], False)], Path(store) / PREVIEW,
                    f"{s.root.name}: synthetic pairs")
