"""SPADE networks: the normalisation's arithmetic, block structure (shortcut, spectral norm), generator and
multiscale discriminator shapes, the official initialisation, and the losses."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from toolkit.models.spade import (
    SPADE,
    MultiscaleDiscriminator,
    SPADEConfig,
    SPADEGenerator,
    SPADEResBlock,
    one_hot,
)
from toolkit.train.precision import Precision
from toolkit.train.spade import feature_matching, hinge_d, hinge_g, split_scores, to_uint16, to_unit, train_iteration

TINY = SPADEConfig(resolution=64, ngf=4, ndf=8, hidden=8)


def test_spade_is_parameter_free_batch_norm_modulated_by_the_mask():
    torch.manual_seed(0)
    norm = SPADE(3, label_nc=2, hidden=4)
    assert not [n for n, _ in norm.norm.named_parameters()]  # parameter-free BatchNorm
    x = torch.randn(4, 3, 8, 8) * 5 + 2
    left = torch.zeros(4, 8, 8, dtype=torch.long)
    left[..., 4:] = 1  # right half is class 1
    segmap = one_hot(left, 2)
    for conv in (norm.gamma, norm.beta):
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    plain = norm(x, segmap)
    expected = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True)
                                                                  + 1e-5).view(1, 3, 1, 1)
    assert torch.allclose(plain, expected, atol=1e-5)
    # β from the mask: a 1×1-like kernel reading the class-1 channel shifts only where the mask is class 1
    with torch.no_grad():
        norm.shared[0].weight.zero_()
        norm.shared[0].bias.zero_()
        norm.shared[0].weight[0, 1, 1, 1] = 1.0  # hidden channel 0 = indicator of class 1
        norm.beta.weight[:, 0, 1, 1] = 3.0
    shifted = norm(x, segmap)
    delta = shifted - plain
    assert torch.allclose(delta[..., 5:7], torch.full_like(delta[..., 5:7], 3.0), atol=1e-5)  # inside class 1
    assert torch.allclose(delta[..., :3], torch.zeros_like(delta[..., :3]), atol=1e-5)  # inside class 0


def test_mask_is_resized_nearest_to_every_feature_map():
    norm = SPADE(2, label_nc=3, hidden=4)
    out = norm(torch.randn(2, 2, 4, 4), one_hot(torch.randint(0, 3, (2, 32, 32)), 3))
    assert out.shape == (2, 2, 4, 4)


def test_residual_blocks_learn_a_shortcut_only_when_widths_differ_and_carry_spectral_norm():
    torch.manual_seed(0)
    same, narrower = SPADEResBlock(8, 8, 3, 4), SPADEResBlock(8, 4, 3, 4)
    assert not same.learned_shortcut and not hasattr(same, "conv_s")
    assert narrower.learned_shortcut and narrower.conv_s.bias is None
    assert narrower.conv_0.out_channels == 4  # middle width = min(fin, fout)
    for conv in (narrower.conv_0, narrower.conv_1, narrower.conv_s):
        assert hasattr(conv, "weight_orig")
    segmap = one_hot(torch.randint(0, 3, (2, 16, 16)), 3)
    x = torch.randn(2, 8, 16, 16)
    for _ in range(30):  # power iterations converge in training mode
        narrower(x, segmap)
    w = narrower.conv_0.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2) == pytest.approx(1.0, abs=0.02)


def test_generator_upsamples_five_times_from_resolution_over_32_to_one_tanh_channel():
    torch.manual_seed(0)
    G = SPADEGenerator(TINY)
    assert TINY.start_size == 2
    shapes = []
    G.head_0.register_forward_hook(lambda m, i, o: shapes.append(o.shape[-1]))
    for block in G.ups:
        block.register_forward_hook(lambda m, i, o: shapes.append(o.shape[-1]))
    out = G(one_hot(torch.randint(0, 7, (3, 64, 64)), 7))
    assert out.shape == (3, 1, 64, 64) and out.abs().max() <= 1
    assert shapes == [2, 8, 16, 32, 64]  # head at 2², middles at 4², up_0…up_3 at 8²…64²
    assert [b.conv_1.out_channels for b in G.ups] == [32, 16, 8, 4]  # 16·ngf → 8, 4, 2, 1·ngf
    with pytest.raises(ValueError, match="multiple of 32"):
        SPADEConfig(resolution=48)


def test_paper_generator_and_discriminator_sizes():
    cfg = SPADEConfig()
    G, D = SPADEGenerator(cfg), MultiscaleDiscriminator(cfg)

    def spade(channels):  # shared 3×3 conv (7 → 128) + γ and β 3×3 convs (128 → channels)
        return (7 * 9 * 128 + 128) + 2 * (128 * 9 * channels + channels)

    def block(fin, fout):
        mid = min(fin, fout)
        n = spade(fin) + spade(mid) + (fin * 9 * mid + mid) + (mid * 9 * fout + fout)
        return n + (spade(fin) + fin * fout if fin != fout else 0)

    widths = [1024, 512, 256, 128, 64]
    expected_g = (7 * 9 * 1024 + 1024) + 3 * block(1024, 1024) + sum(block(a, b) for a, b in itertools.pairwise(widths))
    expected_g += 64 * 9 * 1 + 1
    assert sum(p.numel() for p in G.parameters()) == expected_g
    patch = (8 * 16 * 64 + 64) + 64 * 16 * 128 + 128 * 16 * 256 + 256 * 16 * 512 + (512 * 16 * 1 + 1)
    assert sum(p.numel() for p in D.parameters()) == 2 * patch


def test_multiscale_discriminator_returns_every_layer_at_two_scales():
    torch.manual_seed(0)
    D = MultiscaleDiscriminator(TINY)
    segmap, image = one_hot(torch.randint(0, 7, (2, 64, 64)), 7), torch.rand(2, 1, 64, 64)
    outputs = D(segmap, image)
    assert len(outputs) == 2 and all(len(features) == 5 for features in outputs)
    assert [f.shape[1] for f in outputs[0]] == [8, 16, 32, 64, 1]
    # padding 2 with 4×4 kernels: 64 → 33 → 17 → 9 → 10 → 11; the second scale starts from the 32² pooled input
    assert [f.shape[-1] for f in outputs[0]] == [33, 17, 9, 10, 11]
    assert [f.shape[-1] for f in outputs[1]] == [17, 9, 5, 6, 7]


def test_official_xavier_initialisation_with_gain_002():
    torch.manual_seed(0)
    G = SPADEGenerator(SPADEConfig(resolution=32, ngf=16, hidden=32))
    w = G.fc.weight.detach()  # 7 → 256 channels, 3×3
    fan_in, fan_out = 7 * 9, 256 * 9
    assert float(w.std()) == pytest.approx(0.02 * math.sqrt(2 / (fan_in + fan_out)), rel=0.05)
    assert float(G.fc.bias.abs().max()) == 0


def test_hinge_and_feature_matching_losses():
    high, low = torch.full((2, 1, 3, 3), 2.0), torch.full((2, 1, 3, 3), -2.0)
    zero = torch.zeros(2, 1, 3, 3)
    assert float(hinge_d([[high], [high]], real=True)) == 0  # confident and right
    assert float(hinge_d([[zero], [zero]], real=True)) == 1
    assert float(hinge_d([[high], [low]], real=False)) == pytest.approx(1.5)  # (3 + 0) / 2 discriminators
    assert float(hinge_g([[high], [low]])) == 0
    fake = [[torch.ones(2, 4, 3, 3, requires_grad=True), high], [torch.zeros(2, 4, 3, 3), low]]
    real = [[torch.zeros(2, 4, 3, 3, requires_grad=True), zero], [torch.zeros(2, 4, 3, 3), zero]]
    loss = feature_matching(fake, real)
    assert float(loss) == pytest.approx(0.5)  # L1 1 on the first D's only intermediate layer, averaged over 2 Ds
    loss.backward()
    assert real[0][0].grad is None  # real features are targets, not trained through
    both = [[torch.cat([torch.ones(1, 2), torch.zeros(1, 2)])]]
    on_fake, on_real = split_scores(both)
    assert torch.equal(on_fake[0][0], torch.ones(1, 2)) and torch.equal(on_real[0][0], torch.zeros(1, 2))


def test_pixel_l1_term_is_lambda_times_the_mean_absolute_error_of_the_step_fake_and_absent_at_zero():
    torch.manual_seed(0)
    G, D = SPADEGenerator(TINY), MultiscaleDiscriminator(TINY)
    segmap = one_hot(torch.randint(0, TINY.label_nc, (2, 64, 64)), TINY.label_nc)
    real = torch.rand(2, 1, 64, 64) * 2 - 1
    precision = Precision.for_device("fp32", torch.device("cpu"))

    def iteration(G: nn.Module, D: nn.Module, lambda_l1: float) -> dict[str, torch.Tensor]:
        opt_G, opt_D = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (G, D))
        return train_iteration(G, D, opt_G, opt_D, segmap, real, lambda_feat=10.0, lambda_l1=lambda_l1,
                               precision=precision)

    expected = 25.0 * (copy.deepcopy(G)(segmap) - real).abs().mean()  # the fake the G step trains on
    G_plain, D_plain = copy.deepcopy(G), copy.deepcopy(D)
    losses = iteration(G, D, 25.0)
    assert float(losses["loss_g_l1"]) == pytest.approx(float(expected), rel=1e-6)
    plain = iteration(G_plain, D_plain, 0.0)
    assert "loss_g_l1" not in plain  # the paper's recipe: no pixel term
    assert float(plain["loss_g_feat"]) == pytest.approx(float(losses["loss_g_feat"]), rel=1e-6)  # same fake
    moved = [not torch.equal(a, b) for a, b in zip(G.parameters(), G_plain.parameters())]
    assert any(moved)  # the term reaches G's update


def test_uint16_round_trip_through_the_unit_range():
    peak = 4095.0
    raw = torch.arange(0, 4096, dtype=torch.float32)
    assert torch.equal(to_uint16(to_unit(raw, peak), peak), raw.to(torch.int32))
    assert to_uint16(torch.tensor([-1.5, 1.5]), peak).tolist() == [0, 4095]  # clipped to the trained range


def test_bench_spade_reports_the_design_keys_and_consistent_flops(conv_flops):
    from toolkit.bench.spade import bench_spade

    result = bench_spade(TINY, batch=2, steps=1, warmup=1)
    assert {"model", "device", "params_g", "params_d", "gflop_per_image_fwd", "img_per_s", "tflops"} <= result.keys()
    G, D = SPADEGenerator(TINY).eval(), MultiscaleDiscriminator(TINY).eval()
    assert result["params_g"] == sum(p.numel() for p in G.parameters())
    assert result["params_d"] == sum(p.numel() for p in D.parameters())
    # FLOPs counted here from the layer shapes: a training image costs 4 G forwards and 12 D forwards (the module
    # docstring's accounting), and the TFLOP/s are those FLOPs at the measured img/s
    segmap, image = torch.zeros(1, TINY.label_nc, 64, 64), torch.zeros(1, TINY.out_channels, 64, 64)
    g_flops, d_flops = conv_flops(G, segmap), conv_flops(D, segmap, image)
    assert result["gflop_per_image_fwd"] * 1e9 == g_flops
    assert result["gflop_per_image_train"] * 1e9 == pytest.approx(4 * g_flops + 12 * d_flops, rel=1e-12)
    assert result["tflops"] == pytest.approx(result["gflop_per_image_train"] * result["img_per_s"] / 1e3)
    assert result["img_per_s"] * result["train_step_ms"] / 1e3 == pytest.approx(2, rel=1e-9)  # batch 2, one step
