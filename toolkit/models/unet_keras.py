"""The paper's U-Net in Keras 3 (TensorFlow backend), layer for layer the torch :class:`toolkit.models.unet.UNet`.

Owns the Keras graph (:func:`build_keras_unet`) and the weight port from a torch ``UNet`` (:func:`copy_weights`); used
to check our port against the paper's framework and to export trained runs as ``.keras`` files. Architecture only — no
data or training imports. TensorFlow is imported lazily, so importing this module never needs it.

Layout (channels-last ``[N, H, W, C]``): per encoder level two ``Conv2D(3, 'same')`` + ``BatchNormalization`` (momentum
0.99, epsilon 1e-3) + ReLU, then ``MaxPooling2D(2)``; a bridge conv; per decoder level ``Conv2DTranspose(3, strides=2,
padding='same')`` + BN (no ReLU), ``concatenate([up, skip])`` and two conv/BN/ReLU; a 1×1 ``Conv2D`` head with softmax,
as in the paper's original. TensorFlow's 'same' transposed conv feeds input pixel i to outputs 2i + {0, 1, 2}, which is
what the torch ``UpConv`` reproduces (full transposed conv, last row and column cropped), so weights port one to one.

Layer names tie the two models together: ``enc{i}_conv{j}`` / ``enc{i}_bn{j}``, ``bridge_conv`` / ``bridge_bn``,
``dec{i}_up`` / ``dec{i}_up_bn``, ``dec{i}_conv{j}`` / ``dec{i}_bn{j}`` and ``probabilities`` (the head), with ``i``
counted from the top level for the encoder and from the deepest level for the decoder, as the torch ``ModuleList`` s.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np
from torch import nn

from toolkit.models.unet import BN_EPS, UNet, UNetConfig

INSTALL_HINT = "pip install -e '.[keras]'"


def keras_module() -> ModuleType:
    """Import Keras on the TensorFlow backend, or fail with the install command."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up banner is noise on stderr
    try:
        import keras
        import tensorflow  # noqa: F401  (the backend must be importable, not just Keras)
    except ImportError as exc:
        raise ImportError(f"the Keras U-Net needs TensorFlow and Keras 3 ({exc}); install them with "
                          f"`{INSTALL_HINT}`") from exc
    if keras.backend.backend() != "tensorflow":
        raise ImportError(f"the Keras U-Net needs the TensorFlow backend, but Keras runs on "
                          f"{keras.backend.backend()!r}; unset KERAS_BACKEND or set it to 'tensorflow'")
    return keras


def build_keras_unet(config: UNetConfig, image_size: int | None, *,
                     normalisation: tuple[float, float] | None = None) -> Any:
    """The U-Net as a functional ``keras.Model``: input ``[N, S, S, in_channels]``, softmax output ``[N, S, S, C]``.

    ``image_size`` None accepts any size divisible by ``2 ** levels``. ``normalisation = (max, mean)`` puts the
    training scaling ``x / max − mean`` in front as a ``Rescaling`` layer, so the model takes raw intensities.
    """
    keras = keras_module()
    layers = keras.layers
    step = 2 ** config.levels
    if image_size is not None and image_size % step:
        raise ValueError(f"image size {image_size} must be divisible by {step} (2**levels)")

    def conv_bn_relu(x: Any, filters: int, conv: str, bn: str) -> Any:
        x = layers.Conv2D(filters, 3, padding="same", kernel_initializer="he_normal", name=conv)(x)
        x = layers.BatchNormalization(momentum=1 - config.bn_momentum, epsilon=BN_EPS, name=bn)(x)
        return layers.ReLU()(x)

    inputs = keras.Input((image_size, image_size, config.in_channels), name="image")
    x = inputs
    if normalisation is not None:
        peak, mean = normalisation
        x = layers.Rescaling(scale=1.0 / peak, offset=-mean, name="normalise")(x)
    skips = []
    for i, width in enumerate(config.widths):
        x = conv_bn_relu(x, width, f"enc{i}_conv0", f"enc{i}_bn0")
        x = conv_bn_relu(x, width, f"enc{i}_conv1", f"enc{i}_bn1")
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)
    x = conv_bn_relu(x, config.bridge, "bridge_conv", "bridge_bn")
    for i, (width, skip) in enumerate(zip(config.widths[::-1], reversed(skips))):
        x = layers.Conv2DTranspose(width, 3, strides=2, padding="same", kernel_initializer="he_normal",
                                   name=f"dec{i}_up")(x)
        x = layers.BatchNormalization(momentum=1 - config.bn_momentum, epsilon=BN_EPS, name=f"dec{i}_up_bn")(x)
        x = layers.Concatenate(axis=-1)([x, skip])
        x = conv_bn_relu(x, width, f"dec{i}_conv0", f"dec{i}_bn0")
        x = conv_bn_relu(x, width, f"dec{i}_conv1", f"dec{i}_bn1")
    outputs = layers.Conv2D(config.classes, 1, activation="softmax", kernel_initializer="he_normal",
                            name="probabilities")(x)
    return keras.Model(inputs, outputs, name="unet")


