"""Evaluation jobs: U-Net runs on a split, and SWD over every PGAN snapshot (MPI across the job's tasks).

Under SLURM the SWD job runs one MPI rank per task (``srun --mpi=pmix``, set by the executor); snapshots already scored
are skipped, so a requeued evaluation continues where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jobs.base import Job


@dataclasses.dataclass(frozen=True)
class EvaluateUNetJob(Job):
    """``tumorsynth evaluate unet RUN --split SPLIT``."""

    run_dir: Path
    split: str = "test"

    def log_dir(self) -> Path:
        return Path(self.run_dir)

    def run(self) -> dict[str, Any]:
        from toolkit.train.unet_eval import evaluate_run

        return evaluate_run(Path(self.run_dir), split=self.split)


@dataclasses.dataclass(frozen=True)
class EvaluateSWDJob(Job):
    """``tumorsynth evaluate swd PGAN_RUN --images N`` on all MPI ranks of the job.

    ``reduced``: the real set, the reduced training prefix (True) or the full training split (False); None: the one
    the run trained on, as its snapshots record it."""

    run_dir: Path
    images: int = 16384
    reduced: bool | None = None

    def log_dir(self) -> Path:
        return Path(self.run_dir)

    def run(self) -> dict[str, Any]:
        from toolkit.train.pgan_eval import evaluate_snapshots

        return evaluate_snapshots(Path(self.run_dir), images=self.images, reduced=self.reduced)
