"""Synchronised BatchNorm that also runs on CPU (gloo) and under Horovod, where ``torch.nn.SyncBatchNorm`` refuses to.

Batch statistics are computed over the global batch: each rank's per-channel sum, sum of squares and count are summed
with a differentiable all-reduce, which the distributed layer passes in (torch.distributed's or Horovod's), so
gradients flow through the global mean and variance exactly as a single process with the whole batch would compute
them. Statistics are accumulated in float64 to keep them as close as possible to single-process BatchNorm. Parameter
and buffer names match ``nn.BatchNorm2d``, so checkpoints are interchangeable; the parameter-free form
(``affine=False``, as SPADE uses) is supported.
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
        x64 = x.double()
        count = torch.tensor([x.numel() / channels], dtype=torch.float64, device=x.device)
        stats = self.all_reduce(torch.cat([x64.sum((0, 2, 3)), (x64 * x64).sum((0, 2, 3)), count]))
        total, squares, n = stats[:channels], stats[channels:2 * channels], stats[-1]
        mean = total / n
        var = squares / n - mean * mean
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean.to(x.dtype))
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * (var * n / (n - 1)).to(x.dtype))
        shape = (1, channels, 1, 1)
        scale = 1 / torch.sqrt(var + self.eps)
        out = (x64 - mean.view(shape)) * (scale if self.weight is None else self.weight.double() * scale).view(shape)
        return (out if self.bias is None else out + self.bias.double().view(shape)).to(x.dtype)


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
