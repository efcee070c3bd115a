"""``tumorsynth bench unet``: training throughput (images/s) and achieved TFLOP/s of the U-Net on random data.

One timed step is what the trainer does per batch: forward, cross-entropy on the logits (softmax fused in), backward,
Adam update. The data is random and already on the device, so this measures the model and optimiser, not the loader.
With ``dist`` (``--dist ddp|horovod``, under torchrun/srun or mpirun/horovodrun) the model and optimiser are those of
the distributed layer and every rank takes ``batch / ranks`` of the global batch, so the step includes the gradient
averaging and the img/s are the whole job's.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from toolkit.bench.timing import time_steps
from toolkit.models.unet import UNet, UNetConfig, count_parameters
from toolkit.train.distributed import Dist

log = logging.getLogger(__name__)

# Training ≈ forward + backward, and backward costs about twice the forward (gradients w.r.t. inputs and weights).
TRAIN_FLOPS_PER_FWD = 3.0


def forward_flops(model: torch.nn.Module, in_channels: int, size: int, device: torch.device) -> int:
    """FLOPs (multiply-add = 2) of one forward of a single ``size``² image, as ``FlopCounterMode`` counts them.

    Only matmul-like ops (convs, transposed convs) are counted; BatchNorm, ReLU, pooling and concatenation are
    memory-bound and left out, as is customary.
    """
    x = torch.zeros(1, in_channels, size, size, device=device)
    was_training = model.training
    model.eval()  # eval so the count does not move BatchNorm running statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def bench_unet(config: UNetConfig, *, device: str = "cpu", batch: int = 8, size: int = 256, steps: int = 10,
               warmup: int = 3, amp: bool | None = None, channels_last: bool | None = None,
               compile: bool = False, dist: Dist | None = None) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` untimed ones; return the ``bench unet`` JSON object.

    ``amp`` (bf16 autocast) and ``channels_last`` default to on for CUDA and off for CPU. ``tflops`` is
    ``3 × gflop_per_image_fwd × img_per_s / 1000`` (training ≈ 3× the forward). With ``compile`` the warm-up steps
    also pay for compilation, so give it a few.
    """
    dist = dist or Dist(device=torch.device(device))
    if steps < 1 or warmup < 0 or batch < 1 or batch % dist.world_size:
        raise ValueError(f"bench unet: need steps >= 1, warmup >= 0 and a batch >= 1 divisible by the "
                         f"{dist.world_size} ranks (got {steps}, {warmup}, {batch})")
    dev = dist.device
    cuda = dev.type == "cuda"
    amp = cuda if amp is None else amp
    channels_last = cuda if channels_last is None else channels_last
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels once
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    model = UNet(config).to(dev, memory_format=memory_format)
    flops = forward_flops(model, config.in_channels, size, dev)
    net = dist.wrap(model)
    optimizer = dist.optimizer(torch.optim.Adam(net.parameters(), lr=1e-4))
    step_fn = torch.compile(net) if compile else net
    local = batch // dist.world_size
    x = torch.randn(local, config.in_channels, size, size, device=dev).contiguous(memory_format=memory_format)
    target = torch.randint(0, config.classes, (local, size, size), device=dev)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            logits = step_fn(x)
        # Cross-entropy (softmax over channels + negative log-likelihood) in fp32, where bf16 rounding would hurt.
        loss = F.cross_entropy(logits.float(), target)
        loss.backward()
        optimizer.step()

    elapsed = time_steps(train_step, dev, steps=steps, warmup=warmup)

    img_per_s = batch * steps / elapsed
    gflop = flops / 1e9
    tflops = TRAIN_FLOPS_PER_FWD * flops * img_per_s / 1e12
    log.info("unet: %.1f img/s, %.2f TFLOP/s (%.2f GFLOP/img fwd, batch %d, %d², %s, %s × %d)", img_per_s, tflops,
             gflop, batch, size, dev, dist.backend, dist.world_size)
    return {"model": "unet", "device": str(dev), "params": count_parameters(model), "gflop_per_image_fwd": gflop,
            "img_per_s": img_per_s, "tflops": tflops, "batch": batch, "size": size, "amp": amp,
            "channels_last": channels_last, "compile": compile, "steps": steps, "seconds": elapsed,
            "step_ms": 1e3 * elapsed / steps, "dist": dist.backend, "ranks": dist.world_size}
