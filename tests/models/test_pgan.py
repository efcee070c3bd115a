"""Progressive GAN networks: shapes, equalised learning rate, pixel norm, minibatch stddev, the lod fade (G, D and
reals), paper-config parameter counts, gradients, label conditioning (``label_size``)."""

import dataclasses
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from toolkit.models.pgan import (
    Discriminator,
    EqualizedConv2d,
    EqualizedLinear,
    Generator,
    MinibatchStddev,
    PGANConfig,
    blend_reals,
    pixel_norm,
    split_lod,
)

TINY = PGANConfig(resolution=32, latent=16, fmap_base=64, fmap_max=16)  # widths 16, 16, 16, 8 at 4², 8², 16², 32²
LODS = (0.0, 0.25, 1.0, 1.5, 2.0, 2.75, 3.0)


@pytest.fixture(scope="module")
def tiny() -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    return Generator(TINY), Discriminator(TINY)


@pytest.fixture(scope="module")
def paper() -> tuple[Generator, Discriminator]:
    torch.manual_seed(0)
    return Generator(PGANConfig()), Discriminator(PGANConfig())


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_config_widths_and_validation():
    c = PGANConfig()
    assert [c.nf(r - 1) for r in range(2, 9)] == [512, 512, 512, 512, 256, 128, 64]
    assert c.max_lod == 6 and c.nf(0) == 512
    with pytest.raises(ValueError, match="power of two"):
        PGANConfig(resolution=48)
    with pytest.raises(ValueError, match=r"pgan\.channels"):
        PGANConfig(channels=0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("lod", LODS)
def test_shapes(channels, lod):
    torch.manual_seed(0)
    config = PGANConfig(resolution=32, channels=channels, latent=16, fmap_base=64, fmap_max=16)
    G, D = Generator(config), Discriminator(config)
    images = G(torch.randn(4, 16), lod)
    assert images.shape == (4, channels, 32, 32)
    assert D(images, lod).shape == (4, 1)
    assert blend_reals(images, lod).shape == images.shape


def test_lod_out_of_range(tiny):
    G, D = tiny
    for lod in (-0.1, 3.01):
        with pytest.raises(ValueError, match="lod"):
            G(torch.randn(2, 16), lod)
        with pytest.raises(ValueError, match="lod"):
            D(torch.randn(2, 1, 32, 32), lod)


def _equalized(model: torch.nn.Module) -> list[EqualizedConv2d | EqualizedLinear]:
    return [m for m in model.modules() if isinstance(m, EqualizedConv2d | EqualizedLinear)]


def test_equalized_lr_default_gain(paper):
    """Stored weights ~ N(0, 1), biases 0; effective weight std = gain / sqrt(fan_in), gain √2 unless special."""
    G, D = paper
    special = {id(G.blocks[0].dense): math.sqrt(2) / 4, id(D.blocks[0].dense1): 1.0}
    special.update({id(m): 1.0 for m in G.to_rgb})
    for layer in _equalized(G) + _equalized(D):
        w = layer.weight.detach()
        fan_in = w[0].numel()
        gain = special.get(id(layer), math.sqrt(2))
        assert layer.scale == pytest.approx(gain / math.sqrt(fan_in), rel=1e-12)
        if w.numel() >= 10_000:  # enough samples for a tight estimate
            assert abs(float(w.mean())) < 0.02 and float(w.std()) == pytest.approx(1.0, abs=0.03)
            assert float((w * layer.scale).std()) == pytest.approx(gain / math.sqrt(fan_in), rel=0.03)
        if layer.bias is not None:
            assert torch.all(layer.bias == 0)


def test_equalized_lr_special_gains(paper):
    G, D = paper
    assert G.blocks[0].dense.scale == pytest.approx(math.sqrt(2) / 4 / math.sqrt(512))
    assert G.blocks[0].dense.bias is None and torch.all(G.blocks[0].bias == 0)  # per-channel bias after reshape
    assert [m.scale for m in G.to_rgb] == pytest.approx([1 / math.sqrt(w) for w in (512,) * 4 + (256, 128, 64)])
    assert D.blocks[0].dense1.scale == pytest.approx(1 / math.sqrt(512))
    assert D.blocks[0].dense0.scale == pytest.approx(math.sqrt(2) / math.sqrt(512 * 16))
    assert D.from_rgb[-1].conv.scale == pytest.approx(math.sqrt(2))  # 1×1 conv on one channel


def test_pixel_norm_unit_mean_square():
    x = torch.randn(3, 7, 5, 5) * 10 + 2
    y = pixel_norm(x)
    assert torch.allclose(y.square().mean(dim=1), torch.ones(3, 5, 5), atol=1e-5)
    assert torch.allclose(pixel_norm(torch.randn(4, 512)).square().mean(dim=1), torch.ones(4), atol=1e-5)


def _mbstd_direct(x: torch.Tensor, group: int) -> torch.Tensor:
    """Per-sample stddev feature, computed sample by sample: sample i's group is {i mod M + j·M}."""
    n = len(x)
    g = min(group, n)
    m = n // g
    out = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        members = x[[i % m + j * m for j in range(g)]].double()
        var = ((members - members.mean(dim=0)) ** 2).mean(dim=0)  # biased
        out[i] = torch.sqrt(var + 1e-8).mean()
    return out


@pytest.mark.parametrize(("n", "group"), [(8, 4), (12, 4), (2, 4), (4, 4), (6, 2)])
def test_minibatch_stddev_matches_direct(n, group):
    torch.manual_seed(n)
    x = torch.randn(n, 5, 4, 4) * torch.arange(1, n + 1).view(n, 1, 1, 1)  # groups differ in spread
    y = MinibatchStddev(group)(x)
    assert y.shape == (n, 6, 4, 4) and torch.equal(y[:, :5], x)
    feature = y[:, 5]
    assert torch.all(feature == feature[:, :1, :1])  # constant over pixels
    expected = _mbstd_direct(x, group)
    assert torch.allclose(feature[:, 0, 0].double(), expected, rtol=1e-5)
    m = n // min(group, n)
    if m > 1:  # strided groups: sample i shares the value of i + M, not of i + 1
        assert feature[0, 0, 0] == feature[m, 0, 0] and feature[0, 0, 0] != feature[1, 0, 0]


def test_minibatch_stddev_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="divisible"):
        MinibatchStddev(4)(torch.randn(6, 2, 4, 4))


