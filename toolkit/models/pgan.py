"""Progressive GAN (Karras et al. 2018): config, equalised-LR layers, generator, discriminator, real-image fade.

Architecture only — no data or training imports. A faithful re-implementation of the official TensorFlow ``G_paper`` /
``D_paper`` (facts in shared/reference/official-codes.md, "Progressive GAN"); the fused up/down-scaling convolutions of
the official code are written as their unfused equivalents (nearest ×2 then conv; conv then 2×2 average pool).

Level of detail (``lod``), as in the official code, with ``max_lod = log2(resolution) − 2``:

- ``lod = k`` (integer): stable training at ``resolution / 2**k``; ``k = max_lod`` is 4×4, ``k = 0`` full resolution.
- ``lod ∈ (k, k + 1)``: the block at ``resolution / 2**k`` fades in with weight ``alpha = 1 − (lod − k)``; the
  previous resolution's output (G) / input path (D) has weight ``1 − alpha``. ``alpha`` → 0 as lod → k + 1 (the block
  is off, as at the stable lod k + 1) and → 1 as lod → k (fully on, as at the stable lod k), so G and D are continuous
  in lod.

Both networks work on full-resolution images whatever the lod: G nearest-upsamples its current output to ``resolution``
(as the official G does), D box-downsamples its input to the current resolution. :func:`blend_reals` gives real images
the same fade as G's output.

Layer widths ``nf(stage) = min(fmap_base // 2**stage, fmap_max)``; the block at ``2**r`` × ``2**r`` has ``nf(r − 1)``
feature maps: 4²…256² → 512, 512, 512, 512, 256, 128, 64 for the paper config.

Label conditioning (the official ``label_size``, AC-GAN style; here the label is the mask's axial slice bin): with
``label_size`` L > 0, G takes int64 class indices ``[N]`` beside the latents, concatenates their one-hot encoding
(built on the labels' device) to the latents and pixel-normalises the concatenation before its first dense layer
(fan-in latent + L); D's last dense layer has 1 + L outputs, column 0 the WGAN score and columns 1… the label
logits. ``label_size = 0`` builds exactly the unconditioned networks (same parameters, D output ``[N, 1]``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SQRT2 = math.sqrt(2.0)
LRELU_SLOPE = 0.2
PIXELNORM_EPS = 1e-8


@dataclass(frozen=True)
class PGANConfig:
    """Generator and discriminator hyperparameters. Defaults are the paper's (1×256², latent 512, 512…64 maps); the
    CPU demo shrinks the widths, e.g. ``resolution=32, fmap_base=512, fmap_max=64``."""

    resolution: int = 256
    channels: int = 1
    latent: int = 512
    fmap_base: int = 8192
    fmap_max: int = 512
    mbstd_group: int = 4
    label_size: int = 0  # conditioning classes (the axial slice bins); 0: unconditioned

    def __post_init__(self) -> None:
        for name in ("resolution", "channels", "latent", "fmap_base", "fmap_max", "mbstd_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"pgan.{name}: expected a positive integer, got {value!r}")
        if not isinstance(self.label_size, int) or isinstance(self.label_size, bool) or self.label_size < 0:
            raise ValueError(f"pgan.label_size: expected a non-negative integer (0: unconditioned), "
                             f"got {self.label_size!r}")
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise ValueError(f"pgan.resolution: expected a power of two ≥ 4, got {self.resolution}")
        if self.nf(self.resolution_log2 - 1) < 1:
            raise ValueError(f"pgan.fmap_base: {self.fmap_base} leaves no feature maps at {self.resolution}²")

    @property
    def resolution_log2(self) -> int:
        return self.resolution.bit_length() - 1

    @property
    def max_lod(self) -> int:
        """The lod of 4×4 training (where the schedule starts)."""
        return self.resolution_log2 - 2

    def nf(self, stage: int) -> int:
        """Feature maps at ``stage``; the block at ``2**r`` pixels uses ``nf(r − 1)``."""
        return min(self.fmap_base // 2**stage, self.fmap_max)


def split_lod(lod: float, max_lod: int) -> tuple[int, float]:
    """``(level, alpha)`` for ``lod``: ``level`` indexes the finest active block (0 = 4×4, ``max_lod`` = full
    resolution) and ``alpha`` ∈ (0, 1] is its weight in the fade (1 = stable, no fade)."""
    lod = float(lod)
    if not 0.0 <= lod <= max_lod:
        raise ValueError(f"lod {lod} outside [0, {max_lod}]")
    k = min(math.floor(lod), max_lod)
    return max_lod - k, 1.0 - (lod - k)


def pixel_norm(x: torch.Tensor, eps: float = PIXELNORM_EPS) -> torch.Tensor:
    """Normalise each pixel's feature vector to unit mean square over channels (dim 1); the statistic in fp32 whatever
    ``x``'s format (under bf16 autocast a mean of 512 squares would lose the 1e-8 and most of its digits)."""
    return x * torch.rsqrt(x.float().square().mean(dim=1, keepdim=True) + eps).to(x.dtype)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def box_down(x: torch.Tensor, factor: int) -> torch.Tensor:
    """``factor``×``factor`` box average (the official ``downscale2d``)."""
    return F.avg_pool2d(x, factor) if factor > 1 else x


