"""The precision policy: which floating-point format a step computes in, chosen from the device (``runtime.precision``).

- ``fp32``: no autocast. The fidelity setting and what the CPU uses. On CUDA, convolutions and matmuls may use TF32
  tensor cores (PyTorch's default for cuDNN convolutions; enabled here for matmuls too), as every Ampere+ trainer does.
- ``bf16``: autocast to bfloat16. Fast only where the GPU has bf16 tensor cores (compute capability ≥ 8.0: A100,
  H100, H200, RTX 30xx/40xx); same exponent range as fp32, so no loss scaling.
- ``fp16``: autocast to float16 with a :class:`torch.amp.GradScaler` (its state is part of the checkpoint): the fast
  path on Volta and Turing (V100, 2080 Ti), whose tensor cores have no bf16.
- ``auto``: bf16 where ``torch.cuda.is_bf16_supported()`` and capability ≥ 8.0, fp16 on 7.x, fp32 below (GTX 1080 has
  no fp16 tensor cores either) and on the CPU.

Normalisation statistics, spectral norm's power iteration and gradient penalties stay fp32 whatever the policy (their
modules say how). :class:`Precision` owns the autocast context and the loss-scaled backward/step, so trainers never
branch on the format.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def auto_precision(device: torch.device) -> str:
    """The fast format of ``device`` (see the module docstring)."""
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8 and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp16" if major >= 7 else "fp32"


def resolve(requested: str, device: torch.device, *, allow_fp16: bool = True) -> str:
    """The format a run computes in: ``requested`` (``runtime.precision``) made concrete for ``device``.

    ``allow_fp16=False`` is for trainers whose loss cannot be loss-scaled simply (the PGAN's gradient penalty is a
    gradient of a gradient): they train in fp32 where ``auto`` would choose fp16.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"runtime.precision must be one of {PRECISIONS}, got {requested!r}")
    chosen = auto_precision(device) if requested == "auto" else requested
    if chosen == "fp16" and device.type != "cuda":
        raise ValueError(f"runtime.precision: fp16 needs a CUDA device (this run is on {device})")
    if chosen == "fp16" and not allow_fp16:
        if requested == "fp16":
            raise ValueError("runtime.precision: fp16 is not supported by this trainer; use bf16 or fp32")
        chosen = "fp32"
    if chosen == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        log.warning("runtime.precision bf16 on %s (compute capability < 8.0): no bf16 tensor cores, this is slow; "
                    "auto would choose fp16", torch.cuda.get_device_name(device))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return chosen


@dataclass
class Precision:
    """Autocast and loss scaling for one run on one device."""

    name: str
    device: torch.device

    def __post_init__(self) -> None:
        self.dtype = _DTYPES[self.name]
        # GradScaler(enabled=False) is a pass-through, so fp32/bf16 steps go through the same calls
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.name == "fp16")

    @classmethod
    def for_device(cls, requested: str, device: torch.device, *, allow_fp16: bool = True) -> Precision:
        return cls(resolve(requested, device, allow_fp16=allow_fp16), device)

    @property
    def mixed(self) -> bool:
        return self.name != "fp32"

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass's context: autocast to the run's format, nothing at all for fp32."""
        if not self.mixed:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.dtype):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, loss-scaled under fp16."""
        self.scaler.scale(loss).backward()

    def step(self, optimizer: Any) -> None:
        """Step ``optimizer`` on the gradients of :meth:`backward` (unscaled first; skipped when fp16 overflowed).

        Gradients are averaged over ranks *before* the overflow check, so every rank takes the same decision.
        """
        synchronize = getattr(optimizer, "synchronize", None)
        if synchronize is not None:
            synchronize()
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loss scale; a checkpoint from another format (a run resumed on another GPU) keeps ours."""
        if state.get("name") == self.name and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        elif state.get("name") != self.name:
            log.info("checkpoint trained in %s, continuing in %s", state.get("name"), self.name)
