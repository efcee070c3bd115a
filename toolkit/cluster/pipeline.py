"""`tumorsynth pipeline run CONFIG --cluster local|slurm`: the whole data flow (DESIGN §2) as dependent jobs.

Per branch (``full`` trains the generators on the whole real training split, ``reduced`` on its first 20 %, and
every reduced step reads only that prefix: the PGAN and SPADE through ``data.reduced``, the SWD evaluation and the
filter through their ``reduced`` option):

    prepare → pgan → swd (MPI) → masks → filter(s) (MPI) ┐
            └──────────────→ spade ──────────────────────┴→ images ─→ sweep (all branches) → report

The sweep file's variables ``real``, ``synthetic_full``, ``synthetic_reduced`` (and ``synthetic``, the first
branch's store) are set to the pipeline's stores. On ``slurm`` every step is a job that waits for its parents
(``--dependency=afterok``), MPI steps run their ranks under ``srun --mpi=pmix``, and the sweep is one job array; the
call returns once everything is queued (a job whose parent fails is cancelled, not left waiting). On ``local`` the
steps run here (:func:`schedule`): a step starts once its parents have finished and enough of ``parallel`` slots
(cores) are free, taking one per process (an MPI step its ranks, a training one; a step with more ranks than
``parallel`` runs alone); steps ready at once start in the order of :func:`steps`. With ``parallel: 1`` they run one
after another in that order, trainings in this process, MPI steps under ``mpirun``; with more, every step runs in
its own ``python -m jobs`` process (under ``mpirun`` for MPI steps), its output in ``.pipeline/logs/<step>.log``.
A failed step stops new starts; the steps still running finish (their outputs stay valid), then the run raises.
Each step, and the sweep, logs a line when it starts and one when it ends, with the time since the run started and,
given ``estimates``, about how long the rest will take. Either way a step whose output is complete is skipped (and on
``slurm`` one whose job from an earlier run is still queued keeps that job), so running a pipeline again resumes it;
the jobs themselves resume from their checkpoints and finished shards. ``tumorsynth pipeline plan``
(:mod:`toolkit.cluster.plan`) shows what a run would do, without running or submitting anything. Everything lives
under ``out``: ``store/``,
``runs/{pgan,spade}-<b>/``, ``stores/{masks,kept,synthetic}-<b>/``, ``sweep/`` and ``.pipeline/`` (pickled jobs for
``python -m jobs``, step and submitit logs, ``jobs.json`` with the job ids). ``.pipeline/`` is private (0700,
owner-checked: it holds pickles, which run as code). A run holds its lock throughout, so a second run of the same
pipeline stops at once naming the first, and rewrites ``jobs.json`` after every step: a failure half-way leaves every
submitted job tracked, and the next run keeps those still queued.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
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
from toolkit.config import Decay, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Threshold
from toolkit.data.prepare import PrepareConfig
from toolkit.lock import WriterLock
from toolkit.mpi import clean_environment, mpirun_prefix

log = logging.getLogger(__name__)

BRANCHES = ("full", "reduced")
FILTERS = ("zscore", "dscore")


PIPELINE_KEYS = ("data.store", "data.reduced")  # what the pipeline sets in every training config itself


@dataclass(frozen=True)
class TrainStep:
    """A training step: its YAML config, overrides for every branch (``set``) and for one branch only (``branches``:
    branch → overrides, applied after ``set``; e.g. ``{reduced: [loop.epochs=250]}``). The pipeline then adds the data
    paths (:data:`PIPELINE_KEYS`), which a branch's overrides may therefore not name."""

    config: Path
    set: tuple[str, ...] = ()
    branches: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [b for b in self.branches if b not in BRANCHES]
        if unknown:
            raise ValueError(f"branches: {unknown} are not among {BRANCHES}")
        for branch, overrides in self.branches.items():
            for item in overrides:
                key, sep, _ = item.partition("=")
                if not sep or not key.strip():
                    raise ValueError(f"branches.{branch}: expected key.path=value, got {item!r}")
                if key.strip() in PIPELINE_KEYS:
                    raise ValueError(f"branches.{branch}: {key.strip()} is set by the pipeline itself")

    def overrides(self, branch: str, store: Path) -> tuple[str, ...]:
        """The ``--set`` overrides of this step in ``branch``: ``set``, the branch's own, then the pipeline's data."""
        reduced = "true" if branch == "reduced" else "false"
        return (*self.set, *self.branches.get(branch, ()), f"data.store={store}", f"data.reduced={reduced}")


