"""The distributed layer: one small interface over no distribution, PyTorch DDP and Horovod.

Trainers see a :class:`Dist` object and nothing else: rank/size, the device, ``wrap`` for the model, ``optimizer``
for its optimiser, ``average_gradients`` for trainers that reduce gradients themselves (PGAN), sum-reductions
(differentiable when a loss needs global statistics, such as Dice over the global batch), ``barrier`` and ``close``.
No globals, no print patching: rank-0 guards use ``dist.is_main``. This is the only module that imports Horovod.

- **ddp**: the rendezvous comes from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
  or, under ``srun``, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR defaults to the first
  node of the job, MASTER_PORT to the step's reserved port or one derived from the job and step ids:
  :func:`slurm_master_port`). Gloo on CPU, NCCL on GPU. ``wrap`` returns a ``DistributedDataParallel`` module,
  which averages gradients during the backward pass.
- **horovod**: ``hvd.init()`` finds its peers from ``mpirun``, ``srun --mpi=pmix`` or ``horovodrun --gloo``.
  ``wrap`` broadcasts rank 0's parameters and buffers (as DDP's constructor does) and returns the module itself;
  ``optimizer`` returns an :class:`AveragingOptimizer`, whose ``step`` first averages its parameters' gradients with
  one grouped allreduce. That is Horovod's gradient allreduce without ``hvd.DistributedOptimizer``'s backward hooks:
  those refuse a module that receives gradients twice before its step, which every GAN generator step does to the
  discriminator (its gradients are computed, then zeroed before its own step). The optimiser's state dict is the
  wrapped one's, so checkpoints are the same under every backend and a run may resume under another.

Every rank loads the same checkpoint on resume, so model and optimiser states agree without a broadcast.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from toolkit.train import syncbn

log = logging.getLogger(__name__)

BACKENDS = ("none", "ddp", "horovod")


def _horovod() -> ModuleType:
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise RuntimeError(f"--dist horovod needs Horovod for PyTorch ({exc}); build and install it with "
                           "`make horovod`") from exc
    return hvd


@dataclass(frozen=True)
class Dist:
    """Where this process stands in a run: its rank among ``world_size`` processes and the device it computes on."""

    backend: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend != "none" and self.world_size > 1

    def wrap(self, model: nn.Module, *, sync_bn: bool = False) -> nn.Module:
        """The model as trained here: with global-batch BatchNorm if asked, and DDP-wrapped under DDP."""
        model = model.to(self.device)
        if not self.active:
            return model
        if sync_bn:
            # ours on every backend and device: torch's SyncBatchNorm is DDP + CUDA only and syncs the host each forward
            model = syncbn.convert(model, all_reduce=lambda t: self.all_reduce_sum(t, differentiable=True))
        if self.backend == "horovod":
            _horovod().broadcast_parameters(model.state_dict(), root_rank=0)
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        # synchronised BatchNorm keeps the buffers equal on every rank: no broadcast of them before each forward
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=not sync_bn)

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """``optimizer`` as stepped here: under Horovod, one that averages its gradients over ranks before a step."""
        return AveragingOptimizer(optimizer, self) if self.active and self.backend == "horovod" else optimizer

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Replace each parameter's gradient by its mean over ranks (for modules that are not ``wrap``-ped).

        One collective for all of them: Horovod's grouped allreduce, or under DDP one all-reduce of the gradients
        flattened into a single buffer per dtype (a collective per tensor would be latency-bound: the PGAN has ~100).
        """
        grads = [p.grad for p in params if p.grad is not None]
        if not self.active or not grads:
            return
        if self.backend == "horovod":
            name = f"grads.{len(grads)}.{sum(g.numel() for g in grads)}"
            averaged = _horovod().grouped_allreduce(grads, name=name, op=_horovod().Average)
            for grad, mean in zip(grads, averaged):
                grad.copy_(mean)
            return
        for dtype in {g.dtype for g in grads}:
            group = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in group])
            tdist.all_reduce(flat)
            flat.div_(self.world_size)
            torch._foreach_copy_(group, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in group]),
                                                                          group)])

    def all_reduce_sum(self, tensor: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """Sum ``tensor`` over ranks. The differentiable form back-propagates into every rank's contribution."""
        if not self.active:
            return tensor
        if self.backend == "horovod":
            hvd = _horovod()  # its allreduce is an autograd function whose backward sums the gradients likewise
            return hvd.allreduce(tensor if differentiable else tensor.detach(), name=_op_name("sum", tensor),
                                 op=hvd.Sum)
        if differentiable:
            from torch.distributed.nn.functional import all_reduce

            return all_reduce(tensor)
        tensor = tensor.clone()
        tdist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if not self.active:
            return
        if self.backend == "horovod":
            _horovod().barrier()
        else:
            tdist.barrier()

    def close(self) -> None:
        if self.backend == "horovod":
            _horovod().shutdown()
        elif self.active and tdist.is_initialized():
            tdist.destroy_process_group()


def _op_name(kind: str, tensor: torch.Tensor) -> str:
    """A Horovod collective's name, the same for every call on a tensor of this shape and type. Horovod caches the
    negotiation of a name it has seen; unnamed calls get a fresh name each time and evict each other from the cache.
    Calls here are synchronous, so equal names are never in flight together."""
    return f"{kind}.{str(tensor.dtype).removeprefix('torch.')}.{'x'.join(map(str, tensor.shape))}"


class AveragingOptimizer:
    """An optimiser whose ``step`` averages the gradients of its parameters over ranks, then steps the wrapped one.

    ``synchronize()`` averages ahead of the step (a loss scaler must see the averaged gradients, so that every rank
    finds the same overflow and skips the same steps); the next ``step`` then does not average again. Everything else
    (``param_groups``, ``state_dict``, ``zero_grad`` …) is the wrapped optimiser's.
    """

    # GradScaler must unscale the gradients itself and call a plain step() (not a fused optimiser's scaled step)
    _step_supports_amp_scaling = False

    def __init__(self, optimizer: torch.optim.Optimizer, dist: Dist) -> None:
        self.optimizer, self.dist = optimizer, dist
        self._synchronized = False

    def synchronize(self) -> None:
        self.dist.average_gradients(p for group in self.optimizer.param_groups for p in group["params"])
        self._synchronized = True

    def step(self) -> None:
        if not self._synchronized:
            self.synchronize()
        self._synchronized = False
        self.optimizer.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodes:
        return "127.0.0.1"
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


# MASTER_PORT under srun: PORT_BASE + (job id + PORT_STEP × step id) mod PORT_RANGE, i.e. 20000 … 32767, below
# Linux's ephemeral ports (32768 and up), which outgoing connections take.
PORT_BASE, PORT_RANGE, PORT_STEP = 20000, 12768, 797


def slurm_master_port(env: Mapping[str, str] = os.environ) -> int:
    """The rendezvous port of an srun step: every task of the step computes the same one, with no exchange before
    the process group exists.

    Where the cluster reserves ports for steps (``MpiParams=ports=LO-HI`` in slurm.conf, as the multi-node local
    cluster does), it is the first of the step's ``SLURM_STEP_RESV_PORTS``: SLURM gives the same ports to every task
    of a step and never the same to two steps running on one node at once, so those cannot collide. Otherwise it is
    derived from ``SLURM_JOB_ID`` and ``SLURM_STEP_ID``:

    Two steps running on one node at once share a port only if ``job_a − job_b ≡ 797 · (step_b − step_a)`` (mod
    12768): never two steps of one job (797 is prime to 12768), steps with equal step ids of two jobs only if the job
    ids differ by a multiple of 12768, and steps whose ids differ by 1 … 15 only if the job ids differ by at least
    797 (797 maximises that distance). A clash, or a port some other program listens on, makes rank 0 of the later
    step fail at once ("address already in use").
    """
    reserved = env.get("SLURM_STEP_RESV_PORTS", "")
    if reserved:
        return int(reserved.split(",")[0].split("-")[0])
    job = int(env.get("SLURM_JOB_ID", "0"))
    step = int(env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "0")))
    return PORT_BASE + (job + PORT_STEP * step) % PORT_RANGE


