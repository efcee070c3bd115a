"""`tumorsynth bench spade`: parameter counts of G and D, training and inference images/s of SPADE on random masks.

``tflops`` counts a training iteration as 4 G forwards and 12 D forwards per image (see :func:`bench_spade`).
One timed training step is the trainer's :func:`toolkit.train.spade.train_iteration`: a G step (G forward, D on fake
and real, hinge + feature matching, backward through D into G, Adam) and a D step (G forward without gradients, D on
both, backward, Adam). Inference is the generator alone in eval mode. Both compute in the precision policy's format
(``precision``, default ``auto``: bf16 or fp16 + loss scaling on GPUs with tensor cores, fp32 on the CPU);
channels_last defaults to on for CUDA and off for CPU.

The default batch is the official SPADE's 16 on CUDA, but 1 on the CPU: at 256² one batch-16 iteration of the paper
networks takes minutes on a few cores, and a CPU run is a smoke test, not a throughput figure.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from toolkit.bench.timing import time_steps
from toolkit.bench.unet import forward_flops
from toolkit.models.spade import MultiscaleDiscriminator, SPADEConfig, SPADEGenerator, one_hot
from toolkit.models.unet import count_parameters
from toolkit.train.precision import Precision
from toolkit.train.runtime import RuntimeConfig, adam, prepare_device
from toolkit.train.spade import SPADEOptimConfig, train_iteration

log = logging.getLogger(__name__)


def default_batch(device: torch.device) -> int:
    """16 on CUDA (the official SPADE's batch), 1 on the CPU (see the module docstring)."""
    return 16 if device.type == "cuda" else 1


def bench_spade(config: SPADEConfig | None = None, *, device: str = "cpu", batch: int | None = None, steps: int = 5,
                warmup: int = 2, precision: str = "auto", channels_last: bool | None = None,
                compile: bool = False) -> dict[str, Any]:
    """Time ``steps`` training iterations and ``steps`` inference batches after ``warmup`` untimed ones."""
    dev = torch.device(device)
    batch = default_batch(dev) if batch is None else batch
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"bench spade: need steps >= 1, warmup >= 0, batch >= 1 (got {steps}, {warmup}, {batch})")
    config = config or SPADEConfig()
    prepare_device(dev)
    policy = Precision.for_device(precision, dev)
    memory_format = RuntimeConfig(channels_last=channels_last).memory_format(dev)
    torch.manual_seed(0)
    G = SPADEGenerator(config).to(dev, memory_format=memory_format)
    D = MultiscaleDiscriminator(config).to(dev, memory_format=memory_format)
    flops = forward_flops(G, config.label_nc, config.resolution, dev)
    d_flops = _discriminator_flops(D, config, dev)
    # Per image and iteration: G forward + backward (≈ 3 forwards) and a gradient-free G forward; D forward and
    # backward on the fake and the real image, in both the G and the D step (2 steps × 2 images × 3 forwards).
    train_flops = 4 * flops + 12 * d_flops
    o = SPADEOptimConfig()
    opt_G = adam(G.parameters(), dev, lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_D = adam(D.parameters(), dev, lr=o.lr_d, betas=(o.beta1, o.beta2))
    G_step, D_step = (torch.compile(G), torch.compile(D)) if compile else (G, D)
    size = config.resolution
    labels = torch.randint(0, config.label_nc, (batch, size, size), device=dev)
    segmap = one_hot(labels, config.label_nc).contiguous(memory_format=memory_format)
    real = (torch.rand(batch, config.out_channels, size, size, device=dev) * 2 - 1).contiguous(
        memory_format=memory_format)

    def train() -> None:
        train_iteration(G_step, D_step, opt_G, opt_D, segmap, real, lambda_feat=o.lambda_feat, lambda_l1=o.lambda_l1,
                        precision=policy)

    @torch.no_grad()
    def infer() -> None:
        with policy.autocast():
            G_step(segmap)

    train_s = time_steps(train, dev, steps=steps, warmup=warmup)
    G.eval()
    infer_s = time_steps(infer, dev, steps=steps, warmup=warmup)
    img_per_s = batch * steps / train_s
    log.info("spade: %.2f img/s training, %.2f img/s inference (batch %d, %d², %s, %s)", img_per_s,
             batch * steps / infer_s, batch, size, dev, policy.name)
    return {"model": "spade", "device": str(dev), "params_g": count_parameters(G), "params_d": count_parameters(D),
            "gflop_per_image_fwd": flops / 1e9, "gflop_per_image_train": train_flops / 1e9, "img_per_s": img_per_s,
            "tflops": train_flops * img_per_s / 1e12, "inference_img_per_s": batch * steps / infer_s,
            "batch": batch, "size": size, "precision": policy.name,
            "amp": policy.mixed,  # kept from before the precision policy: autocast on
            "channels_last": memory_format == torch.channels_last, "compile": compile,
            "steps": steps, "train_step_ms": 1e3 * train_s / steps}


def _discriminator_flops(D: MultiscaleDiscriminator, config: SPADEConfig, device: torch.device) -> int:
    """FLOPs of one multiscale-discriminator forward of a single (mask, image) pair, as ``FlopCounterMode`` counts."""
    size = config.resolution
    segmap = torch.zeros(1, config.label_nc, size, size, device=device)
    image = torch.zeros(1, config.out_channels, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        D(segmap, image)
    return counter.get_total_flops()
