"""Per-image L1, PSNR and SSIM against their definitions computed directly with numpy.

scikit-image is not a dependency, so SSIM is checked against the formula of Wang et al. (2004) written out here: an
11 × 11 normalised Gaussian window (σ = 1.5) over every fully-inside window position, population moments, K1 = 0.01,
K2 = 0.03.
"""

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from toolkit.metrics.image import l1, psnr, ssim

R = 4000.0  # an intensity maximum of the order of a store's


def numpy_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Mean SSIM of two 2-D images, window by window."""
    g = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    wa, wb = sliding_window_view(a, (11, 11)), sliding_window_view(b, (11, 11))

    def mean(v):
        return (v * w).sum((-2, -1))

    mx, my = mean(wa), mean(wb)
    vx, vy, cxy = mean(wa * wa) - mx ** 2, mean(wb * wb) - my ** 2, mean(wa * wb) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def pair(seed: int, n: int = 3, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Random images in [0, R] and a correlated partner (structure shared, noise added), float64 [n, 1, S, S]."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, R, (n, 1, size, size))
    b = 0.5 * a + 0.5 * rng.uniform(0, R, a.shape)
    return a, b


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).float()


def test_l1_and_psnr_match_their_definitions_per_image():
    a, b = pair(0)
    mse = ((a - b) ** 2).reshape(3, -1).mean(1)
    assert np.allclose(l1(t(a), t(b)).numpy(), np.abs(a - b).reshape(3, -1).mean(1), rtol=1e-5)
    assert np.allclose(psnr(t(a), t(b), R).numpy(), 10 * np.log10(R ** 2 / mse), rtol=1e-5)


def test_psnr_of_identical_images_is_infinite():
    a, _ = pair(1)
    assert torch.isinf(psnr(t(a), t(a), R)).all()


def test_ssim_matches_the_windowed_formula_per_image():
    a, b = pair(2, size=29)  # not a multiple of anything: the 'valid' crop must be exact
    got = ssim(t(a), t(b), R).numpy()
    want = [numpy_ssim(a[k, 0], b[k, 0], R) for k in range(3)]
    assert 0.1 < min(want) < max(want) < 0.9  # a pair that is neither identical nor unrelated
    assert np.allclose(got, want, atol=1e-5)


def test_ssim_of_an_image_with_itself_is_one():
    a, _ = pair(3)
    assert np.allclose(ssim(t(a), t(a), R).numpy(), 1, atol=1e-6)


def test_ssim_falls_as_noise_is_added():
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:48, :48]
    clean = (R / 2) * (1 + np.sin(xx / 5) * np.cos(yy / 7))[None, None]  # a smooth structured image
    scores = [float(ssim(t(clean), t(np.clip(clean + s * rng.standard_normal(clean.shape), 0, R)), R))
              for s in (50, 200, 800)]
    assert 1 > scores[0] > scores[1] > scores[2]


def test_metrics_read_nothing_back_from_the_device():
    # the meta device stands in for a GPU: reading a value (.item(), float()) raises there
    a = torch.zeros(2, 1, 16, 16, device="meta")
    for value in (l1(a, a), psnr(a, a, R), ssim(a, a, R)):
        assert value.device.type == "meta" and value.shape == (2,)


def test_shape_mismatch_and_images_smaller_than_the_window_are_refused():
    with pytest.raises(ValueError, match=r"\[N, 1, H, W\]"):
        l1(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 15))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 1, 10, 16), torch.zeros(1, 1, 10, 16), R)
