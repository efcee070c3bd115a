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

The store records what defines it (:mod:`toolkit.provenance`): the fingerprints of the generator file and of the mask
store, the generator's epoch and ``png`` (not ``batch`` or the device, which do not change what is computed). SPADE
rewrites ``generator.pt`` every epoch, so a synthesis resumed after more SPADE training is refused naming
``generator``, never finished with a second generator; so is a complete store made from another generator or other
masks. A SPADE run that is still training (its run directory's lock held) is refused at once, for the same reason.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import provenance
from toolkit.data.prepare import export_png
from toolkit.data.store import Manifest, Store, as_channels, modality_list, open_shard, reading
from toolkit.lock import LockedError, describe, holder
from toolkit.models.spade import one_hot
from toolkit.mpi import from_root, world
from toolkit.report.figures import row_grid
from toolkit.train.distributed import mpi_device
from toolkit.train.ranks import open_store, write_shards
from toolkit.train.spade import GENERATOR, channel_scale, load_generator, to_uint16

log = logging.getLogger(__name__)

PREVIEW = "preview.png"


@torch.no_grad()
def synthesize(G: torch.nn.Module, labels: np.ndarray, intensity_max: float | list[float], batch: int) -> np.ndarray:
    """uint16 images for uint8 masks [n, R, R], ``batch`` at a time: [n, R, R] from a one-channel generator, else
    [n, C, R, R] (the store's layouts)."""
    device = next(G.parameters()).device
    classes = G.cfg.label_nc
    scale = channel_scale(intensity_max, device)
    parts = []
    for i in range(0, len(labels), batch):
        segmap = one_hot(torch.from_numpy(labels[i:i + batch]).to(device), classes)
        image = to_uint16(G(segmap), scale)
        parts.append((image[:, 0] if image.shape[1] == 1 else image).cpu())
    return torch.cat(parts).numpy().astype(np.uint16)


def generate_images(run_dir: Path, masks: Path, out: Path, *, batch: int = 16, device: str | None = None,
                    png: bool = False, comm: Any = None) -> Manifest | None:
    """Write the paired synthetic store ``out`` for every mask of ``masks``; a complete store made from the same
    generator and masks is kept as it is (otherwise: OptionsChanged). Collective over ``comm`` (default
    ``MPI.COMM_WORLD``); rank 0 returns the manifest, other ranks None."""
    comm = world(comm)
    out = Path(out)
    source = Store(masks)
    path = Path(run_dir) / GENERATOR
    if not path.exists():
        raise FileNotFoundError(f"{path}: no generator yet; train SPADE first (`tumorsynth train spade`)")
    from_root(comm, lambda: _not_training(Path(run_dir)))  # asked on rank 0 only, so that all ranks agree
    fingerprint = provenance.fingerprint(path)  # on every rank: open_store refuses ranks that loaded other files
    G, meta = load_generator(path, mpi_device(comm, device))
    m = source.manifest
    if m.image_size != G.cfg.resolution or m.classes != G.cfg.label_nc:
        raise ValueError(f"{source.root}: {m.classes}-class {m.image_size}² masks, but the generator in {path} "
                         f"takes {G.cfg.label_nc}-class {G.cfg.resolution}² masks")
    options = {"generator": fingerprint, "epoch": meta.get("epoch"), "masks": provenance.fingerprint(source.root),
               "png": png}
    complete, writer = open_store(out, m.classes, options, comm)
    if complete:
        log.info("%s: store is already complete", out)
        return writer  # rank 0: the manifest; other ranks None
    intensity_max = meta["intensity_max"]
    inputs = {(split, k): shard for split in m.splits for k, shard in enumerate(source.shards(split))}

    def make(split: str, k: int) -> dict[str, Any]:
        info, path = inputs[(split, k)]
        with open_shard(path, info.sha256) as f, reading(path):
            labels, subjects, slices = f["label"][:], f["subject"].asstr()[:], f["slice"][:]
        return {"label": labels, "image": synthesize(G, labels, intensity_max, batch), "subject": list(subjects),
                "slice_index": slices}

    with writer or contextlib.nullcontext():  # rank 0 gives the lock up on an error too (the store stays resumable)
        writer = write_shards(writer, out, m.classes, list(inputs), make, comm)
        if writer is None:
            return None
        if png:
            for split, k in inputs:
                export_png((out, out / writer.done(split, k).file, modality_list(meta.get("modality"))))
        manifest = writer.finish(kind="synthetic", image_size=m.image_size, has_image=True,
                                 shard_counts={split: len(m.splits[split].shards) for split in m.splits},
                                 reduced_fraction=m.reduced_fraction, modality=meta.get("modality"),
                                 provenance={"spade_run": str(Path(run_dir).resolve()), "epoch": meta["epoch"],
                                             "spade_store": meta["store"], "masks": str(source.root.resolve()),
                                             "masks_provenance": m.provenance})
    preview(out)
    return manifest


def _not_training(run_dir: Path) -> None:
    if (trainer := holder(run_dir)) is not None:
        raise LockedError(f"{run_dir}: this SPADE run is still being trained by {describe(trainer)}; its {GENERATOR} "
                          "changes every epoch: generate images once the training has stopped")


def preview(store: Path, columns: int = 8) -> Path | None:
    """A mask / synthetic MR grid of the first rows of the store's first split (the paper's Figs 5–6); None when the
    store is empty (e.g. every mask was filtered out)."""
    s = Store(store)
    split = next(iter(s.manifest.splits))
    if not s.manifest.splits[split].n:
        return None
    rows = s.read(split, 0, columns, fields=("label", "image"))
    names = [f" {m}" for m in s.manifest.modalities] if s.manifest.channels > 1 else [""]
    images = as_channels(rows["image"])
    return row_grid([("mask", rows["label"], True),
                     *((f"synthetic MR{name}", images[:, c], False) for c, name in enumerate(names))],
                    Path(store) / PREVIEW, f"{s.root.name}: synthetic pairs")