@dataclass(frozen=True)
class PipelineConfig:
    """configs/pipeline/*.yaml; relative paths are relative to the working directory.

    ``parallel`` (local only; SLURM ignores it): how many cores the local steps may use at once, one per process of
    a step. ``estimates``: expected seconds per step name (e.g. measured on a reference machine), ``sweep`` for the
    sweep and optionally ``total`` for the whole run's wall time (else their sum): the progress lines' "about m:ss
    left". ``subjects``: which subjects of ``cohort`` the ``prepare`` step ingests, a glob of their folder under it
    (``HGG/*``: BraTS 2018's 210 high-grade subjects) or of their names; None ingests them all. ``modality``: the
    store's image channels (prepare's ``--modality``: ``t1ce``, the paper's, or several, e.g. ``t1ce,flair``; SPADE's
    ``model.out_channels`` must then match). ``filter``: the filter
    stages in the order they run (:func:`filter_steps`): ``zscore`` (``threshold``, ``min_std``) and/or ``dscore``
    (the PGAN discriminator's score, threshold ``dscore_threshold`` if given, e.g. what ``filter dscore --calibrate``
    suggested, else the ``dscore_quantile`` of the real validation masks' scores).
    """

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
    filter: tuple[str, ...] = ("zscore",)  # the filter stages, in order: zscore, dscore or both
    threshold: Threshold = 500.0  # the z-score filter's; .inf keeps every mask
    min_std: NonNegativeFloat = 0.0
    dscore_quantile: Decay = 0.01  # the D-score filter drops masks scoring below this quantile of real ones
    dscore_threshold: float | None = None  # ... or below this score (None: the quantile rule)
    ranks: PositiveInt = 2
    sweep_set: tuple[str, ...] = ()
    sweep_with: tuple[str, ...] = ()  # the sweep file's extras groups to add (e.g. augmentation)
    profile: str = "local"
    seed: NonNegativeInt = 0
    parallel: PositiveInt = 1
    estimates: tuple[tuple[str, PositiveFloat], ...] = ()
    subjects: str | None = None
    modality: str = "t1ce"
    intensity: str = "raw"  # prepare's --intensity: raw (the paper) or volume (each volume to a brain median of 1000)

    def __post_init__(self) -> None:
        if self.subjects is not None and not self.subjects.strip():
            raise ValueError("subjects: expected a non-empty glob (e.g. HGG/*) or null for every subject")
        if self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size: expected a power of two ≥ 8, got {self.size}")
        unknown = [b for b in self.branches if b not in BRANCHES]
        if unknown:
            raise ValueError(f"branches: {unknown} are not among {BRANCHES}")
        if not self.filter or len(set(self.filter)) < len(self.filter) or set(self.filter) - set(FILTERS):
            raise ValueError(f"filter: expected distinct stages among {FILTERS}, got {list(self.filter)}")
        if self.dscore_threshold is not None and not math.isfinite(self.dscore_threshold):
            raise ValueError(f"dscore_threshold: expected a finite score or null, got {self.dscore_threshold}")


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
    result = [Step("prepare", PrepareJob(prepare_config(cfg, store)), (), manifest(store))]
    for b in cfg.branches:
        _check_spade_channels(cfg, b, store)
        pgan, spade = out / "runs" / f"pgan-{b}", out / "runs" / f"spade-{b}"
        masks, kept, synthetic = (out / "stores" / f"{kind}-{b}" for kind in ("masks", "kept", "synthetic"))
        result += [
            Step(f"pgan-{b}", TrainJob("pgan", Path(cfg.pgan.config), pgan, cfg.pgan.overrides(b, store), backend),
                 ("prepare",), lambda d=pgan: (d / "DONE").exists(), tasks=gpus),
            Step(f"swd-{b}", EvaluateSWDJob(pgan, images=cfg.swd_images, reduced=b == "reduced"), (f"pgan-{b}",),
                 lambda d=pgan: (d / "snapshots" / "best").exists(), tasks=cfg.ranks),
            Step(f"masks-{b}", GenerateMasksJob(pgan, cfg.masks, masks, seed=cfg.seed), (f"swd-{b}",), manifest(masks)),
            *filter_steps(cfg, b, store, masks, kept),
            Step(f"spade-{b}", TrainJob("spade", Path(cfg.spade.config), spade, cfg.spade.overrides(b, store),
                                        backend), ("prepare",), lambda d=spade: (d / "DONE").exists(), tasks=gpus),
            Step(f"images-{b}", GenerateImagesJob(spade, kept, synthetic), (f"filter-{b}", f"spade-{b}"),
                 manifest(synthetic)),
        ]
    return result


