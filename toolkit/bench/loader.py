"""``tumorsynth bench loader``: training-data throughput (slices/s) of a store through a torch DataLoader."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from toolkit.data.dataset import SliceDataset, Source
from toolkit.data.store import Store

log = logging.getLogger(__name__)


def _warm_page_cache(store: Store, split: str) -> None:
    """Read every shard of ``split`` once so the measurement starts from a warm page cache."""
    for _, path in store.shards(split):
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass


def bench_loader(store: Path, *, seconds: float = 5.0, batch: int = 8, workers: int = 0) -> dict[str, Any]:
    """Slices per second of the store's training split through a shuffling DataLoader, for about ``seconds``.

    Images are included when the store has them. With ``workers=0`` the main process is pinned to one torch thread
    for the measurement (the goal is per-core throughput; idle OpenMP threads only add contention); workers run with
    one thread each, as torch sets them up. Worker start-up and the first batch are not timed. Besides wall-clock
    ``slices_per_s``, ``cpu_slices_per_s`` (workers=0 only) divides by this process's CPU time, which stays meaningful
    on a machine shared with other jobs.
    """
    opened = Store(store)
    _warm_page_cache(opened, "train")
    dataset = SliceDataset([Source(opened.root, "train")], classes=opened.manifest.classes,
                           with_image=opened.manifest.has_image)
    if not len(dataset):
        raise ValueError(f"{opened.root}: the train split has no rows to benchmark")
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, collate_fn=SliceDataset.collate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        slices, elapsed, cpu, started = 0, 0.0, 0.0, False
        while elapsed < seconds:
            for item in loader:
                if not started:  # the first batch pays for worker start-up and file opening
                    started, begin, cpu_begin = True, time.perf_counter(), time.process_time()
                    continue
                slices += len(item["label"])
                elapsed = time.perf_counter() - begin
                cpu = time.process_time() - cpu_begin
                if elapsed >= seconds:
                    break
    finally:
        torch.set_num_threads(threads)
        dataset.close()
    rate = slices / elapsed if elapsed else 0.0
    cpu_rate = slices / cpu if workers == 0 and cpu else None
    log.info("loader: %.0f slices/s (%d slices in %.1f s, batch %d, %d workers)", rate, slices, elapsed, batch, workers)
    return {"bench": "loader", "slices_per_s": rate, "batch": batch, "workers": workers,
            "image_size": opened.manifest.image_size, "rows": len(dataset), "seconds": elapsed,
            "cpu_slices_per_s": cpu_rate}
