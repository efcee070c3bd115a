"""What every job shares: resume-from-disk semantics, submitit's checkpoint protocol, start and failure logs.

A job is a frozen dataclass holding only its configuration (paths and overrides); calling it does the step, resuming
from whatever its output already holds (run directories resume from the newest complete checkpoint, stores skip
finished shards). ``checkpoint()`` (called by submitit on preemption or timeout) returns a fresh copy of the job: the
state lives on disk, never in the job object, so a fresh copy is exactly "continue".

Every start is logged in ``<log_dir>/attempts.jsonl`` (time, SLURM job id, host), from which ``sweep status`` counts
restarts; a failure writes ``<log_dir>/ERROR`` (the traceback) and re-raises, so the scheduler sees the job fail. The
log folder is the run directory for training and evaluation, and ``.<store>.job/`` beside a store that a job writes
(a store folder holds only the store).

A job whose log folder another live process holds (:mod:`toolkit.lock`: a training in that run directory, e.g. the
old attempt of a requeued job still running) stops at once with :class:`~toolkit.lock.LockedError` and touches
nothing: no start is logged and no ERROR written, since the folder is the other writer's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import submitit

from toolkit.atomic import write_bytes
from toolkit.lock import LockedError, describe, holder
from toolkit.train.errors import ClaimError

log = logging.getLogger(__name__)

ATTEMPTS = "attempts.jsonl"
ERROR = "ERROR"


def _rank() -> str:
    """This process's rank in its job: srun's, else mpirun's (the MPI steps of a local pipeline), else 0."""
    for name in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if name in os.environ:
            return os.environ[name]
    return "0"


def store_log_dir(store: Path) -> Path:
    """The log folder of a job that writes the store ``store``: ``.<name>.job`` beside it."""
    store = Path(store)
    return store.parent / f".{store.name}.job"


@dataclasses.dataclass(frozen=True)
class Job:
    """Base class: subclasses name their :meth:`log_dir` and implement :meth:`run`."""

    def log_dir(self) -> Path:
        raise NotImplementedError

    def run(self) -> Any:
        raise NotImplementedError

    def __call__(self) -> Any:
        out = self.log_dir()
        rank = _rank()
        # Only rank 0 asks: the other ranks of a job may start while rank 0 already holds the folder.
        if rank == "0" and (other := holder(out)) is not None:
            raise LockedError(f"{out}: is being written by {describe(other)}; this job does not start")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ATTEMPTS, "a") as handle:
            handle.write(json.dumps({"time": time.time(), "job_id": os.environ.get("SLURM_JOB_ID"),
                                     "array_task": os.environ.get("SLURM_ARRAY_TASK_ID"),
                                     "host": socket.gethostname(), "rank": rank})
                         + "\n")
        try:
            result = self.run()
        except (LockedError, ClaimError):
            raise  # another writer started in between (or rank 0 found one): the folder is not ours to mark failed
        except Exception:
            write_bytes(out / ERROR, traceback.format_exc().encode())
            raise
        (out / ERROR).unlink(missing_ok=True)
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's preemption hook: the state is on disk, so requeue a fresh copy of this job."""
        log.warning("%s: checkpoint requested; requeueing a fresh copy", type(self).__name__)
        return submitit.helpers.DelayedSubmission(dataclasses.replace(self))