def _check_spade_channels(cfg: PipelineConfig, branch: str, store: Path) -> None:
    """Refuse, before anything runs or is queued, a SPADE config whose ``model.out_channels`` is not the number of
    modalities the pipeline's store will hold (SPADE itself would only fail once the store exists)."""
    from toolkit import config as configs
    from toolkit.train.spade import SPADERunConfig

    channels = len(prepare_config(cfg, store).modalities)
    model = configs.load(SPADERunConfig, Path(cfg.spade.config), cfg.spade.overrides(branch, store)).model
    if model.out_channels != channels:
        raise ValueError(f"{cfg.spade.config}: model.out_channels is {model.out_channels}, but the pipeline's "
                         f"modality {cfg.modality!r} gives the store {channels} image channels: set "
                         f"model.out_channels: {channels}")


def filter_steps(cfg: PipelineConfig, branch: str, store: Path, masks: Path, kept: Path) -> list[Step]:
    """The filter stages of ``branch``, each reading the store the one before kept: all but the last are
    ``filter-<name>-<branch>`` writing ``stores/<name>-<branch>``; the last is ``filter-<branch>`` writing ``kept``."""
    result, source, after = [], masks, f"masks-{branch}"
    for k, name in enumerate(cfg.filter):
        last = k == len(cfg.filter) - 1
        out = kept if last else kept.parent / f"{name}-{branch}"
        step = f"filter-{branch}" if last else f"filter-{name}-{branch}"
        job = FilterJob(store, source, out, method=name,
                        threshold=cfg.threshold if name == "zscore" else cfg.dscore_threshold,
                        reduced=branch == "reduced", min_std=cfg.min_std, real_quantile=cfg.dscore_quantile)
        result.append(Step(step, job, (after,), lambda d=out: (d / "manifest.json").exists(), tasks=cfg.ranks))
        source, after = out, step
    return result


def prepare_config(cfg: PipelineConfig, store: Path) -> PrepareConfig:
    """The ``prepare`` step's options: the cohort into ``store`` at the pipeline's size, seed and workers, and only
    the subjects ``cfg.subjects`` selects (prepare's ``include``, given only when set)."""
    selection = {"include": (cfg.subjects,)} if cfg.subjects is not None else {}
    return PrepareConfig(src=Path(cfg.cohort), out=store, size=cfg.size, seed=cfg.seed, workers=cfg.workers,
                         modality=cfg.modality, intensity=cfg.intensity, **selection)


