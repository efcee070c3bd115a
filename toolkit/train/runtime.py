"""How a run uses its device: the ``runtime:`` section every trainer shares, and what it turns on.

Everything here is off on the CPU unless asked for, so CPU runs stay bit-identical; on CUDA the defaults are the fast
ones: the precision policy (:mod:`toolkit.train.precision`), cuDNN autotuning for the fixed shapes of a training
run, fused Adam, channels_last, and optionally ``torch.compile`` (``runtime.compile``: ``none``, ``default``,
``reduce-overhead`` = CUDA graphs, for small launch-bound batches, or ``max-autotune``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from toolkit.config import PositiveFloat, PositiveInt

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class RuntimeConfig:
    """Device and speed options of a run."""

    device: str | None = None  # None: a GPU when there is one (cuda:<local rank mod visible GPUs>), else the CPU
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool | None = None  # None: on for CUDA, off on the CPU
    compile: Literal["none", "default", "reduce-overhead", "max-autotune"] = "none"
    sync_bn: bool = True
    threads: PositiveInt | None = None  # None: torch's default
    # --dist ddp: how long a collective (and the rendezvous) waits for a silent peer, e.g. a rank on a lost node,
    # before this rank fails instead of hanging
    collective_timeout_s: PositiveFloat = 600.0

    def memory_format(self, device: torch.device) -> torch.memory_format:
        """channels_last where asked (default: on CUDA, where cuDNN's tensor-core kernels want NHWC)."""
        wanted = device.type == "cuda" if self.channels_last is None else self.channels_last
        return torch.channels_last if wanted else torch.contiguous_format


def prepare_device(device: torch.device) -> None:
    """Process-wide switches for training on ``device``: cuDNN autotuning (fixed shapes, so it pays once)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def compiled(fn: Callable, mode: str) -> Callable:
    """``fn`` under ``torch.compile`` in ``mode``, or ``fn`` itself for ``none``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"runtime.compile must be one of {COMPILE_MODES}, got {mode!r}")
    return fn if mode == "none" else torch.compile(fn, mode=None if mode == "default" else mode)


def adam(params: Iterable[nn.Parameter], device: torch.device, **options: object) -> torch.optim.Adam:
    """Adam as a run on ``device`` steps it: one fused kernel on CUDA (a launch per tensor otherwise), torch's
    default implementation on the CPU (unchanged, so CPU runs stay bit-identical)."""
    return torch.optim.Adam(params, fused=True if device.type == "cuda" else None, **options)
