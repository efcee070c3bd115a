"""The Keras U-Net against the torch one: same outputs after a weight port (BN statistics included), same parameter
counts, normalisation layer, architecture mismatches refused, and a clear error without TensorFlow."""

import sys

import numpy as np
import pytest
import torch

from toolkit.models.unet import UNet, UNetConfig, count_parameters
from toolkit.models.unet_keras import build_keras_unet, copy_weights, keras_module

SMALL = UNetConfig(classes=7, widths=(8, 16, 32, 64), bridge=128)
SIZE = 64
TOLERANCE = 1e-5


def randomised_unet(config: UNetConfig, seed: int = 0) -> UNet:
    """A torch U-Net in eval mode whose BN statistics, BN affine parameters and conv biases are all non-trivial, so a
    port that drops or swaps any of them changes the output."""
    torch.manual_seed(seed)
    model = UNet(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.2)
            elif isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def torch_probs(model: UNet, x_nchw: torch.Tensor) -> np.ndarray:
    """Softmax output of the torch model, channels-last like Keras."""
    with torch.no_grad():
        return model.predict_proba(x_nchw).permute(0, 2, 3, 1).numpy()


@pytest.mark.keras
def test_ported_keras_unet_matches_torch(keras):
    model = randomised_unet(SMALL)
    keras_model = build_keras_unet(SMALL, SIZE)
    x = torch.randn(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    expected = torch_probs(model, x)
    before = keras_model(x.permute(0, 2, 3, 1).numpy(), training=False).numpy()
    copy_weights(model, keras_model)
    got = keras_model(x.permute(0, 2, 3, 1).numpy(), training=False).numpy()
    assert got.shape == (3, SIZE, SIZE, SMALL.classes)
    diff = float(np.abs(got - expected).max())
    print(f"torch vs Keras max abs diff: {diff:.3g}")
    assert diff < TOLERANCE, diff
    # the comparison can fail: the freshly initialised Keras model disagrees, and the outputs are far from uniform
    assert float(np.abs(before - expected).max()) > 0.1
    assert float(expected.max(-1).mean()) > 1.5 / SMALL.classes


@pytest.mark.keras
def test_parameter_counts_match(keras):
    model = UNet(SMALL)
    keras_model = build_keras_unet(SMALL, SIZE)
    trainable = sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)
    bn_channels = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert trainable == count_parameters(model)
    assert keras_model.count_params() == count_parameters(model) + 2 * bn_channels


@pytest.mark.keras
def test_normalisation_layer_scales_raw_intensities(keras):
    model = randomised_unet(SMALL, seed=2)
    peak, mean = 3000.0, 0.12
    raw = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * peak
    keras_model = build_keras_unet(SMALL, None, normalisation=(peak, mean))
    copy_weights(model, keras_model)
    got = keras_model(raw.permute(0, 2, 3, 1).numpy(), training=False).numpy()
    assert float(np.abs(got - torch_probs(model, raw / peak - mean)).max()) < TOLERANCE


@pytest.mark.keras
def test_mismatched_architectures_are_refused(keras):
    with pytest.raises(ValueError, match="enc0_conv0"):
        copy_weights(UNet(UNetConfig(widths=(4, 8, 16, 32), bridge=128)), build_keras_unet(SMALL, SIZE))
    with pytest.raises(ValueError, match="no layer 'enc3_conv0'"):
        copy_weights(UNet(SMALL), build_keras_unet(UNetConfig(widths=(8, 16, 32), bridge=128), SIZE))
    with pytest.raises(ValueError, match="divisible by 16"):
        build_keras_unet(SMALL, 40)


def test_missing_tensorflow_names_the_install_command(monkeypatch):
    for name in ("keras", "tensorflow"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError, installed or not
    with pytest.raises(ImportError, match=r"pip install -e '\.\[keras\]'"):
        keras_module()
