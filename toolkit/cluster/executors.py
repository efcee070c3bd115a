"""Cluster profiles (slurm/profiles/*.yaml) and the submitit executors built from them.

A profile names what a job gets on one cluster: partition, GPUs and tasks per node, CPUs, memory, time limit, how long
before the limit SLURM sends USR2 (the loop then checkpoints and the job requeues), array parallelism, extra sbatch
parameters, setup lines and the distributed backend of multi-task trainings (``dist: ddp|horovod``).
``--cluster slurm`` submits through submitit's SLURM executor; ``--cluster local`` runs the same job objects as local
subprocesses (submitit's local executor), without SLURM. Multi-task MPI jobs (and Horovod trainings) run their tasks
with ``srun --mpi=pmix``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import submitit

from toolkit import config as configs
from toolkit.cluster import slurmctl
from toolkit.cluster.private import private_dir

log = logging.getLogger(__name__)

PROFILES = Path(__file__).resolve().parents[2] / "slurm" / "profiles"


class ClusterError(RuntimeError):
    """The cluster cannot take jobs (no SLURM commands, or no controller answering)."""
CLUSTERS = ("local", "slurm")


@dataclass(frozen=True)
class Profile:
    """What one job asks of a cluster (maps onto submitit's ``update_parameters``)."""

    name: str
    partition: str | None = None
    constraint: str | None = None
    gpus_per_node: configs.NonNegativeInt = 0
    tasks_per_node: configs.PositiveInt = 1
    nodes: configs.PositiveInt = 1
    cpus_per_task: configs.PositiveInt = 1
    mem_gb: configs.PositiveFloat = 4.0
    timeout_min: configs.PositiveInt = 60
    signal_delay_s: configs.NonNegativeInt = 120
    array_parallelism: configs.PositiveInt = 8
    additional: dict[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    dist: str = "ddp"  # backend of multi-task trainings: ddp (torch's rendezvous) or horovod (srun --mpi=pmix)

    def __post_init__(self) -> None:
        if self.dist not in ("ddp", "horovod"):
            raise ValueError(f"profile {self.name}: dist must be ddp or horovod, got {self.dist!r}")

    def training_backend(self, cluster: str) -> str:
        """The ``--dist`` of a training job: one process locally or with one task, else this profile's backend."""
        return self.dist if cluster == "slurm" and self.tasks_per_node * self.nodes > 1 else "none"


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (``slurm/profiles/<name>.yaml``) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILES / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise FileNotFoundError(f"{path}: no such profile (known: {known})")
    return configs.load(Profile, path)


def executor(cluster: str, profile: Profile, folder: Path, *, tasks: int | None = None, mpi: bool = False,
             after: list[str] | None = None) -> submitit.Executor:
    """A submitit executor for ``cluster`` with ``profile``'s resources, logging to ``folder``.

    ``tasks`` overrides the profile's tasks per node (e.g. 2 MPI ranks for a filter job); ``mpi`` launches the tasks
    with ``srun --mpi=pmix`` so that mpi4py's COMM_WORLD spans them; ``after`` (SLURM job ids) makes the jobs wait for
    those to complete successfully (``--dependency=afterok:…``). ``folder`` holds the pickled jobs: it is made
    private (0700), and an existing one that others could have written is refused (:func:`private_dir`).
    """
    if cluster not in CLUSTERS:
        raise ValueError(f"--cluster must be one of {CLUSTERS}, got {cluster!r}")
    if cluster == "slurm" and not slurmctl.available():
        raise ClusterError("--cluster slurm: no SLURM controller answers `scontrol ping` (is SLURM_CONF set? for the "
                           "local test cluster: slurm/local/start.sh, then source /tmp/tumorsynth-slurm/env.sh)")
    if tasks is not None:
        profile = replace(profile, tasks_per_node=tasks)
    ex = submitit.AutoExecutor(folder=private_dir(folder), cluster=cluster)
    params: dict[str, Any] = {"timeout_min": profile.timeout_min, "tasks_per_node": profile.tasks_per_node,
                              "cpus_per_task": profile.cpus_per_task, "nodes": profile.nodes,
                              "gpus_per_node": profile.gpus_per_node, "mem_gb": profile.mem_gb,
                              "name": f"tumorsynth-{folder.name}"}
    if cluster == "slurm":
        additional = dict(profile.additional)
        if profile.constraint:
            additional["constraint"] = profile.constraint
        if after:
            additional["dependency"] = "afterok:" + ":".join(after)
            additional["kill-on-invalid-dep"] = "yes"  # a failed parent cancels the job instead of leaving it queued
        params.update(slurm_signal_delay_s=profile.signal_delay_s, slurm_array_parallelism=profile.array_parallelism,
                      slurm_additional_parameters=additional, slurm_setup=list(profile.setup))
        if profile.partition:
            params["slurm_partition"] = profile.partition
        if mpi:
            params["slurm_srun_args"] = ["--mpi=pmix"]
    ex.update_parameters(**params)
    log.debug("%s executor (%s): %s", cluster, profile.name, params)
    return ex