def nearest_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by an integer factor (the official ``upscale2d``)."""
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


class EqualizedConv2d(nn.Module):
    """'Same' k×k convolution with an equalised learning rate: weights ~ N(0, 1), multiplied at run time by
    ``gain / sqrt(fan_in)`` so that Adam's step size is the same for every layer; zero bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, gain: float = SQRT2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.scale = gain / math.sqrt(in_channels * kernel * kernel)
        self.padding = kernel // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    """Dense layer with an equalised learning rate (see :class:`EqualizedConv2d`); flattens its input (NCHW order, as
    the official code does) and has an optional zero bias."""

    def __init__(self, in_features: int, out_features: int, gain: float = SQRT2, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.weight * self.scale, self.bias)


class ConvAct(nn.Module):
    """Equalised 3×3 conv, leaky ReLU, and (in G) pixel norm."""

    def __init__(self, in_channels: int, out_channels: int, pixelnorm: bool) -> None:
        super().__init__()
        self.conv = EqualizedConv2d(in_channels, out_channels, 3)
        self.pixelnorm = pixelnorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = lrelu(self.conv(x))
        return pixel_norm(x) if self.pixelnorm else x


class GInitial(nn.Module):
    """G's 4×4 block: normalised latent (with the one-hot label, if conditioned) → dense (gain √2/4, the official
    override) → [nf, 4, 4] + per-channel bias → lrelu, PN → conv 3×3, lrelu, PN."""

    def __init__(self, latent: int, channels: int) -> None:
        super().__init__()
        self.dense = EqualizedLinear(latent, channels * 16, gain=SQRT2 / 4, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels))  # the official bias is applied after the reshape
        self.conv = ConvAct(channels, channels, pixelnorm=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.dense(pixel_norm(z)).view(len(z), -1, 4, 4)
        return self.conv(pixel_norm(lrelu(x + self.bias[:, None, None])))


class GBlock(nn.Sequential):
    """G's block for one higher resolution: nearest ×2, two 3×3 convs (each lrelu, PN)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), ConvAct(in_channels, out_channels, True),
                         ConvAct(out_channels, out_channels, True))


