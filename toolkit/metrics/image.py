"""Image similarity per image: L1, PSNR and SSIM of [N, 1, H, W] float tensors, one value per image.

Each function returns a float32 tensor [N] on the inputs' device and reads nothing back, so a caller can sum the
values of many batches on the device and synchronise once (the caller averages). ``data_range`` is the intensity
span the images live in, e.g. a store's intensity maximum for raw intensities in [0, max].

- PSNR is ``10 · log10(R² / MSE)`` by its definition, uncapped: identical images give ``+inf`` (as
  ``skimage.metrics.peak_signal_noise_ratio`` does), so a mean over images is ``inf`` if any pair is identical.
- SSIM is Wang et al. (2004): an 11 × 11 Gaussian window of σ = 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
  covariances, averaged over the pixels whose window lies inside the image ('valid' convolution). That is
  ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=R)``, whose reflect-padded filter is cropped to the same pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW, SIGMA = 11, 1.5  # skimage: radius int(3.5 σ + 0.5) = 5
K1, K2 = 0.01, 0.03


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 1:
        raise ValueError(f"image metrics take two [N, 1, H, W] tensors of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per image, in the images' units."""
    _check(a, b)
    return (a.float() - b.float()).abs().flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, ``10 · log10(R² / MSE)``; ``+inf`` for identical images."""
    _check(a, b)
    mse = (a.float() - b.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian(device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian taps of the SSIM window."""
    t = torch.arange(WINDOW, dtype=torch.float32, device=device) - WINDOW // 2
    taps = torch.exp(-t.square() / (2 * SIGMA ** 2))
    return taps / taps.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float) -> torch.Tensor:
    """Mean structural similarity per image (1 for identical images); needs H, W ≥ 11."""
    _check(a, b)
    if min(a.shape[-2:]) < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}², got {tuple(a.shape[-2:])}")
    # in units of the data range, so the second moments stay well inside float32 for any intensity scale
    x, y = a.float() / data_range, b.float() / data_range
    n, _, h, w = x.shape
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1).reshape(n * 5, 1, h, w)
    taps = _gaussian(x.device)
    # the separable window: rows, then columns, both 'valid'
    mean = F.conv2d(F.conv2d(maps, taps.view(1, 1, 1, WINDOW)), taps.view(1, 1, WINDOW, 1))
    mu_x, mu_y, xx, yy, xy = mean.reshape(n, 5, h - WINDOW + 1, w - WINDOW + 1).unbind(1)
    var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    c1, c2 = K1 ** 2, K2 ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)
