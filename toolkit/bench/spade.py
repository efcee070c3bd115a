"""`tumorsynth bench spade`: parameter counts of G and D, training and inference images/s of SPADE on random masks.

``tflops`` counts a training iteration as 4 G forwards and 12 D forwards per image (see :func:`bench_spade`).
One timed training step is the trainer's :func:`toolkit.train.spade.train_iteration`: a G step (G forward, D on fake
and real, hinge + feature matching, backward through D into G, Adam) and a D step (G forward without gradients, D on
both, backward, Adam). Inference is the generator alone in eval mode. AMP (bf16) and channels_last default to on for
CUDA and off for CPU.
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
from toolkit.train.spade import SPADEOptimConfig, train_iteration

log = logging.getLogger(__name__)


def bench_spade(config: SPADEConfig | None = None, *, device: str = "cpu", batch: int = 1, steps: int = 5,
                warmup: int = 2, amp: bool | None = None, channels_last: bool | None = None,
                compile: bool = False) -> dict[str, Any]:
    """Time ``steps`` training iterations and ``steps`` inference batches after ``warmup`` untimed ones."""
    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"bench spade: need steps >= 1, warmup >= 0, batch >= 1 (got {steps}, {warmup}, {batch})")
    config = config or SPADEConfig()
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    amp = cuda if amp is None else amp
    channels_last = cuda if channels_last is None else channels_last
    if cuda:
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    G = SPADEGenerator(config).to(dev, memory_format=memory_format)
    D = MultiscaleDiscriminator(config).to(dev, memory_format=memory_format)
    flops = forward_flops(G, config.label_nc, config.resolution, dev)
    d_flops = _discriminator_flops(D, config, dev)
    # Per image and iteration: G forward + backward (≈ 3 forwards) and a gradient-free G forward; D forward and
    # backward on the fake and the real image, in both the G and the D step (2 steps × 2 images × 3 forwards).
    train_flops = 4 * flops + 12 * d_flops
    o = SPADEOptimConfig()
    opt_G = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2))
    G_step, D_step = (torch.compile(G), torch.compile(D)) if compile else (G, D)
    size = config.resolution
    labels = torch.randint(0, config.label_nc, (batch, size, size), device=dev)
    segmap = one_hot(labels, config.label_nc).contiguous(memory_format=memory_format)
    real = (torch.rand(batch, config.out_channels, size, size, device=dev) * 2 - 1).contiguous(
        memory_format=memory_format)

    def train() -> None:
        train_iteration(G_step, D_step, opt_G, opt_D, segmap, real, lambda_feat=o.lambda_feat, amp=amp)

    @torch.no_grad()
    def infer() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            G_step(segmap)

    train_s = time_steps(train, dev, steps=steps, warmup=warmup)
    G.eval()
    infer_s = time_steps(infer, dev, steps=steps, warmup=warmup)
    img_per_s = batch * steps / train_s
    log.info("spade: %.2f img/s training, %.2f img/s inference (batch %d, %d², %s)", img_per_s,
             batch * steps / infer_s, batch, size, dev)
    return {"model": "spade", "device": str(dev), "params_g": count_parameters(G), "params_d": count_parameters(D),
            "gflop_per_image_fwd": flops / 1e9, "gflop_per_image_train": train_flops / 1e9, "img_per_s": img_per_s,
            "tflops": train_flops * img_per_s / 1e12, "inference_img_per_s": batch * steps / infer_s,
            "batch": batch, "size": size, "amp": amp, "channels_last": channels_last, "compile": compile,
            "steps": steps, "train_step_ms": 1e3 * train_s / steps}


def _discriminator_flops(D: MultiscaleDiscriminator, config: SPADEConfig, device: torch.device) -> int:
    """FLOPs of one multiscale-discriminator forward of a single (mask, image) pair, as ``FlopCounterMode`` counts."""
    size = config.resolution
    segmap = torch.zeros(1, config.label_nc, size, size, device=device)
    image = torch.zeros(1, config.out_channels, size, size, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        D(segmap, image)
    return counter.get_total_flops()
