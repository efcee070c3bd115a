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
mpirun, submitit logs, ``jobs.json`` with the job ids).
"""

from __future__ import annotations

import json
import logging
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
from toolkit.cluster.executors import executor, load_profile
from toolkit.cluster.sweep import Sweep
from toolkit.data.prepare import PrepareConfig
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
    size: int = 256
    workers: int = 4
    branches: tuple[str, ...] = ("full", "reduced")
    swd_images: int = 16384
    masks: int = 100_000
    threshold: float = 500.0
    min_std: float = 0.0
    ranks: int = 2
    sweep_set: tuple[str, ...] = ()
    profile: str = "local"
    seed: int = 0


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
    for branch in cfg.branches:
        if branch not in BRANCHES:
            raise ValueError(f"branches: {branch!r} is not one of {BRANCHES}")
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
    only for steps that ran here).
    """
    out = Path(cfg.out)
    state = out / ".pipeline"
    state.mkdir(parents=True, exist_ok=True)
    submitted: dict[str, str] = {}
    seconds: dict[str, float] = {}
    queued = _still_queued(state) if cluster == "slurm" else {}
    for step in steps(cfg, cluster):
        if step.done():
            log.info("pipeline: %s is complete, skipped", step.name)
            submitted[step.name] = "done"
            continue
        if step.name in queued:  # a job of an earlier `pipeline run` is still pending or running: keep it
            submitted[step.name] = queued[step.name]
            log.info("pipeline: %s is still queued as job %s", step.name, queued[step.name])
            continue
        if cluster == "local":
            log.info("pipeline: running %s", step.name)
            begin = time.perf_counter()
            _run_local(step, state)
            seconds[step.name] = time.perf_counter() - begin
            submitted[step.name] = "ran"
            continue
        parents = [submitted[p] for p in step.after if submitted.get(p) not in (None, "done")]
        ex = executor("slurm", load_profile(cfg.profile), state / "logs" / step.name, tasks=step.tasks,
                      mpi=step.tasks > 1 and _uses_mpi(step.job), after=parents)
        submitted[step.name] = str(ex.submit(step.job).job_id)
        log.info("pipeline: %s queued as job %s (after %s)", step.name, submitted[step.name], parents or "nothing")
    images = [submitted[f"images-{b}"] for b in cfg.branches if submitted[f"images-{b}"] not in ("done", "ran")]
    stores = {f"synthetic_{b}": str((out / "stores" / f"synthetic-{b}").resolve()) for b in cfg.branches}
    variables = {"real": str((out / "store").resolve()), "synthetic": stores[f"synthetic_{cfg.branches[0]}"], **stores}
    sweep = Sweep.create(Path(cfg.sweep), out / "sweep", cluster, cfg.profile, tuple(cfg.sweep_set),
                         tuple(f"{k}={v}" for k, v in variables.items()))
    pending = [row["name"] for row in sweep.status() if row["state"] in ("not started", "preempted", "failed")]
    begin = time.perf_counter()
    ids = sweep.submit(pending, after=images or None, timeout=sweep_timeout) if pending else []
    if cluster == "local" and ids:
        seconds["sweep"] = time.perf_counter() - begin
    submitted["sweep"] = ",".join(ids) if ids else ("done" if not pending and all(
        row["state"] == "done" for row in sweep.status()) else "queued earlier")
    write_json(state / "jobs.json", submitted)
    return {"jobs": submitted, "seconds": seconds}


def _still_queued(state: Path) -> dict[str, str]:
    """Steps whose job from an earlier run (``jobs.json``) SLURM still holds as pending or running."""
    path = state / "jobs.json"
    if not path.exists():
        return {}
    earlier = {k: v for k, v in json.loads(path.read_text()).items() if k != "sweep" and v not in ("done", "ran")}
    live = slurmctl.job_states(earlier.values()) if earlier else {}
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
    command = [*mpirun_prefix(step.tasks), sys.executable, "-m", "jobs", str(path)]
    done = subprocess.run(command, env=clean_environment(), capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"pipeline step {step.name} failed under mpirun (exit {done.returncode}):\n{done.stderr}")
