"""`tumorsynth pipeline run CONFIG --cluster local|slurm`: the whole data flow (DESIGN §2) as dependent jobs.

Per branch (``full`` trains the generators on the whole real training split, ``reduced`` on its first 20 %):

    prepare → pgan → swd (MPI) → masks → filter (MPI) ┐
            └──────────────→ spade ───────────────────┴→ images ─→ sweep (all branches) → report

The sweep file's variables ``real``, ``synthetic_full``, ``synthetic_reduced`` (and ``synthetic``, the first
branch's store) are set to the pipeline's stores. On ``slurm`` every step is a job that waits for its parents
(``--dependency=afterok``), MPI steps run their ranks under ``srun --mpi=pmix``, and the sweep is one job array; the
call returns once everything is queued (a job whose parent fails is cancelled, not left waiting). On ``local`` the
steps run here, in order, MPI steps under ``mpirun``. Either way a step whose output is complete is skipped (and on
``slurm`` one whose job from an earlier run is still queued keeps that job), so running a pipeline again resumes it;
the jobs themselves resume from their checkpoints and finished shards. Everything lives under ``out``: ``store/``,
``runs/{pgan,spade}-<b>/``, ``stores/{masks,kept,synthetic}-<b>/``, ``sweep/`` and ``.pipeline/`` (pickled jobs for
mpirun, submitit logs, ``jobs.json`` with the job ids). ``.pipeline/`` is private (0700, owner-checked: it holds
pickles, which run as code). A run holds its lock throughout, so a second run of the same pipeline stops at once
naming the first, and rewrites ``jobs.json`` after every step: a failure half-way leaves every submitted job tracked,
and the next run keeps those still queued.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.base import Job
from jobs.evaluate import EvaluateSWDJob
from jobs.filter import FilterJob
from jobs.generate import GenerateImagesJob, GenerateMasksJob
from jobs.prepare import PrepareJob
from jobs.train import TrainJob
from toolkit.atomic import write_bytes, write_json
from toolkit.cluster import slurmctl
from toolkit.cluster.executors import ClusterError, executor, load_profile
from toolkit.cluster.private import private_dir
from toolkit.cluster.sweep import Sweep
from toolkit.config import NonNegativeFloat, NonNegativeInt, PositiveInt, Threshold
from toolkit.data.prepare import PrepareConfig
from toolkit.lock import WriterLock
from toolkit.mpi import clean_environment, mpirun_prefix

log = logging.getLogger(__name__)

BRANCHES = ("full", "reduced")


@dataclass(frozen=True)
class TrainStep:
    """A training step: its YAML config and overrides (the pipeline adds the data paths)."""

    config: Path
    set: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineConfig:
    """configs/pipeline/*.yaml; relative paths are relative to the working directory."""

    out: Path
    cohort: Path
    pgan: TrainStep
    spade: TrainStep
    sweep: Path
    size: PositiveInt = 256  # a power of two ≥ 8 (checked below, before anything is written)
    workers: PositiveInt = 4
    branches: tuple[str, ...] = ("full", "reduced")
    swd_images: PositiveInt = 16384
    masks: PositiveInt = 100_000
    threshold: Threshold = 500.0  # .inf keeps every mask
    min_std: NonNegativeFloat = 0.0
    ranks: PositiveInt = 2
    sweep_set: tuple[str, ...] = ()
    profile: str = "local"
    seed: NonNegativeInt = 0

    def __post_init__(self) -> None:
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size: expected a power of two ≥ 8, got {self.size}")
        unknown = [b for b in self.branches if b not in BRANCHES]
        if unknown:
            raise ValueError(f"branches: {unknown} are not among {BRANCHES}")


@dataclass(frozen=True)
class Step:
    """One node of the pipeline: its job, its parents, how many tasks (DDP or MPI ranks) it runs and when it is
    complete."""

    name: str
    job: Job
    after: tuple[str, ...]
    done: Callable[[], bool] = field(compare=False)
    tasks: int = 1


def steps(cfg: PipelineConfig, cluster: str = "local") -> list[Step]:
    """The pipeline's steps in a valid execution order (the sweep is separate: see :func:`run_pipeline`).

    Training steps run one process per task of the profile on ``slurm`` (DDP or Horovod, as the profile says; one
    process locally); MPI steps run ``cfg.ranks`` tasks; the others one.
    """
    out = Path(cfg.out)
    store = out / "store"
    profile = load_profile(cfg.profile)
    gpus = 1 if cluster == "local" else profile.tasks_per_node
    backend = profile.training_backend(cluster)
    manifest = lambda path: (lambda: (path / "manifest.json").exists())  # noqa: E731
    result = [Step("prepare", PrepareJob(PrepareConfig(src=Path(cfg.cohort), out=store, size=cfg.size,
                                                       seed=cfg.seed, workers=cfg.workers)), (), manifest(store))]
    for b in cfg.branches:
        reduced = "true" if b == "reduced" else "false"
        pgan, spade = out / "runs" / f"pgan-{b}", out / "runs" / f"spade-{b}"
        masks, kept, synthetic = (out / "stores" / f"{kind}-{b}" for kind in ("masks", "kept", "synthetic"))
        result += [
            Step(f"pgan-{b}", TrainJob("pgan", Path(cfg.pgan.config), pgan, (
                *cfg.pgan.set, f"data.store={store}", f"data.reduced={reduced}"), backend), ("prepare",),
                 lambda d=pgan: (d / "DONE").exists(), tasks=gpus),
            Step(f"swd-{b}", EvaluateSWDJob(pgan, images=cfg.swd_images), (f"pgan-{b}",),
                 lambda d=pgan: (d / "snapshots" / "best").exists(), tasks=cfg.ranks),
            Step(f"masks-{b}", GenerateMasksJob(pgan, cfg.masks, masks, seed=cfg.seed), (f"swd-{b}",), manifest(masks)),
            Step(f"filter-{b}", FilterJob(store, masks, kept, threshold=cfg.threshold, reduced=b == "reduced",
                                          min_std=cfg.min_std),
                 (f"masks-{b}",), manifest(kept), tasks=cfg.ranks),
            Step(f"spade-{b}", TrainJob("spade", Path(cfg.spade.config), spade, (
                *cfg.spade.set, f"data.store={store}", f"data.reduced={reduced}"), backend), ("prepare",),
                 lambda d=spade: (d / "DONE").exists(), tasks=gpus),
            Step(f"images-{b}", GenerateImagesJob(spade, kept, synthetic), (f"filter-{b}", f"spade-{b}"),
                 manifest(synthetic)),
        ]
    return result


def run_pipeline(cfg: PipelineConfig, cluster: str, *, sweep_timeout: float = 24 * 3600) -> dict[str, Any]:
    """Run (local) or queue (slurm) every unfinished step and the sweep.

    Returns ``{"jobs": {step: SLURM job id, "done" (skipped) or "ran"}, "seconds": {step: wall time}}`` (seconds
    only for steps that ran here). Holds the lock of ``out/.pipeline`` throughout; a second run gets
    :class:`~toolkit.lock.LockedError` naming this one.
    """
    state = private_dir(Path(cfg.out) / ".pipeline")
    with WriterLock(state, "pipeline"):
        return _run(cfg, cluster, state, sweep_timeout)


def _run(cfg: PipelineConfig, cluster: str, state: Path, sweep_timeout: float) -> dict[str, Any]:
    out = Path(cfg.out)
    submitted: dict[str, str] = {}
    seconds: dict[str, float] = {}
    queued = _still_queued(state) if cluster == "slurm" else {}

    def track(name: str, job: str) -> None:
        """Record a step's job at once, beside the earlier run's jobs still queued (until their steps come up)."""
        submitted[name] = job
        write_json(state / "jobs.json", {**queued, **submitted})

    for step in steps(cfg, cluster):
        if step.done():
            log.info("pipeline: %s is complete, skipped", step.name)
            track(step.name, "done")
            continue
        if step.name in queued:  # a job of an earlier `pipeline run` is still pending or running: keep it
            track(step.name, queued[step.name])
            log.info("pipeline: %s is still queued as job %s", step.name, queued[step.name])
            continue
        if cluster == "local":
            log.info("pipeline: running %s", step.name)
            begin = time.perf_counter()
            _run_local(step, state)
            seconds[step.name] = time.perf_counter() - begin
            track(step.name, "ran")
            continue
        parents = [submitted[p] for p in step.after if submitted.get(p) not in (None, "done")]
        ex = executor("slurm", load_profile(cfg.profile), state / "logs" / step.name, tasks=step.tasks,
                      mpi=step.tasks > 1 and _uses_mpi(step.job), after=parents)
        track(step.name, str(ex.submit(step.job).job_id))
        log.info("pipeline: %s queued as job %s (after %s)", step.name, submitted[step.name], parents or "nothing")
    images = [submitted[f"images-{b}"] for b in cfg.branches if submitted[f"images-{b}"] not in ("done", "ran")]
    stores = {f"synthetic_{b}": str((out / "stores" / f"synthetic-{b}").resolve()) for b in cfg.branches}
    variables = {"real": str((out / "store").resolve()), "synthetic": stores[f"synthetic_{cfg.branches[0]}"], **stores}
    with Sweep.create(Path(cfg.sweep), out / "sweep", cluster, cfg.profile, tuple(cfg.sweep_set),
                      tuple(f"{k}={v}" for k, v in variables.items())) as sweep:
        begin = time.perf_counter()
        ids = sweep.resume(after=images or None, timeout=sweep_timeout)
        finished = all(row["state"] == "done" for row in sweep.status())
    if cluster == "local" and ids:
        seconds["sweep"] = time.perf_counter() - begin
    track("sweep", ",".join(ids) if ids else ("done" if finished else "queued earlier"))
    return {"jobs": submitted, "seconds": seconds}


def _still_queued(state: Path) -> dict[str, str]:
    """Steps whose job from an earlier run (``jobs.json``) SLURM still holds as pending or running.

    A controller that does not answer stops the run (ClusterError) before anything is submitted: taking its jobs for
    gone would submit them a second time.
    """
    path = state / "jobs.json"
    if not path.exists():
        return {}
    earlier = {k: v for k, v in json.loads(path.read_text()).items() if k != "sweep" and v not in ("done", "ran")}
    try:
        live = slurmctl.job_states(earlier.values()) if earlier else {}
    except RuntimeError as err:
        raise ClusterError(f"{path}: cannot tell which of these jobs are still queued ({err}); nothing submitted, "
                           "try again when the controller answers") from None
    return {name: job for name, job in earlier.items() if live.get(job) not in (None, *slurmctl.FINISHED)}


def _uses_mpi(job: Job) -> bool:
    """Whether a multi-task job's ranks find each other through MPI (``srun --mpi=pmix``); DDP trainings do not."""
    return not isinstance(job, TrainJob) or job.backend == "horovod"


def _run_local(step: Step, state: Path) -> None:
    """Run a step in this process, or on ``step.tasks`` MPI ranks under ``mpirun`` (the job pickled for them)."""
    if step.tasks <= 1 or isinstance(step.job, TrainJob):
        step.job()
        return
    path = state / f"{step.name}.pkl"
    write_bytes(path, pickle.dumps(step.job))
    os.chmod(path, 0o600)  # read back by `python -m jobs`, which takes only a file no one else may write
    command = [*mpirun_prefix(step.tasks), sys.executable, "-m", "jobs", str(path)]
    done = subprocess.run(command, env=clean_environment(), capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"pipeline step {step.name} failed under mpirun (exit {done.returncode}):\n{done.stderr}")