def test_split_lod_alpha():
    assert split_lod(3, 3) == (0, 1.0)  # 4×4, stable
    assert split_lod(2, 3) == (1, 1.0)  # 8×8 stable: the block is fully on
    assert split_lod(0, 3) == (3, 1.0)
    level, alpha = split_lod(2.999999, 3)  # just after the fade into 8×8 starts: the block is (almost) off
    assert level == 1 and alpha == pytest.approx(0.0, abs=1e-5)
    assert split_lod(1.25, 3) == (2, 0.75)


def test_generator_fade_is_a_lerp_and_continuous(tiny):
    G, _ = tiny
    z = torch.randn(4, 16)
    with torch.no_grad():
        stable = {k: G(z, float(k)) for k in range(4)}
        for k in range(3):
            for t in (0.25, 0.5, 0.9):  # official: lerp(new, upsampled previous, lod − k)
                assert torch.allclose(G(z, k + t), torch.lerp(stable[k], stable[k + 1], t), atol=1e-5)
            assert torch.allclose(G(z, k + 1e-6), stable[k], atol=1e-4)
            assert torch.allclose(G(z, k + 1 - 1e-6), stable[k + 1], atol=1e-4)
    # at lod k the output is constant on 2**k blocks (nearest upsampling of the current resolution)
    low = stable[2]
    assert torch.equal(low, F.interpolate(low[..., ::4, ::4], scale_factor=4, mode="nearest"))


