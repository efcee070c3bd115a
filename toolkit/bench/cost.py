"""What the pipeline's GPU work costs, estimated from FLOP counts: ``pipeline plan``'s GPU-hours.

An **estimate**, not a measurement (``bench`` measures). Forward FLOPs of one image are counted by torch's
``FlopCounterMode`` on the meta device (shapes only: the paper's networks count in well under a second, with no memory),
matmul-like ops only (convolutions, linear layers), as :func:`toolkit.bench.unet.forward_flops` counts. Per image:

- **PGAN training**, per real image shown to D: ≈ 4 G + 16 D forwards at the resolution of its iteration — the D step
  runs G once and D forward and backward (≈ 3 forwards each) on the real, the fake and the mixed image, whose gradient
  penalty's double backward costs about 4 more; the G step runs G and D forward and backward. Images per resolution and
  phase come from the schedule (:func:`toolkit.bench.pgan.schedule_images`).
- **SPADE training**: 4 G + 12 D forwards per pair and epoch (the count of :mod:`toolkit.bench.spade`).
- **U-Net training**: 3 forwards per training slice and epoch (:data:`toolkit.bench.unet.TRAIN_FLOPS_PER_FWD`) and one
  per validation slice and epoch.
- **generation**: one G forward per image; **SWD**: one G forward (at the snapshot's resolution) per image and snapshot;
  its Laplacian pyramids, projections and sorts are memory-bound and left out.

Throughput: the GPU's dense peak (:data:`toolkit.bench.peak.PEAK_TFLOPS`) in the format the run computes in (the
precision policy's ``auto``: bf16 where the GPU has it, else fp16 where the trainer allows it, else fp32) times an
assumed utilisation: :data:`TENSOR_UTILISATION` of a tensor-core peak (bf16, fp16, and fp32 as TF32 on GPUs with bf16),
:data:`FP32_UTILISATION` of a plain fp32 peak (Pascal to Turing). GPU-hours assume perfect scaling over GPUs.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

import torch
from torch.utils.flop_counter import FlopCounterMode

from toolkit.bench.peak import PEAK_TFLOPS
from toolkit.models.pgan import Discriminator, Generator, PGANConfig
from toolkit.models.spade import MultiscaleDiscriminator, SPADEConfig, SPADEGenerator
from toolkit.models.unet import UNet, UNetConfig
from toolkit.train.pgan_schedule import ScheduleConfig, ticks

TENSOR_UTILISATION = 0.35  # convnets of 64-512 channels rarely reach more of a tensor-core peak
FP32_UTILISATION = 0.6  # cuDNN's fp32 convolutions come closer to a CUDA-core peak
PGAN_G_PER_IMAGE, PGAN_D_PER_IMAGE = 4, 16
SPADE_G_PER_IMAGE, SPADE_D_PER_IMAGE = 4, 12
UNET_TRAIN_PER_IMAGE = 3

META = torch.device("meta")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True)
class Throughput:
    """The FLOP/s one GPU is assumed to sustain for one run: its peak in the run's format × the utilisation."""

    gpu: str
    precision: str
    peak_tflops: float
    utilisation: float

    @property
    def tflops(self) -> float:
        return self.peak_tflops * self.utilisation

    def gpu_hours(self, flops: float) -> float:
        return flops / (self.tflops * 1e12) / 3600

    def describe(self) -> str:
        return f"{self.gpu} {self.precision}: {self.utilisation:.0%} of {self.peak_tflops:g} TFLOP/s"


def gpu_of(*names: str | None) -> str | None:
    """The peak table's name of the GPU that the first of ``names`` (a profile's constraint, then its name: ``v100``,
    ``rtx2080ti``, ``h200``) names, compared without case, spaces or punctuation; None if none is known."""
    for name in names:
        if not name:
            continue
        for pattern, _ in PEAK_TFLOPS:  # more specific names first: gtx1080ti before gtx1080
            if _norm(pattern) in _norm(name):
                return pattern
    return None


