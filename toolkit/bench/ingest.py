"""`tumorsynth bench ingest`: NIfTI → store throughput on a freshly generated phantom cohort."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from toolkit.data.phantom import write_cohort
from toolkit.data.prepare import PrepareConfig, prepare


def bench_ingest(*, subjects: int = 4, size: int = 256, workers: int = 1, tissue: str = "hmrf") -> dict[str, Any]:
    """Time ``prepare`` (validation, tissue, slicing, shards, PNGs, manifest) over ``subjects`` phantoms."""
    with tempfile.TemporaryDirectory(prefix="tumorsynth-bench-") as tmp:
        cohort, store = Path(tmp) / "cohort", Path(tmp) / "store"
        write_cohort(cohort, subjects, seed=0, workers=workers)
        start = time.perf_counter()
        result = prepare(PrepareConfig(src=cohort, out=store, size=size, tissue=tissue, workers=workers))
        seconds = time.perf_counter() - start
    assert result.manifest is not None
    slices = sum(s.n for s in result.manifest.splits.values())
    return {
        "bench": "ingest", "subjects": subjects, "slices": slices, "image_size": size, "workers": workers,
        "tissue": tissue, "seconds": round(seconds, 2), "subjects_per_s": round(subjects / seconds, 3),
        "slices_per_s": round(slices / seconds, 1),
    }