def test_discriminator_fade_is_continuous(tiny):
    _, D = tiny
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        for k in range(3):
            assert torch.allclose(D(x, k + 1e-6), D(x, float(k)), atol=1e-4)
            assert torch.allclose(D(x, k + 1 - 1e-6), D(x, float(k + 1)), atol=1e-4)
            assert not torch.allclose(D(x, k + 0.5), D(x, float(k)), atol=1e-4)
            # D only sees the current resolution: blending the reals first changes nothing at an integer lod
            assert torch.allclose(D(blend_reals(x, float(k)), float(k)), D(x, float(k)), atol=1e-5)


def _box_down_up(x: torch.Tensor, factor: int) -> torch.Tensor:
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))
    return y.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def test_blend_reals():
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(blend_reals(x, 0.0), x)
    for k in range(4):
        assert torch.allclose(blend_reals(x, float(k)), _box_down_up(x, 2**k), atol=1e-6)
    for lod in (0.3, 1.5, 2.75):  # the image lerps towards its 2×2-box-down/nearest-up copy
        k, t = math.floor(lod), lod - math.floor(lod)
        expected = torch.lerp(_box_down_up(x, 2**k), _box_down_up(x, 2 ** (k + 1)), t)
        assert torch.allclose(blend_reals(x, lod), expected, atol=1e-6)
    with pytest.raises(ValueError, match="power-of-two"):
        blend_reals(torch.randn(1, 1, 24, 24), 0.0)


def test_paper_parameter_counts(paper):
    """Counted from the layer list in the official code: conv k×k = k²·in·out + out, dense = in·out (+ out)."""
    G, D = paper

    def conv(k: int, c_in: int, c_out: int) -> int:
        return k * k * c_in * c_out + c_out

    widths = [512, 512, 512, 512, 256, 128, 64]  # 4² … 256²
    g = 512 * 512 * 16 + 512 + conv(3, 512, 512)  # dense (no bias) + per-channel bias, 4×4 conv
    g += sum(conv(3, a, b) + conv(3, b, b) for a, b in itertools.pairwise(widths))
    g += sum(conv(1, w, 1) for w in widths)  # ToRGB at every resolution
    d = conv(3, 513, 512) + (512 * 16 * 512 + 512) + (512 + 1)  # mbstd conv, Dense0, Dense1
    d += sum(conv(3, b, b) + conv(3, b, a) for a, b in itertools.pairwise(widths))
    d += sum(conv(1, 1, w) for w in widths)  # FromRGB
    assert _params(G) == g == 23_039_303
    assert _params(D) == d == 23_047_361


def test_gradients_reach_every_parameter(tiny):
    G, D = tiny
    lower_rgb = {id(p) for m in (*G.to_rgb[:-1], *D.from_rgb[:-1]) for p in m.parameters()}
    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    D(G(torch.randn(4, 16), 0.0), 0.0).sum().backward()
    for name, p in [*G.named_parameters(), *D.named_parameters()]:
        if id(p) in lower_rgb:  # lower-resolution ToRGB/FromRGB are unused at full resolution
            assert p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    # during the fade into full resolution the previous ToRGB/FromRGB are live too
    G.zero_grad(set_to_none=True)
    D.zero_grad(set_to_none=True)
    D(G(torch.randn(4, 16), 0.5), 0.5).sum().backward()
    assert G.to_rgb[-2].weight.grad.abs().sum() > 0 and D.from_rgb[-2].conv.weight.grad.abs().sum() > 0


def _schedule_hours(rates_stable: dict, rates_fading: dict, schedule) -> float:
    """Hours of ``schedule`` at the given img/s, iteration by iteration (the slow way, independent of the bench)."""
    from toolkit.train.pgan_schedule import ticks

    seconds = 0.0
    for tick in ticks(schedule):
        for _, lod, minibatch in tick.iterations:
            resolution = str(2 ** (schedule.resolution_log2 - math.floor(lod)))
            rate = rates_fading[resolution] if lod != math.floor(lod) else rates_stable[resolution]
            seconds += schedule.minibatch_repeats * minibatch / rate
    return seconds / 3600


