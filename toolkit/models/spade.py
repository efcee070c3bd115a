"""SPADE (Park et al. 2019) as the official NVlabs code builds it, for one-channel MR from a 7-class mask.

Generator without the VAE encoder: the one-hot mask, resized (nearest) to ``resolution / 32``, goes through a 3×3 conv
to 16·ngf channels, then SPADE residual blocks (head, two middle, four up-blocks; 'normal' upsampling, ×2 nearest
after the head, the second middle block and each of the first three up-blocks), leaky ReLU, a 3×3 conv to
``out_channels`` and tanh. Every normalisation is SPADE: parameter-free BatchNorm (synchronised across ranks by the
trainer), then γ and β from the mask through a shared 3×3 conv (128 hidden, ReLU) and two 3×3 convs:
``out = norm(x)·(1 + γ) + β``. Residual-block convs carry spectral norm; a learned 1×1 shortcut where widths differ.

Discriminator: ``num_d`` PatchGANs on successively 3×3/2 average-pooled inputs (mask one-hot ⊕ image). Each is a 4×4
stride-2 conv, then ``n_layers − 1`` spectral-norm + instance-norm convs doubling the width (max 512; the last with
stride 1), then a 4×4 conv to one channel; every layer's output is returned for the feature-matching loss.

Weights are initialised as the official ``xavier`` option: Xavier-normal with gain 0.02, zero biases.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.config import PositiveInt, Range
from toolkit.models.spectral_norm import spectral_norm

UPSAMPLINGS = 5  # 'normal': the generator doubles its resolution five times


@dataclass(frozen=True)
class SPADEConfig:
    """Network sizes; the defaults are the official ones (ngf = ndf = 64, 2 discriminators of 4 layers)."""

    resolution: Annotated[int, Range(ge=1 << UPSAMPLINGS)] = 256  # and a multiple of that: see __post_init__
    label_nc: PositiveInt = 7
    out_channels: PositiveInt = 1
    ngf: PositiveInt = 64
    ndf: PositiveInt = 64
    hidden: PositiveInt = 128
    num_d: PositiveInt = 2
    n_layers_d: PositiveInt = 4

    def __post_init__(self) -> None:
        if self.resolution % (1 << UPSAMPLINGS):
            raise ValueError(f"model.resolution must be a multiple of {1 << UPSAMPLINGS}, got {self.resolution}")

    @property
    def start_size(self) -> int:
        """Side of the first feature map (8 for 256²)."""
        return self.resolution >> UPSAMPLINGS


class SPADE(nn.Module):
    """Spatially-adaptive normalisation: parameter-free BatchNorm modulated by γ, β predicted from the mask."""

    def __init__(self, channels: int, label_nc: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        segmap = F.interpolate(segmap, size=x.shape[-2:], mode="nearest")
        features = self.shared(segmap)
        return self.norm(x) * (1 + self.gamma(features)) + self.beta(features)


class SPADEResBlock(nn.Module):
    """SPADE → lrelu → conv3×3 → SPADE → lrelu → conv3×3, plus the (learned where widths differ) shortcut."""

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int) -> None:
        super().__init__()
        middle = min(fin, fout)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, middle, 3, padding=1))
        self.conv_1 = spectral_norm(nn.Conv2d(middle, fout, 3, padding=1))
        self.norm_0 = SPADE(fin, label_nc, hidden)
        self.norm_1 = SPADE(middle, label_nc, hidden)
        self.learned_shortcut = fin != fout
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))
            self.norm_s = SPADE(fin, label_nc, hidden)

    def forward(self, x: torch.Tensor, segmap: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_s(self.norm_s(x, segmap)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, segmap), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, segmap), 0.2))
        return shortcut + dx


class SPADEGenerator(nn.Module):
    """One-hot mask [N, label_nc, R, R] → image [N, out_channels, R, R] in [−1, 1]."""

    def __init__(self, cfg: SPADEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nf, lc, h = cfg.ngf, cfg.label_nc, cfg.hidden
        self.fc = nn.Conv2d(lc, 16 * nf, 3, padding=1)
        self.head_0 = SPADEResBlock(16 * nf, 16 * nf, lc, h)
        self.middle_0 = SPADEResBlock(16 * nf, 16 * nf, lc, h)
        self.middle_1 = SPADEResBlock(16 * nf, 16 * nf, lc, h)
        widths = (16 * nf, 8 * nf, 4 * nf, 2 * nf, nf)
        self.ups = nn.ModuleList(SPADEResBlock(a, b, lc, h) for a, b in itertools.pairwise(widths))
        self.conv_img = nn.Conv2d(nf, cfg.out_channels, 3, padding=1)
        init_weights(self)

    def forward(self, segmap: torch.Tensor) -> torch.Tensor:
        size = self.cfg.start_size
        x = self.fc(F.interpolate(segmap, size=(size, size), mode="nearest"))
        x = _up(self.head_0(x, segmap))
        x = _up(self.middle_1(self.middle_0(x, segmap), segmap))
        for k, block in enumerate(self.ups):
            x = block(x, segmap)
            if k < len(self.ups) - 1:
                x = _up(x)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 0.2)))


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


class PatchDiscriminator(nn.Module):
    """The official NLayerDiscriminator; returns the output of every layer (the last is the patch score map)."""

    def __init__(self, in_channels: int, ndf: int, n_layers: int) -> None:
        super().__init__()
        pad = math.ceil((4 - 1) / 2)
        layers = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, pad), nn.LeakyReLU(0.2))]
        width = ndf
        for n in range(1, n_layers):
            previous, width = width, min(width * 2, 512)
            stride = 1 if n == n_layers - 1 else 2
            conv = spectral_norm(nn.Conv2d(previous, width, 4, stride, pad, bias=False))  # the norm makes bias moot
            layers.append(nn.Sequential(conv, nn.InstanceNorm2d(width), nn.LeakyReLU(0.2)))
        layers.append(nn.Sequential(nn.Conv2d(width, 1, 4, 1, pad)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for layer in self.layers:
            x = layer(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs, the k-th on the input average-pooled k times (3×3, stride 2, padding not counted)."""

    def __init__(self, cfg: SPADEConfig) -> None:
        super().__init__()
        channels = cfg.label_nc + cfg.out_channels
        self.discriminators = nn.ModuleList(PatchDiscriminator(channels, cfg.ndf, cfg.n_layers_d)
                                            for _ in range(cfg.num_d))
        init_weights(self)

    def forward(self, segmap: torch.Tensor, image: torch.Tensor) -> list[list[torch.Tensor]]:
        x = torch.cat([segmap, image], dim=1)
        outputs = []
        for k, discriminator in enumerate(self.discriminators):
            if k:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            outputs.append(discriminator(x))
        return outputs


def init_weights(module: nn.Module, gain: float = 0.02) -> None:
    """The official ``xavier`` init: Xavier-normal (gain 0.02) conv weights, zero biases.

    Under spectral norm the trained parameter is ``weight_orig``; initialising it is what the official code does (its
    ``weight`` then shares storage with it).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            weight = m.weight_orig if hasattr(m, "weight_orig") else m.weight
            nn.init.xavier_normal_(weight.data, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias.data)


def one_hot(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """Labels [N, R, R] (integer) → float one-hot [N, classes, R, R]."""
    return F.one_hot(labels.long(), classes).permute(0, 3, 1, 2).float()
