"""The distributed layer: one small interface over no distribution and PyTorch DDP (Horovod plugs in here later).

Trainers see a :class:`Dist` object and nothing else: rank/size, the device, ``wrap`` for the model, sum-reductions
(differentiable when a loss needs global statistics, such as Dice over the global batch), ``barrier`` and ``close``.
No globals, no print patching: rank-0 guards use ``dist.is_main``.

DDP reads its rendezvous from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, under
``srun``, from SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR defaults to the first node of the job,
MASTER_PORT to a port derived from the job id). Gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist
from torch import nn

from toolkit.train import syncbn

log = logging.getLogger(__name__)

BACKENDS = ("none", "ddp")


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
        """The model as trained here: DDP-wrapped (optionally with synchronised BatchNorm) when distributed."""
        model = model.to(self.device)
        if not self.active:
            return model
        if sync_bn:
            # torch's SyncBatchNorm is CUDA-only; on CPU (gloo) our all-reduce version does the same job
            cuda = self.device.type == "cuda"
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if cuda else syncbn.convert(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def all_reduce_sum(self, tensor: torch.Tensor, *, differentiable: bool = False) -> torch.Tensor:
        """Sum ``tensor`` over ranks. The differentiable form back-propagates into every rank's contribution."""
        if not self.active:
            return tensor
        if differentiable:
            from torch.distributed.nn.functional import all_reduce

            return all_reduce(tensor)
        tensor = tensor.clone()
        tdist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def close(self) -> None:
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()


def _slurm_master_addr() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodes:
        return "127.0.0.1"
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True)
    return hosts.stdout.split()[0]


def _rendezvous() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's or SLURM's environment; sets MASTER_ADDR/PORT under SLURM."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    raise RuntimeError("--dist ddp needs torchrun (RANK, WORLD_SIZE) or srun (SLURM_PROCID, SLURM_NTASKS) variables")


def init(backend: str = "none", device: str | None = None, *, timeout_s: float = 600.0) -> Dist:
    """Join the run's process group (if any) and pick this process's device (cuda:<local rank> when available)."""
    if backend not in BACKENDS:
        raise ValueError(f"--dist must be one of {BACKENDS}, got {backend!r}")
    want_cuda = device == "cuda" or (device is None and torch.cuda.is_available())
    if backend == "none":
        return Dist(device=torch.device("cuda" if want_cuda else (device or "cpu")))
    rank, world_size, local_rank = _rendezvous()
    dev = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://", rank=rank,
                             world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("ddp: rank %d/%d on %s", rank, world_size, dev)
    return Dist(backend=backend, rank=rank, world_size=world_size, local_rank=local_rank, device=dev)