def _rendezvous() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment; sets MASTER_ADDR/PORT under SLURM."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(slurm_master_port(env)))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    raise RuntimeError("--dist ddp needs torchrun (RANK, WORLD_SIZE) or srun (SLURM_PROCID, SLURM_NTASKS) variables")


def local_device(local_rank: int) -> torch.device:
    """The GPU of the process with node-local rank ``local_rank``: ``cuda:(local_rank % visible GPUs)``.

    The modulo matters where SLURM binds one GPU per task (``--gpus-per-task``, ``--gpu-bind``, cgroup
    ConstrainDevices): every task then sees only its own GPU, as ``cuda:0``, whatever its local rank. The device becomes
    the process's current one, so libraries that allocate on "the" GPU (NCCL, cuDNN workspaces) use it too.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("a CUDA device was asked for, but torch sees none (CPU build, or no GPU in this job)")
    dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(dev)
    return dev


def pick_device(requested: str | None, local_rank: int = 0) -> torch.device:
    """A process's device: ``requested`` as named (``cpu``, ``cuda:1``); ``cuda``, or None while a GPU is visible,
    is this process's GPU by its node-local rank (:func:`local_device`); None without a GPU is the CPU."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return local_device(local_rank)
    dev = torch.device(requested)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def mpi_device(comm: Any, requested: str | None = None) -> torch.device:
    """This MPI rank's device for the MPI tools (SWD, generation): :func:`pick_device` with the rank's index among
    the ranks on its node (an MPI shared-memory split) as local rank, so ranks take distinct GPUs."""
    if requested not in (None, "cuda") or not torch.cuda.is_available():
        return pick_device(requested)
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local_device(node.Get_rank())
    finally:
        node.Free()


def init(backend: str = "none", device: str | None = None, *, timeout_s: float = 600.0) -> Dist:
    """Join the run's process group (if any) and pick this process's device (see :func:`pick_device`)."""
    if backend not in BACKENDS:
        raise ValueError(f"--dist must be one of {BACKENDS}, got {backend!r}")
    if backend == "none":
        return Dist(device=pick_device(device))
    if backend == "horovod":
        hvd = _horovod()
        hvd.init()
        rank, world_size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
        dev = pick_device(device, local_rank)
    else:
        rank, world_size, local_rank = _rendezvous()
        dev = pick_device(device, local_rank)
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=rank,
                                 world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("%s: rank %d/%d on %s", backend, rank, world_size, dev)
    return Dist(backend=backend, rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
