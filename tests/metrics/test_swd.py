"""SWD: agreement with a reference written here from the definition (and with the bench's naive one), metric
properties, the pyramid, caching and loading."""

import numpy as np
import pytest
import scipy.ndimage
import torch

from toolkit.bench.swd import bench_masks, bench_swd, naive_swd
from toolkit.data.store import StoreError, StoreWriter
from toolkit.metrics.swd import (
    SWDConfig,
    cache_meta,
    descriptors,
    laplacian_pyramid,
    load_descriptors,
    load_images,
    pyr_down,
    pyr_up,
    reconstruct,
    resolutions,
    save_descriptors,
    swd,
    swd_from_descriptors,
)

SMALL = SWDConfig(patches_per_image=32, directions=32, repeats=2)


def smooth_images(n: int, size: int, seed: int, channels: int = 0, high: int = 255, dtype=np.uint8) -> np.ndarray:
    """Smoothed noise scaled to [0, high]: image-like structure at every pyramid level."""
    shape = (n, channels, size, size) if channels else (n, size, size)
    noise = np.random.default_rng(seed).standard_normal(shape)
    smooth = scipy.ndimage.gaussian_filter(noise, sigma=[0] * (len(shape) - 2) + [1.5, 1.5])
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    return np.round(smooth * high).astype(dtype)


