"""`tumorsynth bench swd`: the vectorised SWD against a straightforward per-image numpy/scipy implementation.

The naive implementation, :func:`naive_swd`, transcribes the official PGAN code (scipy ``convolve(mode='mirror')``
pyramid, fancy-index patch gathering, ``np.sort`` of projections) with one Python loop over images. It draws its random
numbers with the metric's own :func:`~toolkit.metrics.swd.draw_positions` and
:func:`~toolkit.metrics.swd.draw_directions`, so the two agree up to float rounding; the tests use it as the reference.

The naive code needs about a second per 256² image, so the benchmark runs it on at most :data:`NAIVE_LIMIT` images
(the first ones of both sets): agreement is checked on that subset, and the speedup over all ``images`` is
extrapolated from the naive time per image (its cost grows about linearly with the image count) and labelled so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.ndimage
import torch

from toolkit.metrics.swd import SWDConfig, draw_directions, draw_positions, resolutions, swd

NAIVE_LIMIT = 1024  # images the naive reference runs on at most
_KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]).astype(np.float32)[None] / 256.0  # [1,5,5]: per channel


def _pyr_down(img: np.ndarray) -> np.ndarray:
    return scipy.ndimage.convolve(img, _KERNEL, mode="mirror")[:, ::2, ::2]


def _pyr_up(img: np.ndarray) -> np.ndarray:
    up = np.zeros((img.shape[0], img.shape[1] * 2, img.shape[2] * 2), img.dtype)
    up[:, ::2, ::2] = img
    return scipy.ndimage.convolve(up, _KERNEL * 4.0, mode="mirror")


def _naive_descriptors(images: np.ndarray, positions: list[np.ndarray], config: SWDConfig) -> list[np.ndarray]:
    """Per level [N·patches, C·patch²] normalised descriptors, one image at a time as in the official code."""
    half = config.patch_size // 2
    levels: list[list[np.ndarray]] = [[] for _ in positions]
    for i, image in enumerate(images):
        pyramid = [np.float32(image)]
        for _ in range(1, len(positions)):
            pyramid.append(_pyr_down(pyramid[-1]))
            pyramid[-2] = pyramid[-2] - _pyr_up(pyramid[-1])
        for level, band, centres in zip(levels, pyramid, positions):
            chan, dy, dx = np.ogrid[0:band.shape[0], -half:half + 1, -half:half + 1]
            rows, cols = centres[i, :, 0, None, None, None], centres[i, :, 1, None, None, None]
            level.append(band[chan, rows + dy, cols + dx].reshape(len(centres[i]), -1))
    out = []
    for level in levels:
        desc = np.concatenate(level).reshape(-1, images.shape[1], config.patch_size ** 2)
        desc -= desc.mean(axis=(0, 2), keepdims=True)
        std = desc.std(axis=(0, 2), keepdims=True)
        desc /= np.where(std > 0, std, 1)  # constant channel: keep zeros (as the vectorised version)
        out.append(desc.reshape(desc.shape[0], -1))
    return out


def naive_swd(real: np.ndarray, fake: np.ndarray, seed: int = 0,
              config: SWDConfig | None = None) -> dict[str, Any]:
    """The ``swd`` JSON object computed the slow, obvious way (same random draws as the vectorised metric)."""
    config = config or SWDConfig()
    real, fake = (x[:, None] if x.ndim == 3 else x for x in (real, fake))
    sizes = resolutions(real.shape[-1], config)
    positions = [p.numpy() for p in draw_positions(real.shape[0], sizes, config, seed)]
    desc_real, desc_fake = (_naive_descriptors(x, positions, config) for x in (real, fake))
    dim = real.shape[1] * config.patch_size ** 2
    per_level = {}
    for size, a, b, dirs in zip(sizes, desc_real, desc_fake, draw_directions(dim, len(sizes), config, seed)):
        results = []
        for repeat in dirs.numpy():
            proj_a, proj_b = np.sort(a @ repeat, axis=0), np.sort(b @ repeat, axis=0)
            results.append(np.mean(np.abs(proj_a - proj_b)))
        per_level[str(size)] = 1e3 * float(np.mean(results))
    return {"swd_x1e3": per_level, "swd_x1e3_avg": float(np.mean(list(per_level.values()))), "images": real.shape[0]}


def bench_masks(images: int, size: int, seed: int, smoothing: float = 3.0) -> np.ndarray:
    """Deterministic mask-like images: smoothed noise quantised into 7 equally populated labels (uint8 0..6)."""
    noise = np.random.default_rng(seed).standard_normal((images, size, size), dtype=np.float32)
    smooth = scipy.ndimage.gaussian_filter(noise, sigma=(0, smoothing, smoothing))
    return np.digitize(smooth, np.quantile(smooth, np.linspace(0, 1, 8)[1:-1])).astype(np.uint8)


def bench_swd(images: int = 1024, size: int = 256, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Time :func:`~toolkit.metrics.swd.swd` on two test sets of ``images`` and :func:`naive_swd` on (at most)
    their first :data:`NAIVE_LIMIT`; report their agreement on that subset."""
    real, fake = bench_masks(images, size, seed), bench_masks(images, size, seed + 1, smoothing=4.0)
    swd(real[:2], fake[:2], device=device)  # warm-up: first-call allocations and kernel selection, not the metric
    fast, seconds = _timed(lambda: swd(real, fake, seed=seed, device=device), device)
    subset = min(images, NAIVE_LIMIT)
    fast_subset = fast if subset == images else swd(real[:subset], fake[:subset], seed=seed, device=device)
    naive, naive_seconds = _timed(lambda: naive_swd(real[:subset], fake[:subset], seed), "cpu")
    diffs = [abs(fast_subset["swd_x1e3"][k] - v) for k, v in naive["swd_x1e3"].items()]
    naive_per_image = naive_seconds / subset
    return {
        "bench": "swd", "images": images, "size": size, "device": device, "seconds": round(seconds, 3),
        "seconds_per_image": seconds / images,
        "naive_images": subset, "naive_seconds": round(naive_seconds, 3), "naive_seconds_per_image": naive_per_image,
        # naive time per image × images over the fast time: measured when naive_images == images, else extrapolated
        "speedup": round(naive_per_image * images / seconds, 2), "speedup_extrapolated": subset < images,
        "max_abs_diff": max([*diffs, abs(fast_subset["swd_x1e3_avg"] - naive["swd_x1e3_avg"])]),
        "swd_x1e3_avg": fast["swd_x1e3_avg"],
    }


def _timed(fn: Callable[[], dict[str, Any]], device: str) -> tuple[dict[str, Any], float]:
    """``fn()`` and its wall time, waiting for queued GPU work so that the time covers it."""
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start
