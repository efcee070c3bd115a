"""The paper's segmentation U-Net (a port of its Keras original): config, module, initialisation, parameter count.

Architecture only — no data or training imports. ``UNet.forward`` returns logits ``[N, C, H, W]``; a softmax over the
channel dimension (``UNet.predict_proba``) is the paper's output layer, kept out of ``forward`` so the loss can fuse it.

Layout for ``widths = (64, 128, 256, 512)``, ``bridge = 1024`` (every 3×3 conv is 'same', bias on, then BN, then ReLU):

    encoder   [conv 64, conv 64] pool [128, 128] pool [256, 256] pool [512, 512] pool
    bridge    conv 1024, transposed conv 512 (3×3, stride 2) + BN
    decoder   cat(up, skip512) [512, 512] T256+BN  cat [256, 256] T128+BN  cat [128, 128] T64+BN  cat [64, 64]
    head      1×1 conv to C classes

Concatenation order is ``(upsampled, skip)`` along channels, like Keras' ``concatenate([up, skip])``, so Keras weights
map onto this module slice for slice. The transposed convs have no ReLU (the original applies BN only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

# Keras BatchNormalization defaults: moving = 0.99·moving + 0.01·batch, i.e. PyTorch momentum 0.01; epsilon 1e-3.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3


@dataclass(frozen=True)
class UNetConfig:
    """U-Net hyperparameters. The defaults are the paper's (1×256² input, 7 classes); the CPU demo narrows
    ``widths`` (e.g. ``(8, 16, 32, 64)``, ``bridge=128``)."""

    in_channels: int = 1
    classes: int = 7
    widths: tuple[int, ...] = (64, 128, 256, 512)
    bridge: int = 1024
    # BatchNorm's running-statistics update rate; the paper's Keras default suits 150 epochs, a few-epoch run (the CPU
    # demo) needs a faster one, or eval mode normalises with statistics still close to their initial values
    bn_momentum: float = BN_MOMENTUM

    def __post_init__(self) -> None:
        # YAML yields lists; keep the frozen config hashable and comparable.
        object.__setattr__(self, "widths", tuple(self.widths))
        for name, value in (("in_channels", self.in_channels), ("classes", self.classes), ("bridge", self.bridge)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"unet.{name}: expected a positive integer, got {value!r}")
        if not 0.0 < self.bn_momentum <= 1.0:
            raise ValueError(f"unet.bn_momentum: expected a value in (0, 1], got {self.bn_momentum!r}")
        if not self.widths or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"unet.widths: expected a non-empty list of positive integers, got {self.widths!r}")

    @property
    def levels(self) -> int:
        """Number of encoder (and decoder) levels; inputs must be divisible by ``2 ** levels``."""
        return len(self.widths)


# Keras' truncated normal cuts at ±2σ and (Keras ≥ 2.2.3, tf.keras) divides σ by the std of a standard normal
# truncated to [-2, 2], so the *realised* std is exactly sqrt(2 / fan_in). Closed form of that std:
# var = 1 − 2·2·φ(2) / (Φ(2) − Φ(−2)), with Φ(2) − Φ(−2) = erf(√2).
_TRUNC_STD = math.sqrt(1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2.0 * math.pi) / math.erf(math.sqrt(2.0)))


def keras_fan_in(layer: nn.Conv2d | nn.ConvTranspose2d) -> int:
    """Fan-in as Keras computes it for the equivalent layer's kernel.

    Conv2D kernel ``(k, k, in, out)``: fan_in = k·k·in. Conv2DTranspose kernel ``(k, k, out, in)``: Keras reads the
    second-last axis, so fan_in = k·k·**out** (the filters), not the layer's input channels. We follow Keras exactly.
    """
    receptive = layer.kernel_size[0] * layer.kernel_size[1]
    channels = layer.out_channels if isinstance(layer, nn.ConvTranspose2d) else layer.in_channels
    return receptive * channels // layer.groups


def he_normal_(layer: nn.Conv2d | nn.ConvTranspose2d) -> None:
    """Keras ``he_normal`` on the kernel (truncated normal, realised std sqrt(2 / fan_in)) and a zero bias."""
    sigma = math.sqrt(2.0 / keras_fan_in(layer)) / _TRUNC_STD
    nn.init.trunc_normal_(layer.weight, mean=0.0, std=sigma, a=-2.0 * sigma, b=2.0 * sigma)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with Keras defaults (gamma 1, beta 0 are PyTorch's defaults too)."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class ConvBNReLU(nn.Sequential):
    """3×3 'same' convolution (with bias, as Keras' default), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True), _bn(out_channels),
                         nn.ReLU(inplace=True))


