"""Filter job: the MPI-parallel z-score filter across the job's tasks (``srun --mpi=pmix``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jobs.base import Job, store_log_dir
from toolkit.filter.zscore import filter_store


@dataclasses.dataclass(frozen=True)
class FilterJob(Job):
    """``tumorsynth filter zscore --real REAL --synthetic SYNTHETIC --out OUT``; a complete output made with the same
    options is kept (with other ones the job fails, naming them)."""

    real: Path
    synthetic: Path
    out: Path
    threshold: float = 500.0
    reduced: bool = False
    min_std: float = 0.0

    def log_dir(self) -> Path:
        return store_log_dir(self.out)

    def run(self) -> dict[str, Any]:
        return filter_store(Path(self.real), Path(self.synthetic), Path(self.out), threshold=self.threshold,
                            reduced=self.reduced, min_std=self.min_std)