def sweep_variables(cfg: PipelineConfig) -> dict[str, str]:
    """The sweep file's variables: ``real``, ``synthetic_<branch>`` and ``synthetic`` (the first branch's store)."""
    out = Path(cfg.out)
    stores = {f"synthetic_{b}": str((out / "stores" / f"synthetic-{b}").resolve()) for b in cfg.branches}
    return {"real": str((out / "store").resolve()), "synthetic": stores[f"synthetic_{cfg.branches[0]}"], **stores}


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
    plan = steps(cfg, cluster)
    progress = Progress([*(step.name for step in plan), "sweep"], cfg.estimates)
    local = cluster == "local"
    todo: list[Step] = []

    def track(name: str, job: str) -> None:
        """Record a step's job at once, beside the earlier run's jobs still queued (until their steps come up)."""
        submitted[name] = job
        write_json(state / "jobs.json", {**queued, **submitted})

    def ran(name: str, taken: float) -> None:
        seconds[name] = taken
        track(name, "ran")

    for step in plan:
        if step.done():
            progress.skipped(step.name)
            track(step.name, "done")
            continue
        if step.name in queued:  # a job of an earlier `pipeline run` is still pending or running: keep it
            track(step.name, queued[step.name])
            log.info("pipeline: %s is still queued as job %s", step.name, queued[step.name])
            continue
        if local:
            todo.append(step)
            continue
        parents = [submitted[p] for p in step.after if submitted.get(p) not in (None, "done")]
        ex = executor("slurm", load_profile(cfg.profile), state / "logs" / step.name, tasks=step.tasks,
                      mpi=step.tasks > 1 and _uses_mpi(step.job), after=parents)
        track(step.name, str(ex.submit(step.job).job_id))
        log.info("pipeline: %s queued as job %s (after %s)", step.name, submitted[step.name], parents or "nothing")
    schedule(todo, cfg.parallel, state, progress=progress, finished=ran)
    images = [submitted[f"images-{b}"] for b in cfg.branches if submitted[f"images-{b}"] not in ("done", "ran")]
    variables = sweep_variables(cfg)
    if local:
        progress.started("sweep")
    with Sweep.create(Path(cfg.sweep), out / "sweep", cluster, cfg.profile, tuple(cfg.sweep_set),
                      tuple(f"{k}={v}" for k, v in variables.items()), tuple(cfg.sweep_with)) as sweep:
        begin = time.perf_counter()
        ids = sweep.resume(after=images or None, timeout=sweep_timeout)
        finished = all(row["state"] == "done" for row in sweep.status())
    if local:
        taken = time.perf_counter() - begin
        progress.done("sweep", taken)
        if ids:
            seconds["sweep"] = taken
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


