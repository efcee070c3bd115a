"""Training job: `tumorsynth train MODEL` as a resumable submitit callable (one process per task; DDP across tasks).

Preemption: SLURM's time-limit warning (or ``scancel --signal=USR2``) signals every task; the training loop turns
the signal into a checkpoint at the next step boundary, agreed by all ranks, and returns "preempted". The job then
hands over to submitit's own USR2 handler, which calls :meth:`Job.checkpoint` (a fresh copy of this job), requeues
the SLURM job and exits; the requeued job resumes from that checkpoint. SIGTERM (``scancel``, ``scontrol requeue``,
preemption by a higher-priority job) also checkpoints if the step ends before SLURM's kill, but then the job just
exits: SLURM decides whether it runs again. A hard kill resumes from the newest periodic checkpoint. With
``evaluate``, the finished U-Net run is scored on that split (``RUN/eval-<split>.json``) by rank 0, which is what
sweeps report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
from pathlib import Path
from typing import Any

from jobs.base import Job
from toolkit.train.run import train

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainJob(Job):
    """Train ``model`` from ``config`` (+ ``overrides``) into ``run_dir``; optionally evaluate the result."""

    model: str
    config: Path
    run_dir: Path
    overrides: tuple[str, ...] = ()
    backend: str = "none"
    evaluate: str | None = None

    def log_dir(self) -> Path:
        return Path(self.run_dir)

    def run(self) -> dict[str, Any]:
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # installed by submitit before calling the job
        result = train(self.model, Path(self.config), tuple(self.overrides), Path(self.run_dir), self.backend)
        if result.status == "preempted":
            if result.metrics.get("signal") == signal.SIGTERM:
                # SLURM itself ends this attempt (scancel, scontrol requeue, preemption, node shutdown) and decides
                # whether it runs again; requeueing here would undo a cancel. Exit without a result (submitit
                # catches Exception, not SystemExit), as a process killed by SIGTERM would.
                raise SystemExit(128 + signal.SIGTERM)
            if callable(submitit_handler):
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() → requeue → exit (rank 0; others return)
            return {"status": "preempted", **result.metrics}
        doc = {"status": result.status, **result.metrics}
        rank = os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))
        if self.evaluate and self.model == "unet" and rank == "0":
            from toolkit.train.unet_eval import evaluate_run

            doc["evaluation"] = evaluate_run(Path(self.run_dir), split=self.evaluate)
        return doc
