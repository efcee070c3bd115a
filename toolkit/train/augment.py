"""Classical augmentation of U-Net training batches (the paper's open question: does synthetic data give more than
standard augmentation?): random rotation, isotropic scaling, left-right flips, elastic deformation and intensity
gamma, each with a probability and a range, applied per batch on the training device.

Parameters are a pure function of (seed, epoch, global batch index, position in the global batch): one CPU generator
per global batch, seeded from those, draws every transform's parameters for the whole global batch (all of them,
whichever are enabled, so the streams do not shift when one is switched off), and each rank keeps its share, split as
:func:`toolkit.train.sampling.rank_batches` splits rows. So a resumed run augments exactly as an uninterrupted one and
N ranks exactly as one process. Only those few numbers (and the elastic control points) are drawn on the host; they
reach the device as one asynchronous copy, and the warps run there.

Geometry, in pixels about the image centre: the output pixel at ``q`` samples the input at ``p = A·q + d(q)`` with
``A = R(θ)·F / s`` (R a rotation by θ, F the left-right mirror where flipped, s the scale factor: s > 1 enlarges the
content) and ``d`` the elastic displacement, a smooth field bicubically upsampled from Gaussian control points on a
coarse grid (``points`` × ``points``, standard deviation ``alpha`` pixels). Images are sampled bilinearly, labels
nearest; outside the image is zero (background). Gamma: ``x ← peak · (x / peak)^γ``, with γ log-uniform in its range
and ``peak`` the training set's intensity maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated

import torch
import torch.nn.functional as F

from toolkit.config import NonNegativeFloat, PositiveFloat, Range

Probability = Annotated[float, Range(ge=0, le=1)]


def _ordered(section: object, name: str) -> None:
    """``section.range`` as a tuple (YAML gives a list), refused unless it is [low, high] with 0 < low ≤ high."""
    bounds = tuple(section.range)
    if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
        raise ValueError(f"augment.{name}.range: expected [low, high] with 0 < low <= high, got {list(bounds)}")
    object.__setattr__(section, "range", bounds)


@dataclass(frozen=True)
class Rotation:
    p: Probability = 0.0
    degrees: NonNegativeFloat = 15.0  # θ uniform in ±degrees


@dataclass(frozen=True)
class Scaling:
    p: Probability = 0.0
    range: tuple[PositiveFloat, PositiveFloat] = (0.85, 1.15)  # s uniform in [low, high]

    def __post_init__(self) -> None:
        _ordered(self, "scale")


@dataclass(frozen=True)
class Flip:
    p: Probability = 0.0  # left-right: the mirror image of an axial slice


@dataclass(frozen=True)
class Elastic:
    p: Probability = 0.0
    alpha: NonNegativeFloat = 2.0  # control-point displacement standard deviation, pixels
    points: Annotated[int, Range(ge=2)] = 5  # control points per side


@dataclass(frozen=True)
class Gamma:
    p: Probability = 0.0
    range: tuple[PositiveFloat, PositiveFloat] = (0.7, 1.5)  # γ log-uniform in [low, high]

    def __post_init__(self) -> None:
        _ordered(self, "gamma")


@dataclass(frozen=True)
class AugmentConfig:
    """The U-Net config's ``augment:`` section; every probability 0 (the default, and the paper) is no augmentation."""

    rotation: Rotation = field(default_factory=Rotation)
    scale: Scaling = field(default_factory=Scaling)
    flip: Flip = field(default_factory=Flip)
    elastic: Elastic = field(default_factory=Elastic)
    gamma: Gamma = field(default_factory=Gamma)

    @property
    def enabled(self) -> bool:
        return any(t.p > 0 for t in (self.rotation, self.scale, self.flip, self.elastic, self.gamma))