class Generator(nn.Module):
    """Latents ``[N, latent]`` → images ``[N, channels, resolution, resolution]`` (linear output, no tanh).
    ``blocks[i]`` and ``to_rgb[i]`` work at ``4·2**i`` pixels."""

    def __init__(self, config: PGANConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or PGANConfig()
        widths = [c.nf(r - 1) for r in range(2, c.resolution_log2 + 1)]
        self.blocks = nn.ModuleList([GInitial(c.latent + c.label_size, widths[0])])
        self.blocks.extend(GBlock(w_in, w_out) for w_in, w_out in itertools.pairwise(widths))
        self.to_rgb = nn.ModuleList(EqualizedConv2d(w, c.channels, 1, gain=1.0) for w in widths)

    def forward(self, z: torch.Tensor, lod: float = 0.0, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images at full resolution for level of detail ``lod`` (see the module docstring); ``labels``: int64 class
        indices ``[N]`` for a conditioned generator, None for an unconditioned one."""
        level, alpha = split_lod(lod, self.config.max_lod)
        x = prev = self.blocks[0](self._latents_in(z, labels))
        for block in self.blocks[1:level + 1]:
            prev, x = x, block(x)
        img = self.to_rgb[level](x)
        if alpha < 1.0:  # fading in `level`: lerp towards the upsampled output of the level below
            img = torch.lerp(img, nearest_up(self.to_rgb[level - 1](prev), 2), 1.0 - alpha)
        return nearest_up(img, 2 ** (self.config.max_lod - level))

    def _latents_in(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The official ``concat([latents, labels])``; the one-hot is made where the labels are (no host copy)."""
        size = self.config.label_size
        if not size:
            if labels is not None:
                raise ValueError("this generator is unconditioned (pgan.label_size 0): call it without labels")
            return z
        if labels is None:
            raise ValueError(f"this generator is conditioned on {size} labels (pgan.label_size): pass labels, int64 "
                             "class indices [N]")
        if labels.dtype != torch.int64 or labels.shape != (len(z),):
            raise ValueError(f"labels must be int64 class indices [{len(z)}] (one per latent), got {labels.dtype} "
                             f"{list(labels.shape)}")
        return torch.cat([z, F.one_hot(labels, size).to(z.dtype)], dim=1)


class MinibatchStddev(nn.Module):
    """Append the mean (over C, H, W) of per-group feature standard deviations as one extra channel.

    Official grouping: the batch is reshaped to ``[G, M, C, H, W]`` with ``G = min(group, N)``, so sample ``i`` is
    grouped with ``i + M, i + 2M, …`` (strided, ``M = N / G``). Biased variance over the group, ``sqrt(var + 1e-8)``.
    """

    def __init__(self, group: int) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        g = min(self.group, n)
        if n % g:
            raise ValueError(f"minibatch {n} is not divisible by the minibatch-stddev group size {g}")
        y = x.float().reshape(g, n // g, *x.shape[1:])
        y = torch.sqrt(y.var(dim=0, unbiased=False) + 1e-8).mean(dim=(1, 2, 3))  # [M]
        y = y.to(x.dtype).repeat(g)[:, None, None, None].expand(n, 1, h, w)  # sample g·M + m gets y[m]
        return torch.cat([x, y], dim=1)


class DFinal(nn.Module):
    """D's 4×4 block: minibatch stddev → conv 3×3 (+1 channel → nf), lrelu → dense to nf(0), lrelu → dense to
    ``outputs`` (gain 1): the score, then the label logits of a conditioned D."""

    def __init__(self, channels: int, hidden: int, group: int, outputs: int = 1) -> None:
        super().__init__()
        self.mbstd = MinibatchStddev(group)
        self.conv = ConvAct(channels + 1, channels, pixelnorm=False)
        self.dense0 = EqualizedLinear(channels * 16, hidden)
        self.dense1 = EqualizedLinear(hidden, outputs, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense1(lrelu(self.dense0(self.conv(self.mbstd(x)))))


class DBlock(nn.Sequential):
    """D's block for one resolution above 4×4: conv 3×3 (same width), conv 3×3 to the next lower width (each lrelu),
    2×2 average pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvAct(in_channels, in_channels, False), ConvAct(in_channels, out_channels, False),
                         nn.AvgPool2d(2))


class FromRGB(nn.Module):
    """1×1 equalised conv + lrelu."""

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.conv = EqualizedConv2d(channels, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrelu(self.conv(x))


class Discriminator(nn.Module):
    """Full-resolution images ``[N, channels, R, R]`` → ``[N, 1 + label_size]``: column 0 the WGAN score (no
    sigmoid), columns 1… the label logits of a conditioned D (none: ``[N, 1]``).
    ``blocks[i]`` and ``from_rgb[i]`` work at ``4·2**i`` pixels; ``blocks[0]`` is the 4×4 head."""

    def __init__(self, config: PGANConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or PGANConfig()
        widths = [c.nf(r - 1) for r in range(2, c.resolution_log2 + 1)]
        self.blocks = nn.ModuleList([DFinal(widths[0], c.nf(0), c.mbstd_group, 1 + c.label_size)])
        self.blocks.extend(DBlock(fine, coarse) for coarse, fine in itertools.pairwise(widths))
        self.from_rgb = nn.ModuleList(FromRGB(c.channels, w) for w in widths)

    def forward(self, x: torch.Tensor, lod: float = 0.0) -> torch.Tensor:
        """Scores (and label logits) for full-resolution images at level of detail ``lod`` (see the module
        docstring)."""
        level, alpha = split_lod(lod, self.config.max_lod)
        img = box_down(x, 2 ** (self.config.max_lod - level))  # the current resolution
        h = self.blocks[level](self.from_rgb[level](img))
        if alpha < 1.0:  # fading in `level`: lerp towards the path that enters one level lower
            h = torch.lerp(h, self.from_rgb[level - 1](box_down(img, 2)), 1.0 - alpha)
        for block in reversed(self.blocks[:level]):
            h = block(h)
        return h


def blend_reals(x: torch.Tensor, lod: float) -> torch.Tensor:
    """The official real-image fade (``process_reals``) for full-resolution reals ``[N, C, R, R]`` at ``lod``.

    Box-downsample to the current resolution ``R / 2**floor(lod)``; during a fade lerp towards its 2×2-box-down,
    nearest-up copy by ``lod − floor(lod)``; nearest-upsample back to ``R``. (The official dataset stores each
    resolution quantised to uint8; here the lower resolutions are exact box averages.)
    """
    size = x.shape[-1]
    if x.shape[-2] != size or size < 4 or size & (size - 1):
        raise ValueError(f"blend_reals: expected square power-of-two images ≥ 4², got {tuple(x.shape[-2:])}")
    max_lod = size.bit_length() - 3
    level, alpha = split_lod(lod, max_lod)
    factor = 2 ** (max_lod - level)
    y = box_down(x, factor)
    if alpha < 1.0:
        y = torch.lerp(y, nearest_up(box_down(y, 2), 2), 1.0 - alpha)
    return nearest_up(y, factor)