def test_bench_pgan_projects_the_schedule_from_its_per_resolution_rates():
    from toolkit.bench.pgan import bench_pgan
    from toolkit.train.pgan_schedule import ScheduleConfig

    # 1 kimg per phase: 4² stable, then fade and stable at 8², 16², 32²
    schedule = ScheduleConfig(resolution=TINY.resolution, total_kimg=7, lod_training_kimg=1, lod_transition_kimg=1,
                              minibatch={4: 8, 8: 8, 16: 4, 32: 4})
    doc = bench_pgan(TINY, schedule, steps=1, warmup=1)
    assert doc["precision"] == "fp32" and doc["batch"] == 4 and doc["total_kimg"] == 7
    stable, fading = doc["img_per_s_stable"], doc["img_per_s_fading"]
    assert stable.keys() == {"4", "8", "16", "32"} and fading.keys() == {"8", "16", "32"}
    assert all(math.isfinite(r) and r > 0 for r in (*stable.values(), *fading.values()))
    assert doc["img_per_s"] == stable["32"] and doc["img_per_s_per_resolution"] == stable
    hours = doc["projected_hours"]
    assert math.isfinite(hours) and hours > 0
    assert hours == pytest.approx(_schedule_hours(stable, fading, schedule), rel=1e-9)


def test_a_bf16_wgan_gp_step_keeps_fp32_weights_and_finite_losses():
    from toolkit.train.distributed import Dist
    from toolkit.train.pgan import WGANGP, PGANOptimConfig
    from toolkit.train.precision import Precision

    torch.manual_seed(0)
    nets = WGANGP(TINY, PGANOptimConfig(), Dist(), Precision.for_device("bf16", torch.device("cpu")))
    reals = torch.rand(4, 1, 32, 32) * 2 - 1
    before = [p.clone() for p in nets.G_ema.parameters()]
    loss_d, loss_g = nets.step(reals, 0.5, 4)  # fading into 32²: every path runs under autocast
    assert loss_d.dtype == loss_g.dtype == torch.float32 and torch.isfinite(loss_d) and torch.isfinite(loss_g)
    assert all(p.dtype == torch.float32 for p in (*nets.G.parameters(), *nets.D.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before, nets.G_ema.parameters()))  # the EMA moved



COND = dataclasses.replace(TINY, label_size=5)  # 5 slice bins


def test_label_size_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match=r"pgan\.label_size"):
            PGANConfig(label_size=bad)
    assert PGANConfig().label_size == 0 and PGANConfig(label_size=31).label_size == 31


def test_conditioned_parameter_counts_follow_the_formula():
    """G's first dense layer takes latent + L inputs (to nf·16), D's last dense layer gives 1 + L outputs (with bias);
    nothing else changes."""
    torch.manual_seed(0)
    G0, D0, G1, D1 = Generator(TINY), Discriminator(TINY), Generator(COND), Discriminator(COND)
    L, width, hidden = COND.label_size, COND.nf(1), COND.nf(0)  # 4² block width, D's hidden dense width
    assert G1.blocks[0].dense.weight.numel() == (COND.latent + L) * width * 16
    assert _params(D1.blocks[0].dense1) == hidden * (1 + L) + (1 + L)
    assert _params(G1) - _params(G0) == L * width * 16
    assert _params(D1) - _params(D0) == hidden * L + L
    # label_size 0 is the unconditioned network: the same keys, and shapes differ only in those two layers
    for plain, cond in ((G0, G1), (D0, D1)):
        a, b = plain.state_dict(), cond.state_dict()
        assert a.keys() == b.keys()
        changed = {k for k in a if a[k].shape != b[k].shape}
        assert changed == ({"blocks.0.dense.weight"} if plain is G0 else {"blocks.0.dense1.weight",
                                                                          "blocks.0.dense1.bias"})
    assert Generator(dataclasses.replace(TINY, label_size=0)).state_dict().keys() == G0.state_dict().keys()
    assert D0(torch.randn(4, 1, 32, 32), 0.0).shape == (4, 1)


