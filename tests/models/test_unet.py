"""The paper's U-Net: shapes, layer widths, parameter count, Keras-style initialisation, transposed-conv semantics,
memory formats, gradients, and the CPU benchmark."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.bench.unet import bench_unet
from toolkit.models.unet import UNet, UNetConfig, UpConv, count_parameters

TINY = UNetConfig(widths=(4, 8, 16, 32), bridge=64)
PAPER_WIDTHS = (64, 128, 256, 512)


@pytest.fixture(scope="module")
def paper() -> UNet:
    """The paper configuration (1 input channel, 7 classes, 64…512 widths, 1024 bridge)."""
    torch.manual_seed(0)
    return UNet(UNetConfig())


def _convs(model: nn.Module) -> list[nn.Conv2d | nn.ConvTranspose2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]


@pytest.mark.parametrize(("size", "classes", "in_channels", "widths"), [
    (32, 7, 1, (4, 8, 16, 32)), (64, 4, 1, (4, 8, 16, 32)), (64, 2, 3, (4, 8, 16, 32)), (24, 3, 1, (4, 8, 16)),
])
def test_output_shape(size, classes, in_channels, widths):
    model = UNet(UNetConfig(in_channels=in_channels, classes=classes, widths=widths, bridge=2 * widths[-1]))
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, classes, size, size)
    probs = model.predict_proba(torch.randn(1, in_channels, size, size))
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, size, size), atol=1e-5)


def test_rejects_input_not_divisible_by_levels():
    with pytest.raises(ValueError, match="divisible by 16"):
        UNet(TINY)(torch.randn(1, 1, 40, 40))


def test_config_validates_and_freezes_lists():
    assert UNetConfig(widths=[8, 16]).widths == (8, 16)
    with pytest.raises(ValueError, match=r"unet\.widths"):
        UNetConfig(widths=())
    with pytest.raises(ValueError, match=r"unet\.classes"):
        UNetConfig(classes=0)


def test_paper_parameter_count(paper):
    def conv(k: int, c_in: int, c_out: int) -> int:  # kernel + bias (transposed convs count the same)
        return k * k * c_in * c_out + c_out

    def bn(c: int) -> int:  # gamma + beta
        return 2 * c

    expected, c_in = 0, 1
    for w in PAPER_WIDTHS:
        expected += conv(3, c_in, w) + bn(w) + conv(3, w, w) + bn(w)
        c_in = w
    expected += conv(3, 512, 1024) + bn(1024)
    c_in = 1024
    for w in reversed(PAPER_WIDTHS):
        expected += conv(3, c_in, w) + bn(w)  # transposed conv + BN
        expected += conv(3, 2 * w, w) + bn(w) + conv(3, w, w) + bn(w)  # after concatenation with the skip
        c_in = w
    expected += conv(1, 64, 7)
    assert expected == 25_086_023
    assert count_parameters(paper) == expected


def test_layer_structure_matches_paper(paper):
    seq = [(f"T{m.out_channels}" if isinstance(m, nn.ConvTranspose2d) else m.out_channels, m.kernel_size[0])
           for m in _convs(paper)]
    widths = [w for w, _ in seq]
    assert widths == [64, 64, 128, 128, 256, 256, 512, 512, 1024, "T512", 512, 512, "T256", 256, 256,
                      "T128", 128, 128, "T64", 64, 64, 7]
    assert [k for _, k in seq] == [3] * 21 + [1]
    assert all(m.bias is not None for m in _convs(paper))
    # Every 3×3 conv is followed by BN then ReLU; every transposed conv by BN only.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in paper.modules()) == 21
    assert sum(isinstance(m, nn.ReLU) for m in paper.modules()) == 17
    assert sum(isinstance(m, nn.MaxPool2d) for m in paper.modules()) == 1  # one module, applied 4 times


def test_he_normal_truncated_init(paper):
    trunc_std = 0.87962566103423978  # std of a standard normal truncated to [-2, 2] (Keras' correction)
    conv = paper.encoder[2][1][0]  # 256 -> 256, 3×3: 589,824 weights
    up = paper.decoder[1].up.conv  # ConvTranspose 512 -> 256; Keras fan_in = 3·3·256 (its filters)
    assert isinstance(up, nn.ConvTranspose2d) and up.weight.shape == (512, 256, 3, 3)
    for layer, fan_in in ((conv, 9 * 256), (up, 9 * 256)):
        w = layer.weight.detach()
        target = math.sqrt(2.0 / fan_in)
        assert w.std().item() == pytest.approx(target, rel=0.02)
        assert abs(w.mean().item()) < 0.01 * target
        assert w.abs().max().item() <= 2.0 * target / trunc_std + 1e-7  # truncated at 2σ of the sampling normal
        assert w.abs().max().item() > 1.9 * target / trunc_std  # …and really reaches out there
    for layer in _convs(paper):
        assert torch.count_nonzero(layer.bias) == 0
    for bn in (m for m in paper.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.momentum == 0.01 and bn.eps == 1e-3
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_transposed_conv_doubles_size_with_tensorflow_placement():
    torch.manual_seed(0)
    up = UpConv(3, 5)
    nn.init.normal_(up.conv.bias)
    x = torch.randn(2, 3, 7, 9)
    out = up.conv(x)[..., :-1, :-1]
    assert up(x).shape == (2, 5, 14, 18)
    # TensorFlow's 'same' transposed conv is the adjoint of conv2d(stride 2) with the odd padding at bottom/right.
    z = torch.zeros(2, 5, 14, 18, requires_grad=True)
    y = F.conv2d(F.pad(z, (0, 1, 0, 1)), up.conv.weight.detach(), stride=2)
    (reference,) = torch.autograd.grad(y, z, grad_outputs=x)
    reference = reference + up.conv.bias.detach().view(1, -1, 1, 1)
    assert torch.allclose(out, reference, atol=1e-5)


def test_channels_last_matches_contiguous():
    torch.manual_seed(0)
    model = UNet(TINY).eval()
    x = torch.randn(2, 1, 64, 64)
    expected = model(x)
    model = model.to(memory_format=torch.channels_last)
    got = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_autocast_bf16_forward():
    model = UNet(TINY).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 1, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet(TINY)
    logits = model(torch.randn(2, 1, 32, 32))
    F.cross_entropy(logits, torch.randint(0, 7, (2, 32, 32))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_bench_unet_cpu():
    result = bench_unet(TINY, device="cpu", batch=2, size=32, steps=2, warmup=1)
    assert {"model", "device", "params", "gflop_per_image_fwd", "img_per_s", "tflops", "batch", "size", "amp",
            "channels_last", "compile"} <= result.keys()
    assert result["model"] == "unet" and result["device"] == "cpu"
    assert result["params"] == count_parameters(UNet(TINY))
    assert result["amp"] is False and result["channels_last"] is False and result["compile"] is False
    for key in ("params", "gflop_per_image_fwd", "img_per_s", "tflops"):
        assert result[key] > 0, key


def test_channels_last_survives_the_transposed_conv_crop_under_global_batchnorm():
    from toolkit.models.unet import UpConv
    from toolkit.train.syncbn import convert

    up = convert(UpConv(8, 4), all_reduce=lambda t: t)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    out = up(x)
    assert out.shape == (2, 4, 12, 12)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert up(torch.randn(2, 8, 6, 6)).is_contiguous()  # NCHW in, NCHW out


def test_bn_momentum_reaches_every_batchnorm_and_the_default_is_keras():
    fast = UNet(UNetConfig(widths=(4, 8), bridge=8, bn_momentum=0.1))
    norms = [m for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 2 * 2 + 1 + 2 * 3 and {m.momentum for m in norms} == {0.1}
    assert {m.momentum for m in UNet(TINY).modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.01}
    with pytest.raises(ValueError, match="bn_momentum"):
        UNetConfig(bn_momentum=0.0)