@dataclass(frozen=True)
class Params:
    """One batch's parameters (host tensors, float64): per sample θ (radians), s, flip (0/1), γ, and the elastic
    control points [N, 2, P, P] in pixels (x then y displacement)."""

    angle: torch.Tensor
    scale: torch.Tensor
    flip: torch.Tensor
    gamma: torch.Tensor
    control: torch.Tensor

    def rows(self, start: int, stop: int) -> Params:
        return Params(*(t[start:stop] for t in (self.angle, self.scale, self.flip, self.gamma, self.control)))

    @property
    def warps(self) -> bool:
        """Whether any sample moves (known on the host: no device synchronisation)."""
        return bool((self.angle != 0).any() or (self.scale != 1).any() or self.flip.any() or self.control.any())


def batch_seed(seed: int, epoch: int, index: int) -> int:
    """The generator seed of global batch ``index`` of ``epoch`` (odd, so apart from the samplers' epoch seeds)."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) * 2 + 1


def draw(cfg: AugmentConfig, seed: int, epoch: int, index: int, batch: int) -> Params:
    """The parameters of every sample of one global batch of ``batch`` samples."""
    g = torch.Generator().manual_seed(batch_seed(seed, epoch, index))

    def uniform() -> torch.Tensor:
        return torch.rand(batch, generator=g, dtype=torch.float64)

    def chosen(p: float) -> torch.Tensor:
        return uniform() < p

    angle = (uniform() * 2 - 1) * math.radians(cfg.rotation.degrees)
    angle = torch.where(chosen(cfg.rotation.p), angle, 0.0)
    lo, hi = cfg.scale.range
    scale = torch.where(chosen(cfg.scale.p), lo + (hi - lo) * uniform(), 1.0)
    flip = chosen(cfg.flip.p).double()
    n = cfg.elastic.points
    control = torch.randn(batch, 2, n, n, generator=g, dtype=torch.float64) * cfg.elastic.alpha
    control = control * chosen(cfg.elastic.p).double().view(-1, 1, 1, 1)
    lo, hi = cfg.gamma.range
    gamma = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * uniform())
    gamma = torch.where(chosen(cfg.gamma.p), gamma, 1.0)
    return Params(angle, scale, flip, gamma, control)


def sampling_grid(params: Params, size: int, device: torch.device) -> torch.Tensor:
    """``grid_sample``'s grid [N, S, S, 2] (normalised, align_corners=False) of the mapping ``p = A·q + d(q)``."""
    cos, sin = torch.cos(params.angle), torch.sin(params.angle)
    mirror = 1 - 2 * params.flip  # F = diag(mirror, 1): x → −x where flipped
    theta = torch.stack([torch.stack([cos * mirror, -sin, torch.zeros_like(cos)], -1),
                         torch.stack([sin * mirror, cos, torch.zeros_like(cos)], -1)], 1) / params.scale.view(-1, 1, 1)
    # one copy of the few numbers to the device; square slices, so normalised and pixel rotations agree
    theta, control = (t.to(device=device, dtype=torch.float32, non_blocking=True)
                      for t in (theta, params.control * (2 / size)))
    grid = F.affine_grid(theta, [len(theta), 1, size, size], align_corners=False)
    if params.control.any():
        displacement = F.interpolate(control, size=(size, size), mode="bicubic", align_corners=True)
        grid = grid + displacement.permute(0, 2, 3, 1)
    return grid


def augment(image: torch.Tensor, label: torch.Tensor, params: Params, peak: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Image [N, C, S, S] (float, raw intensities) and label [N, S, S] (int64) of one rank's batch, augmented on
    their device by ``params`` (this rank's rows)."""
    size = image.shape[-1]
    if image.shape[-2] != size:
        raise ValueError(f"augmentation needs square slices, got {tuple(image.shape[-2:])}")
    if params.warps:
        grid = sampling_grid(params, size, image.device)
        image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                              align_corners=False)[:, 0].long()
    if (params.gamma != 1).any():
        gamma = params.gamma.to(device=image.device, dtype=torch.float32, non_blocking=True).view(-1, 1, 1, 1)
        image = peak * (image / peak).clamp(0, 1) ** gamma
    return image, label