def test_the_label_is_one_hot_concatenated_to_the_latent_then_pixel_normalised():
    torch.manual_seed(0)
    G = Generator(COND)
    z, labels = torch.randn(4, 16), torch.tensor([0, 4, 2, 2])
    seen = []
    G.blocks[0].dense.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        G(z, 0.0, labels)
    expected = pixel_norm(torch.cat([z, F.one_hot(labels, 5).float()], dim=1))
    assert seen[0].shape == (4, 16 + 5) and torch.allclose(seen[0], expected, atol=1e-6)


def test_the_label_changes_the_images_and_d_returns_label_logits():
    torch.manual_seed(0)
    G, D = Generator(COND), Discriminator(COND)
    z = torch.randn(4, 16).repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 3, 4, 3, 2, 1])
    with torch.no_grad():
        images = G(z, 0.0, labels)
        assert torch.equal(G(z, 0.0, labels), images)  # deterministic for the same (z, label)
        same_z = images[:4], images[4:]
        assert (same_z[0] - same_z[1])[[0, 1, 3]].abs().amax(dim=(1, 2, 3)).min() > 1e-3  # labels differ: images do
        assert torch.equal(same_z[0][2], same_z[1][2])  # the same label (2) with the same z: the same image
        out = D(images, 0.0)
        assert out.shape == (8, 1 + 5)
        other = D(torch.randn(8, 1, 32, 32), 0.0)
        assert (out[:, 1:] - other[:, 1:]).abs().max() > 1e-3  # the logits depend on the input
        for lod in (0.5, 2.25, 3.0):  # every lod: G takes labels, D returns 1 + L columns
            assert D(G(z, lod, labels), lod).shape == (8, 6)


def test_labels_must_match_the_generator():
    torch.manual_seed(0)
    cond, plain = Generator(COND), Generator(TINY)
    z = torch.randn(2, 16)
    with pytest.raises(ValueError, match=r"conditioned on 5 labels \(pgan\.label_size\)"):
        cond(z, 0.0)
    with pytest.raises(ValueError, match="unconditioned"):
        plain(z, 0.0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="int64"):
        cond(z, 0.0, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="int64"):
        cond(z, 0.0, torch.tensor([0, 1, 2]))  # one label per latent


def test_gradients_reach_the_label_weights():
    """The label inputs of G's dense layer and D's logit outputs are trained: they get gradients from the AC terms."""
    torch.manual_seed(0)
    G, D = Generator(COND), Discriminator(COND)
    labels = torch.tensor([1, 3, 3, 0])
    out = D(G(torch.randn(4, 16), 0.0, labels), 0.0)
    F.cross_entropy(out[:, 1:], labels).backward()
    label_columns = G.blocks[0].dense.weight.grad[:, 16:]  # inputs 16… are the one-hot
    assert label_columns[:, [0, 1, 3]].abs().sum(dim=0).min() > 0 and label_columns[:, [2, 4]].abs().sum() == 0
    assert D.blocks[0].dense1.weight.grad[1:].abs().sum() > 0


def test_a_conditioned_bench_runs():
    from toolkit.bench.pgan import bench_pgan
    from toolkit.train.pgan_schedule import ScheduleConfig

    schedule = ScheduleConfig(resolution=32, total_kimg=7, lod_training_kimg=1, lod_transition_kimg=1,
                              minibatch={4: 4, 8: 4, 16: 4, 32: 4})
    doc = bench_pgan(COND, schedule, steps=1, warmup=0)
    torch.manual_seed(0)
    assert doc["params_g"] == _params(Generator(COND)) and math.isfinite(doc["projected_hours"])