class Progress:
    """The progress lines of a run (INFO): ``pipeline [k/n] NAME: started (elapsed m:ss)`` and ``… done in m:ss
    (elapsed m:ss; about m:ss left)``, k the step's place among the run's n names, elapsed since this object was made.

    What is left: the expected wall time of the whole run (the ``total`` estimate, which accounts for steps that run
    side by side, else the sum over the names) less the estimates of steps skipped as complete, scaled by how long
    the steps that ran took against their estimates so far (1 before any has), minus the time elapsed; 0 once every
    step is done, left out without estimates.
    """

    def __init__(self, names: Sequence[str], estimates: Sequence[tuple[str, float]] = (),
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.names = list(names)
        self.expected = dict(estimates)
        self.clock = clock
        self.begin = clock()
        self.finished: dict[str, float | None] = {}  # name → seconds it ran, None if skipped as complete

    def started(self, name: str) -> None:
        log.info("%s: started (elapsed %s)", self._tag(name), _clock(self.clock() - self.begin))

    def skipped(self, name: str) -> None:
        self.finished[name] = None
        log.info("%s: complete, skipped", self._tag(name))

    def done(self, name: str, seconds: float) -> None:
        self.finished[name] = seconds
        left = self.left()
        log.info("%s: done in %s (elapsed %s%s)", self._tag(name), _clock(seconds),
                 _clock(self.clock() - self.begin), "" if left is None else f"; about {_clock(left)} left")

    def failed(self, name: str, seconds: float) -> None:
        log.error("%s: failed after %s (elapsed %s)", self._tag(name), _clock(seconds),
                  _clock(self.clock() - self.begin))

    def left(self) -> float | None:
        """Seconds the run is expected to take still (see the class), or None without estimates."""
        if not self.expected:
            return None
        if all(name in self.finished for name in self.names):
            return 0.0
        ran = [name for name, seconds in self.finished.items() if seconds is not None and name in self.expected]
        expected_ran = sum(self.expected[name] for name in ran)
        ratio = sum(self.finished[name] or 0.0 for name in ran) / expected_ran if expected_ran > 0 else 1.0
        skipped = sum(self.expected.get(name, 0.0) for name, seconds in self.finished.items() if seconds is None)
        total = self.expected.get("total", sum(self.expected.get(name, 0.0) for name in self.names))
        return max(0.0, ratio * (total - skipped) - (self.clock() - self.begin))

    def _tag(self, name: str) -> str:
        return f"pipeline [{self.names.index(name) + 1}/{len(self.names)}] {name}"


def _clock(seconds: float) -> str:
    """``m:ss`` (minutes beyond an hour stay minutes: 75:00)."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}:{rest:02d}"


def schedule(todo: Sequence[Step], parallel: int, state: Path, *, progress: Progress | None = None,
             finished: Callable[[str, float], None] = lambda name, seconds: None) -> None:
    """Run the steps ``todo`` here (see the module docstring), their pickles and logs in ``state``.

    A step starts once none of its parents (``after``) is among the unfinished steps of ``todo`` and enough of the
    ``parallel`` slots are free: one per process, all of them for a step with more; of the steps ready at once, the
    earlier in ``todo`` starts first. ``finished(name, seconds)`` is called in this thread as each step completes.
    With ``parallel`` 1 a step runs in this thread (trainings need the main thread for their signal handlers); with
    more, each in its own process, waited for by a thread of a pool. After a failure no step starts; the running
    ones finish, then the first failure is raised.
    """
    progress = progress or Progress([step.name for step in todo])
    waiting, unfinished = list(todo), {step.name for step in todo}
    running: dict[Future[None], tuple[Step, float]] = {}
    failure: BaseException | None = None
    free = parallel
    slots = lambda step: min(_ranks(step), parallel)  # noqa: E731
    with ThreadPoolExecutor(parallel, "pipeline-step") if parallel > 1 else _InThisThread() as pool:
        while running or (waiting and failure is None):
            for step in list(waiting) if failure is None else []:
                if slots(step) <= free and unfinished.isdisjoint(step.after):
                    waiting.remove(step)
                    free -= slots(step)
                    progress.started(step.name)
                    running[pool.submit(_run_local, step, state, parallel > 1)] = (step, time.perf_counter())
            if not running:
                raise ValueError(f"pipeline: {[s.name for s in waiting]} wait for parents that never finish")
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                step, begin = running.pop(future)
                free += slots(step)
                taken = time.perf_counter() - begin
                if future.exception() is None:
                    unfinished.discard(step.name)
                    progress.done(step.name, taken)
                    finished(step.name, taken)
                else:
                    progress.failed(step.name, taken)
                    failure = failure or future.exception()
    if failure is not None:
        raise failure


class _InThisThread(Executor):
    """An executor that runs each call at once, in the calling thread (``parallel`` 1: today's in-process steps)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed on like a pool's; the scheduler raises it once nothing runs
            future.set_exception(exc)
        return future


def _ranks(step: Step) -> int:
    """How many processes a step runs here: a training one (DDP needs SLURM's tasks), others ``step.tasks``."""
    return 1 if isinstance(step.job, TrainJob) else step.tasks


def _run_local(step: Step, state: Path, isolated: bool) -> None:
    """Run a step in this process, or (``isolated`` or MPI) as ``python -m jobs`` on its pickle, under ``mpirun`` for
    more than one rank, its output in ``state/logs/<step>.log``; a failure names the step, its exit and its log."""
    ranks = _ranks(step)
    if ranks == 1 and not isolated:
        step.job()
        return
    path = state / f"{step.name}.pkl"
    write_bytes(path, pickle.dumps(step.job))
    os.chmod(path, 0o600)  # read back by `python -m jobs`, which takes only a file no one else may write
    command = [*(mpirun_prefix(ranks) if ranks > 1 else []), sys.executable, "-m", "jobs", str(path)]
    logs = state / "logs"
    logs.mkdir(exist_ok=True)
    output = logs / f"{step.name}.log"
    with open(output, "w") as handle:
        code = subprocess.run(command, env=clean_environment(), stdin=subprocess.DEVNULL, stdout=handle,
                              stderr=subprocess.STDOUT, check=False).returncode
    if code:
        tail = "\n".join(output.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"pipeline step {step.name} failed (exit {code}); the end of its log {output}:\n{tail}")
