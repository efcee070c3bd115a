"""`tumorsynth bench pgan`: network sizes, WGAN-GP training speed per resolution and phase, and the hours the whole
configured schedule would take at those speeds.

One measured step is what one minibatch costs in training, run by the trainer's own :class:`WGANGP` step: the real
fade (``blend_reals``), a D step (G forward, D on reals, fakes and the gradient penalty's double backward, Adam), a G
step and the EMA update, under the run's precision policy. Every resolution is timed at the schedule's own minibatch,
stable (integer lod) and fading into it (lod half-way through the fade: the extra to-RGB / from-RGB path runs). Images
per second count real images shown to D, as kimg does.

``projected_hours`` sums, over the schedule's iterations, the iteration's images divided by the measured speed of its
resolution and phase; data loading is left out (the trainer's masks are resident on the device).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch

from toolkit.bench.timing import time_steps
from toolkit.models.pgan import PGANConfig
from toolkit.train.distributed import Dist
from toolkit.train.pgan import WGANGP, PGANOptimConfig
from toolkit.train.pgan_schedule import ScheduleConfig, Segment, state_at, ticks
from toolkit.train.precision import Precision
from toolkit.train.runtime import RuntimeConfig, prepare_device


def _fading(lod: float) -> bool:
    return lod != math.floor(lod)


def _fading_count(seg: Segment, schedule: ScheduleConfig) -> int:
    """How many of a segment's iterations are fading. A segment keeps one resolution, and at a resolution the fade
    into it comes before its stable phase, so the fading iterations are a prefix: binary search on the lod."""
    lo, hi = 0, seg.count
    while lo < hi:
        mid = (lo + hi) // 2
        if _fading(state_at(seg.start_nimg + mid * seg.step, schedule).lod):
            lo = mid + 1
        else:
            hi = mid
    return lo


def schedule_images(schedule: ScheduleConfig) -> dict[tuple[int, bool], int]:
    """Real images shown to D over the whole schedule per (resolution, fading); phases the schedule never reaches are
    absent."""
    images: dict[tuple[int, bool], int] = defaultdict(int)
    for tick in ticks(schedule):
        for seg in tick.iterations.segments:
            fading = _fading_count(seg, schedule)
            for phase, count in ((True, fading), (False, seg.count - fading)):
                if count:
                    images[seg.resolution, phase] += count * seg.step
    return dict(images)


def _img_per_s(nets: WGANGP, lod: float, minibatch: int, device: torch.device, steps: int, warmup: int) -> float:
    full = nets.model.resolution
    reals = torch.rand(minibatch, nets.model.channels, full, full, device=device) * 2 - 1
    labels = [torch.randint(nets.model.label_size, (minibatch,), device=device) for _ in range(2)] if (
        nets.model.label_size) else [None, None]  # a slice-conditioned config: its reals' and G step's labels
    return minibatch * steps / time_steps(lambda: nets.step(reals, lod, minibatch, *labels), device, steps=steps,
                                          warmup=warmup)


def bench_pgan(config: PGANConfig | None = None, schedule: ScheduleConfig | None = None, *,
               optim: PGANOptimConfig | None = None, precision: str = "auto", device: str = "cpu", steps: int = 2,
               warmup: int = 1, runtime: RuntimeConfig | None = None) -> dict[str, Any]:
    """Parameter counts of G and D, training img/s at every resolution from 4² to the full one (stable and fading, at
    the schedule's minibatch) and the projected hours of the whole schedule. Defaults: the paper's networks and
    schedule; ``runtime`` gives the memory format (default: the trainer's default for the device)."""
    config = config or PGANConfig()
    schedule = replace(schedule or ScheduleConfig(), resolution=config.resolution)  # as the trainer runs it
    dev = torch.device(device)
    prepare_device(dev)
    policy = Precision.for_device(precision, dev, allow_fp16=False)
    torch.manual_seed(0)
    memory_format = (runtime or RuntimeConfig()).memory_format(dev)
    nets = WGANGP(config, optim or PGANOptimConfig(), Dist(device=dev), policy, memory_format)
    rates: dict[tuple[int, bool], float] = {}
    for level in range(config.max_lod + 1):
        resolution, lod = 4 << level, float(config.max_lod - level)
        minibatch = schedule.minibatch.get(resolution, schedule.minibatch_default)
        rates[resolution, False] = _img_per_s(nets, lod, minibatch, dev, steps, warmup)
        if level:  # 4² has no fade
            rates[resolution, True] = _img_per_s(nets, lod + 0.5, minibatch, dev, steps, warmup)
    images = schedule_images(schedule)
    seconds = sum(n / rates[key] for key, n in images.items())
    stable = {str(res): rate for (res, fading), rate in rates.items() if not fading}
    full = config.resolution
    return {"model": "pgan", "device": str(dev), "precision": policy.name,
            "channels_last": memory_format == torch.channels_last,
            "params_g": sum(p.numel() for p in nets.G.parameters()),
            "params_d": sum(p.numel() for p in nets.D.parameters()),
            "resolution": full, "batch": schedule.minibatch.get(full, schedule.minibatch_default), "steps": steps,
            "img_per_s": stable[str(full)], "img_per_s_per_resolution": stable, "img_per_s_stable": stable,
            "img_per_s_fading": {str(res): rate for (res, fading), rate in rates.items() if fading},
            "total_kimg": schedule.total_kimg, "projected_hours": seconds / 3600}
