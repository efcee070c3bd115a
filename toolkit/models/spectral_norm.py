"""Spectral normalisation whose power iteration and σ always run in fp32, also inside an autocast region.

The semantics and state-dict keys are those of ``torch.nn.utils.spectral_norm`` (one power iteration per training
forward, ``weight_orig`` trained, ``weight_u`` / ``weight_v`` buffers, ``weight = weight_orig / σ``), so checkpoints
of either load into the other. What differs: torch's forward pre-hook runs inside the caller's autocast, where its
matrix-vector products are autocast ops, so under bf16 the power iteration and σ would be computed in bf16. Here the
hook disables autocast and computes in the parameter's own dtype (fp32).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where ``device``'s autocast (if it has one and it is on) is off."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


class _SpectralNormHook:
    """Forward pre-hook: refresh ``u``, ``v`` (training only) and set ``module.weight = weight_orig / σ``."""

    def __call__(self, module: nn.Module, inputs: object) -> None:
        weight = module.weight_orig
        with _without_autocast(weight.device):
            matrix = weight.flatten(1)
            u, v = module.weight_u, module.weight_v
            if module.training:
                with torch.no_grad():
                    # in place, so DDP's buffer broadcast and the state dict see the new vectors; cloned below because
                    # autograd must not see later in-place updates of the tensors σ was computed from
                    F.normalize(torch.mv(matrix.t(), u), dim=0, eps=EPS, out=v)
                    F.normalize(torch.mv(matrix, v), dim=0, eps=EPS, out=u)
                u, v = u.clone(memory_format=torch.contiguous_format), v.clone(memory_format=torch.contiguous_format)
            sigma = torch.dot(u, torch.mv(matrix, v))
            module.weight = weight / sigma


def spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral-normalise ``module.weight`` (dim 0, one power iteration per training step); returns ``module``."""
    weight = module.weight
    del module._parameters["weight"]
    module.register_parameter("weight_orig", weight)
    rows, cols = weight.shape[0], weight[0].numel()
    # torch's initialisation: random normal vectors, normalised
    module.register_buffer("weight_u", F.normalize(weight.new_empty(rows).normal_(0, 1), dim=0, eps=EPS))
    module.register_buffer("weight_v", F.normalize(weight.new_empty(cols).normal_(0, 1), dim=0, eps=EPS))
    module.weight = weight.data  # a plain attribute, replaced by the hook before every forward
    module.register_forward_pre_hook(_SpectralNormHook())
    return module