def _conv_weights(conv: nn.Conv2d | nn.ConvTranspose2d) -> list[np.ndarray]:
    """Kernel and bias in Keras layout.

    torch Conv2d ``(out, in, kh, kw)`` → Conv2D ``(kh, kw, in, out)``; torch ConvTranspose2d ``(in, out, kh, kw)`` →
    Conv2DTranspose ``(kh, kw, out, in)``: the same axis permutation for both, and no spatial flip (both frameworks
    define the transposed conv as the adjoint of the same cross-correlation).
    """
    kernel = conv.weight.detach().cpu().permute(2, 3, 1, 0).numpy()
    return [kernel, conv.bias.detach().cpu().numpy()]


def _bn_weights(bn: nn.BatchNorm2d) -> list[np.ndarray]:
    """Keras BatchNormalization order: gamma, beta, moving mean, moving variance."""
    return [t.detach().cpu().numpy() for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)]


def layer_pairs(torch_unet: UNet) -> list[tuple[str, list[np.ndarray]]]:
    """``(Keras layer name, weights in Keras layout)`` for every torch module that holds weights."""
    pairs: list[tuple[str, list[np.ndarray]]] = []

    def double(prefix: str, block: nn.Sequential) -> None:
        for j, conv_bn_relu in enumerate(block):
            pairs.append((f"{prefix}_conv{j}", _conv_weights(conv_bn_relu[0])))
            pairs.append((f"{prefix}_bn{j}", _bn_weights(conv_bn_relu[1])))

    for i, level in enumerate(torch_unet.encoder):
        double(f"enc{i}", level)
    pairs.append(("bridge_conv", _conv_weights(torch_unet.bridge[0])))
    pairs.append(("bridge_bn", _bn_weights(torch_unet.bridge[1])))
    for i, level in enumerate(torch_unet.decoder):
        pairs.append((f"dec{i}_up", _conv_weights(level.up.conv)))
        pairs.append((f"dec{i}_up_bn", _bn_weights(level.up.bn)))
        double(f"dec{i}", level.convs)
    pairs.append(("probabilities", _conv_weights(torch_unet.head)))
    return pairs


def copy_weights(torch_unet: UNet, keras_model: Any) -> None:
    """Set every weight of ``keras_model`` (from :func:`build_keras_unet`) from ``torch_unet``, BN statistics included.

    Raises ``ValueError`` when the architectures differ: a shape mismatch, or a Keras layer with weights left unset.
    """
    pairs = layer_pairs(torch_unet)
    for name, weights in pairs:
        try:
            layer = keras_model.get_layer(name)
        except ValueError as exc:
            raise ValueError(f"Keras model has no layer {name!r} for the torch U-Net's weights") from exc
        expected = [tuple(w.shape) for w in layer.weights]
        if expected != [w.shape for w in weights]:
            raise ValueError(f"layer {name}: Keras weight shapes {expected} differ from the torch U-Net's "
                             f"{[w.shape for w in weights]} (different widths, classes or input channels?)")
        layer.set_weights(weights)
    unset = sorted({layer.name for layer in keras_model.layers if layer.weights} - {name for name, _ in pairs})
    if unset:
        raise ValueError(f"Keras layers {unset} have no counterpart in the torch U-Net")
