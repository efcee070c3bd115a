"""`tumorsynth bench pgan`: network sizes at the configured resolution and WGAN-GP training speed per resolution.

One measured step is what one minibatch costs in training: a D step (G forward, D on reals, fakes and the gradient
penalty's double backward, Adam) and a G step. Images per second count real images shown to D, as kimg does.
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit.bench.timing import time_steps
from toolkit.models.pgan import Discriminator, Generator, PGANConfig
from toolkit.train.pgan import PGANOptimConfig, d_loss, g_loss


def bench_pgan(config: PGANConfig | None = None, *, device: str = "cpu", batch: int = 8, steps: int = 2,
               warmup: int = 1) -> dict[str, Any]:
    """Parameter counts of G and D and training img/s at every resolution from 4² to the full one."""
    config = config or PGANConfig()
    dev = torch.device(device)
    torch.manual_seed(0)
    G, D = Generator(config).to(dev), Discriminator(config).to(dev)
    opt_g, opt_d = (torch.optim.Adam(n.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-8) for n in (G, D))
    o = PGANOptimConfig()
    full = config.resolution
    per_resolution = {}
    for level in range(config.max_lod + 1):
        lod = float(config.max_lod - level)
        reals = torch.rand(batch, config.channels, full, full, device=dev) * 2 - 1

        def step(lod: float = lod, reals: torch.Tensor = reals) -> None:
            z = torch.randn(batch, config.latent, device=dev)
            mix = torch.rand(batch, 1, 1, 1, device=dev)
            opt_d.zero_grad(set_to_none=True)
            d_loss(G, D, reals, z, mix, lod, o).backward()
            opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            g_loss(G, D, z, lod).backward()
            opt_g.step()

        per_resolution[str(4 << level)] = batch * steps / time_steps(step, dev, steps=steps, warmup=warmup)
    return {"model": "pgan", "device": str(dev), "params_g": sum(p.numel() for p in G.parameters()),
            "params_d": sum(p.numel() for p in D.parameters()),
            "resolution": full, "batch": batch, "steps": steps, "img_per_s": per_resolution[str(full)],
            "img_per_s_per_resolution": per_resolution}
