"""Synchronised BatchNorm for every backend and device: DDP (gloo or NCCL) and Horovod, CPU and CUDA.

Batch statistics are computed over the global batch with one differentiable all-reduce, which the distributed layer
passes in (torch.distributed's or Horovod's), so gradients flow through the global mean and variance exactly as a
single process with the whole batch would compute them. Unlike ``torch.nn.SyncBatchNorm`` (CUDA and DDP only, and a
host synchronisation in every forward to size its all-gather) nothing here waits for the host.

Numerics: each rank takes its per-channel mean and variance with one fused, numerically stable ``var_mean`` in fp32
(whatever autocast made the input), then contributes ``n·d`` and ``n·(var + d²)`` with ``d = mean − K`` for a shift
``K``, the running mean (identical on every rank). Summed over ranks these give the global mean and variance without
the cancellation of a plain sum-of-squares, since ``K`` tracks the mean. Running statistics stay in their own fp32
buffers. Parameter and buffer names match ``nn.BatchNorm2d``, so checkpoints are interchangeable; the
parameter-free form (``affine=False``, as SPADE uses) is supported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics span every rank (``all_reduce``: a differentiable sum)."""

    def __init__(self, *args: object, all_reduce: Callable[[torch.Tensor], torch.Tensor], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        local_var, local_mean = torch.var_mean(xf, dim=(0, 2, 3), unbiased=False)
        local_n = x.numel() // channels
        shift = torch.zeros_like(local_mean) if self.running_mean is None else self.running_mean.detach().float()
        d = local_mean - shift
        count = torch.full((1,), float(local_n), device=x.device)  # made on the device: no host copy
        stats = self.all_reduce(torch.cat([local_n * d, local_n * (local_var + d * d), count]))
        n = stats[-1]
        offset = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - offset * offset).clamp_min(0)
        mean = shift + offset
        if self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.to(self.running_mean.dtype))
                unbiased = var * n / (n - 1)
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * unbiased.to(self.running_var.dtype))
        # y = (x − mean)·scale + bias, centred first: with x·scale + (bias − mean·scale) the weight gradient would be
        # Σx·g − mean·Σg, which cancels catastrophically when |mean| ≫ std
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = self.weight.float() * scale
        shape = (1, channels, 1, 1)
        centred = xf - mean.view(shape)
        out = centred * scale.view(shape) if self.bias is None else torch.addcmul(
            self.bias.float().view(shape), centred, scale.view(shape))
        return out.to(x.dtype)


def convert(module: nn.Module, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by :class:`GlobalBatchNorm2d` summing with ``all_reduce`` (a
    differentiable sum over ranks), keeping parameters and buffers."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, GlobalBatchNorm2d):
        synced = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats, all_reduce=all_reduce)
        synced.load_state_dict(module.state_dict())
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert(child, all_reduce))
    return module