class DoubleConv(nn.Sequential):
    """Two ``ConvBNReLU`` — one encoder or decoder level."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(ConvBNReLU(in_channels, out_channels), ConvBNReLU(out_channels, out_channels))


class UpConv(nn.Module):
    """Keras ``Conv2DTranspose(3, strides=2, padding='same')`` + BN: output exactly twice the input size.

    TensorFlow's 'same' transposed conv is the adjoint of a stride-2 conv whose odd padding goes to the bottom/right,
    so input pixel i feeds outputs 2i + {0, 1, 2}. PyTorch's ``padding=1, output_padding=1`` gives the right size but
    feeds 2i + {−1, 0, 1}: a one-pixel phase shift, which would break a weight-for-weight port of the Keras model.
    Instead: the full (2H + 1) transposed conv, then drop the last row and column, exactly TensorFlow's placement.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=0, bias=True)
        self.bn = _bn(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``[N, in, H, W]`` to ``[N, out, 2H, 2W]``, in the input's memory format."""
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        # the crop is a strided view; made dense in the input's format, so channels_last survives BatchNorm and the
        # decoder's convs (an elementwise op on a non-dense view returns NCHW)
        return self.bn(self.conv(x)[..., :-1, :-1].contiguous(memory_format=fmt))


class DecoderLevel(nn.Module):
    """Upsample, concatenate ``(upsampled, skip)`` on channels, then two convs at the skip's width."""

    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.up = UpConv(in_channels, width)
        self.convs = DoubleConv(2 * width, width)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Decode one level; ``skip`` comes from the encoder level of the same resolution."""
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """The paper's U-Net. Submodules are registered in forward order (encoder, bridge, decoder, head)."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        widths = self.config.widths
        self.encoder = nn.ModuleList(DoubleConv(c_in, c_out)
                                     for c_in, c_out in zip((self.config.in_channels, *widths[:-1]), widths))
        self.pool = nn.MaxPool2d(2)
        self.bridge = ConvBNReLU(widths[-1], self.config.bridge)
        # Deepest level first: the bridge feeds the first upsampling, each decoder level feeds the next.
        self.decoder = nn.ModuleList(DecoderLevel(c_in, c_out) for c_in, c_out in
                                     zip((self.config.bridge, *widths[:0:-1]), widths[::-1]))
        self.head = nn.Conv2d(widths[0], self.config.classes, 1, bias=True)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                he_normal_(module)
            elif isinstance(module, nn.BatchNorm2d):
                module.momentum = self.config.bn_momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, classes, H, W]`` for images ``[N, in_channels, H, W]`` (H, W divisible by 2**levels)."""
        step = 2 ** self.config.levels
        if x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f"UNet input {tuple(x.shape[-2:])} must be divisible by {step} (2**levels)")
        skips = []
        for level in self.encoder:
            x = level(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bridge(x)
        for level, skip in zip(self.decoder, reversed(skips)):
            x = level(x, skip)
        return self.head(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities: the softmax over channels that the paper's output layer applies."""
        return torch.softmax(self.forward(x), dim=1)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable and frozen) of ``model``.

    Buffers are not counted: Keras' ``summary()`` "Total params" additionally includes the BatchNorm moving mean and
    variance (2 per channel, "non-trainable"), so it exceeds this by twice the BatchNorm channels.
    """
    return sum(p.numel() for p in model.parameters())