def throughput(gpu: str | None, precision: str = "auto", *, allow_fp16: bool = True) -> Throughput | None:
    """The assumed throughput of a run on ``gpu`` (a :func:`gpu_of` name) with ``runtime.precision`` ``precision``;
    None for an unknown GPU or a format it has no figure for."""
    peaks = dict(PEAK_TFLOPS).get(gpu or "")
    if peaks is None:
        return None
    if precision == "auto":
        precision = "bf16" if "bf16" in peaks else "fp16" if "fp16" in peaks and allow_fp16 else "fp32"
    if precision not in peaks:
        return None
    tensor = precision != "fp32" or "bf16" in peaks  # fp32 is TF32 on tensor cores where the GPU has bf16
    return Throughput(gpu or "", precision, peaks[precision], TENSOR_UTILISATION if tensor else FP32_UTILISATION)


def _count(fn: object, *args: object) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)  # type: ignore[operator]
    return counter.get_total_flops()


@functools.cache
def _pgan_nets(config: PGANConfig) -> tuple[Generator, Discriminator]:
    with META:
        return Generator(config).eval(), Discriminator(config).eval()


@functools.cache
def pgan_forward(config: PGANConfig, lod: float) -> tuple[int, int]:
    """FLOPs of one G and one D forward of a single image at ``lod``."""
    G, D = _pgan_nets(config)
    z = torch.zeros(1, config.latent, device=META)
    labels = torch.zeros(1, dtype=torch.int64, device=META) if config.label_size else None  # a conditioned G's bin
    x = torch.zeros(1, config.channels, config.resolution, config.resolution, device=META)
    return _count(G, z, lod, labels), _count(D, x, lod)


def _lod(config: PGANConfig, resolution: int, fading: bool) -> float:
    return config.max_lod - (resolution.bit_length() - 3) + (0.5 if fading else 0.0)


def pgan_train_flops(config: PGANConfig, schedule: ScheduleConfig) -> float:
    """FLOPs of the whole PGAN schedule (see the module docstring)."""
    from toolkit.bench.pgan import schedule_images

    schedule = replace(schedule, resolution=config.resolution)  # as the trainer runs it
    total = 0.0
    for (resolution, fading), images in schedule_images(schedule).items():
        g, d = pgan_forward(config, _lod(config, resolution, fading))
        total += images * (PGAN_G_PER_IMAGE * g + PGAN_D_PER_IMAGE * d)
    return total


def pgan_generate_flops(config: PGANConfig, images: int) -> float:
    """FLOPs of ``images`` masks from a full-resolution generator."""
    return images * pgan_forward(config, 0.0)[0]


def swd_flops(config: PGANConfig, schedule: ScheduleConfig, images: int) -> float:
    """FLOPs of generating ``images`` masks for every tick snapshot (at the resolution the tick ended at)."""
    total = 0.0
    for tick in ticks(replace(schedule, resolution=config.resolution)):
        lod = float(int(tick.iterations[-1][1]))  # mid-fade: the finer level's count (the fade's path is tiny)
        total += images * pgan_forward(config, lod)[0]
    return total


@functools.cache
def spade_forward(config: SPADEConfig) -> tuple[int, int]:
    """FLOPs of one SPADE G forward and one multiscale-D forward of a single (mask, image) pair."""
    with META:
        G, D = SPADEGenerator(config).eval(), MultiscaleDiscriminator(config).eval()
    size = config.resolution
    segmap = torch.zeros(1, config.label_nc, size, size, device=META)
    image = torch.zeros(1, config.out_channels, size, size, device=META)
    return _count(G, segmap), _count(D, segmap, image)


def spade_train_flops(config: SPADEConfig, pairs: int, epochs: int) -> float:
    g, d = spade_forward(config)
    return epochs * pairs * (SPADE_G_PER_IMAGE * g + SPADE_D_PER_IMAGE * d)


def spade_generate_flops(config: SPADEConfig, images: int) -> float:
    return images * spade_forward(config)[0]


@functools.cache
def unet_forward(config: UNetConfig, size: int) -> int:
    with META:
        model = UNet(config).eval()
    return _count(model, torch.zeros(1, config.in_channels, size, size, device=META))


def unet_train_flops(config: UNetConfig, size: int, rows: int, val_rows: int, epochs: int) -> float:
    return epochs * (UNET_TRAIN_PER_IMAGE * rows + val_rows) * unet_forward(config, size)