def _generator(seed: int, stream: int) -> torch.Generator:
    """The documented random streams: a CPU torch.Generator seeded by SeedSequence([seed, stream]) (0 patches,
    1 directions)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0]))


def _blur(x: np.ndarray, gain: float) -> np.ndarray:
    """``gain`` × the 5×5 binomial filter ([1,4,6,4,1]/16 on each axis) over the last two axes, mirror boundary."""
    taps = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
    for axis in (-1, -2):
        padded = np.pad(x, [(0, 0)] * (x.ndim - 2) + ([(0, 0), (2, 2)] if axis == -1 else [(2, 2), (0, 0)]),
                        mode="reflect")
        n = x.shape[axis]
        x = sum(t * np.take(padded, range(k, k + n), axis=axis) for k, t in enumerate(taps))
    return x * gain


def _reference_swd(real: np.ndarray, fake: np.ndarray, seed: int = 0, config: SWDConfig | None = None) -> dict:
    """SWD ×1e3 written from the definition, sharing no code with toolkit.metrics.swd or toolkit.bench.swd.

    The official PGAN metric (metrics/sliced_wasserstein.py): a Laplacian pyramid (cv2.pyrDown/pyrUp: binomial blur,
    decimation; zero insertion, 4× blur) down to 16²; per image and level ``patches_per_image`` neighbourhoods of
    ``patch_size``², centres uniform in [h, S − h), flattened channel-major; each set standardised per channel over
    all its descriptors; ``repeats`` × ``directions`` random unit directions; per direction the Wasserstein-1
    distance of the two projected samples, averaged. The random numbers follow the metric's documented protocol
    (positions: one int64 [images, patches, 2] (row, col) draw per level, finest first; directions: one float64
    normal [repeats, dim, directions] draw per level, normalised, as float32). Deliberately other formulations than
    the library's: the blur as padded full-resolution filtering, patches cut one by one, and W1 as the area between
    the two empirical CDFs, ∫ |F_a − F_b| (equal to the mean |sorted a − sorted b| for samples of equal size).
    """
    config = config or SWDConfig()
    real, fake = (np.asarray(x, np.float32) for x in (real, fake))
    real, fake = (x[:, None] if x.ndim == 3 else x for x in (real, fake))
    n, channels, size = real.shape[0], real.shape[1], real.shape[-1]
    sizes = [size >> k for k in range(8) if size >> k >= config.min_resolution]
    half, dim = config.patch_size // 2, channels * config.patch_size ** 2
    positions = _generator(seed, 0)
    centres = [torch.randint(half, s - half, (n, config.patches_per_image, 2), generator=positions).numpy()
               for s in sizes]

    def pyramid(x):
        levels = [x.astype(np.float64)]
        for _ in sizes[1:]:
            low = _blur(levels[-1], 1.0)[..., ::2, ::2]
            up = np.zeros(levels[-1].shape)
            up[..., ::2, ::2] = low
            levels[-1] = levels[-1] - _blur(up, 4.0)
            levels.append(low)
        return levels

    def descriptors(x):
        levels = pyramid(x)
        out = []
        for band, where in zip(levels, centres):
            patches = np.array([band[i, :, r - half:r + half + 1, c - half:c + half + 1].reshape(-1)
                                for i in range(n) for r, c in where[i]], dtype=np.float32)
            by_channel = patches.reshape(len(patches), channels, -1)
            mean = by_channel.mean(axis=(0, 2), keepdims=True)
            std = by_channel.std(axis=(0, 2), keepdims=True)
            out.append(((by_channel - mean) / np.where(std > 0, std, 1)).reshape(len(patches), -1))
        return out

    def w1(a, b):
        """Per column: the area between the empirical CDFs of a[:, j] and b[:, j] (equal sample sizes)."""
        values = np.ascontiguousarray(np.concatenate([a, b]).T, dtype=np.float64)  # [directions, 2m]
        order = np.argsort(values, axis=1)
        gap = np.cumsum(np.where(order < len(a), 1.0, -1.0), axis=1)[:, :-1] / len(a)  # F_a − F_b between points
        return (np.abs(gap) * np.diff(np.take_along_axis(values, order, axis=1), axis=1)).sum(axis=1)

    directions = _generator(seed, 1)
    per_level = {}
    for s, a, b in zip(sizes, descriptors(real), descriptors(fake)):
        draw = torch.randn(config.repeats, dim, config.directions, generator=directions, dtype=torch.float64)
        units = (draw / draw.square().sum(dim=1, keepdim=True).sqrt()).float().numpy()
        per_level[str(s)] = 1e3 * float(np.mean([w1(a @ u, b @ u).mean() for u in units]))
    return {"swd_x1e3": per_level, "swd_x1e3_avg": float(np.mean(list(per_level.values()))), "images": n}


def assert_same_result(fast: dict, slow: dict, rel: float = 1e-4) -> None:
    assert fast["images"] == slow["images"]
    assert list(fast["swd_x1e3"]) == list(slow["swd_x1e3"])
    for key, value in slow["swd_x1e3"].items():
        assert fast["swd_x1e3"][key] == pytest.approx(value, rel=rel), key
    assert fast["swd_x1e3_avg"] == pytest.approx(slow["swd_x1e3_avg"], rel=rel)


@pytest.mark.parametrize(("size", "channels", "high", "dtype"), [
    (64, 0, 255, np.uint8), (32, 3, 255, np.uint8), (32, 1, 65535, np.uint16),
])
def test_matches_an_independent_reference_and_the_naive_one(size, channels, high, dtype):
    real = smooth_images(64, size, 0, channels, high, dtype)
    fake = smooth_images(64, size, 1, channels, high, dtype)
    # the bench's naive transcription (which shares the metric's draws) at the official sizes, the independent
    # reference at fewer patches and directions (its CDF-area W1 is the slow part)
    assert_same_result(swd(real, fake, seed=3, batch_size=24), naive_swd(real, fake, seed=3))
    assert_same_result(swd(real, fake, seed=3, batch_size=24, config=SMALL),
                       _reference_swd(real, fake, seed=3, config=SMALL))


def test_matches_an_independent_reference_on_masks():
    real, fake = bench_masks(32, 32, 0), bench_masks(32, 32, 1, smoothing=2.0)
    assert_same_result(swd(real, fake, config=SMALL), _reference_swd(real, fake, config=SMALL))


def test_pyramid_matches_scipy_mirror_convolution():
    image = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    kernel = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1])[None, None] / 256.0
    down = scipy.ndimage.convolve(image.numpy(), kernel, mode="mirror")[:, :, ::2, ::2]
    np.testing.assert_allclose(pyr_down(image).numpy(), down, rtol=1e-12)
    zeros = np.zeros((2, 3, 64, 64))
    zeros[:, :, ::2, ::2] = image.numpy()
    np.testing.assert_allclose(pyr_up(image).numpy(), scipy.ndimage.convolve(zeros, 4 * kernel, mode="mirror"),
                               rtol=1e-12)


def test_pyramid_reconstructs_the_image():
    image = torch.from_numpy(smooth_images(3, 64, 0, 1).astype(np.float32))
    pyramid = laplacian_pyramid(image, 3)
    assert [level.shape[-1] for level in pyramid] == [64, 32, 16]
    torch.testing.assert_close(reconstruct(pyramid), image, atol=1e-4, rtol=0)


def test_levels_and_keys():
    assert resolutions(256) == [256, 128, 64, 32, 16]
    assert resolutions(16) == [16]
    result = swd(smooth_images(4, 128, 0), smooth_images(4, 128, 1), config=SMALL)
    assert list(result["swd_x1e3"]) == ["128", "64", "32", "16"]
    assert result["images"] == 4
    assert result["swd_x1e3_avg"] == pytest.approx(np.mean(list(result["swd_x1e3"].values())))


def test_identical_sets_give_zero_and_order_does_not_matter():
    a, b = smooth_images(32, 32, 0), smooth_images(32, 32, 1)
    zero = swd(a, a.copy(), config=SMALL)
    assert zero["swd_x1e3_avg"] == 0 and all(v == 0 for v in zero["swd_x1e3"].values())
    assert swd(a, b, config=SMALL) == swd(b, a, config=SMALL)


def test_grows_with_perturbation():
    real = smooth_images(32, 32, 0)
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(real.shape)
    averages = [swd(real, np.clip(real + sigma * noise, 0, 255).astype(np.uint8), config=SMALL)["swd_x1e3_avg"]
                for sigma in (0, 2, 8, 32)]
    assert averages[0] == 0 and averages == sorted(averages) and averages[-1] > 3 * averages[1]


def test_seeded_and_batch_size_independent():
    a, b = smooth_images(16, 32, 0), smooth_images(16, 32, 1)
    first = swd(a, b, config=SMALL, seed=5)
    assert_same_result(swd(a, b, config=SMALL, seed=5, batch_size=3), first, rel=1e-6)
    assert swd(a, b, config=SMALL, seed=6) != first
    # Torch tensors (here uint8) are read the same as numpy arrays.
    assert swd(torch.from_numpy(a), torch.from_numpy(b), config=SMALL, seed=5) == first


def test_rejects_bad_inputs():
    a = smooth_images(4, 32, 0)
    with pytest.raises(ValueError, match="same number of images"):
        swd(a, a[:3])
    with pytest.raises(ValueError, match="power of two"):
        swd(a[:, :24, :24], a[:, :24, :24])
    with pytest.raises(ValueError, match="C 1 or 3"):
        swd(a[:, None].repeat(2, axis=1), a[:, None].repeat(2, axis=1))
    with pytest.raises(ValueError, match="integer"):
        swd(a > 0, a > 0)


def test_cached_descriptors_give_the_same_result(tmp_path):
    a, b = smooth_images(8, 32, 0), smooth_images(8, 32, 1)
    meta = cache_meta(SMALL, seed=2, images=8, source="a")
    save_descriptors(tmp_path / "real.pt", descriptors(a, SMALL, seed=2), meta)
    cached = load_descriptors(tmp_path / "real.pt", meta)
    assert swd_from_descriptors(cached, descriptors(b, SMALL, seed=2), config=SMALL, seed=2) == \
        swd(a, b, config=SMALL, seed=2)
    with pytest.raises(ValueError, match=r"real\.pt"):
        load_descriptors(tmp_path / "real.pt", {**meta, "seed": 3})


def test_load_images_from_npy_and_store(tmp_path):
    masks = bench_masks(6, 16, 0)
    np.save(tmp_path / "masks.npy", masks)
    np.testing.assert_array_equal(load_images(tmp_path / "masks.npy", 4), masks[:4])
    writer = StoreWriter(tmp_path / "store", classes=7)
    writer.write("train", 0, label=masks, subject=["s"] * 6, slice_index=np.arange(6))
    writer.finish(kind="real", image_size=16, has_image=False, shard_counts={"train": 1})
    np.testing.assert_array_equal(load_images(tmp_path / "store"), masks)
    np.testing.assert_array_equal(load_images(tmp_path / "store", 2), masks[:2])
    with pytest.raises(StoreError, match="no 'image'"):
        load_images(tmp_path / "store", field="image")
    with pytest.raises(ValueError, match="holds 6"):
        load_images(tmp_path / "store", 7)
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        load_images(tmp_path / "missing.npy")
    (tmp_path / "masks.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"masks\.txt"):
        load_images(tmp_path / "masks.txt")


def test_bench_runs_the_naive_reference_on_at_most_1024_images(monkeypatch):
    seen = []

    def spy(real, fake, seed=0, config=None):
        seen.append(len(real))
        return naive_swd(real, fake, seed, config)  # the function imported above, not the patched name

    monkeypatch.setattr("toolkit.bench.swd.naive_swd", spy)
    doc = bench_swd(images=1030, size=16)
    assert seen == [1024] and doc["naive_images"] == 1024 and doc["images"] == 1030
    assert doc["speedup_extrapolated"] and doc["max_abs_diff"] < 1e-3
    assert doc["speedup"] == pytest.approx(doc["naive_seconds_per_image"] * 1030 / doc["seconds"], rel=0.05)
    assert {"bench", "size", "device", "seconds", "swd_x1e3_avg"} <= doc.keys()
