"""Classical augmentation: the warp is the documented mapping (against a direct per-pixel computation, and exact for a
quarter turn and a flip), labels stay labels, gamma is the formula, probabilities mean what they say, and the
parameters are a pure function of (seed, epoch, batch) that ranks split as one process would draw them."""

import math

import numpy as np
import pytest
import torch

from toolkit.train.augment import (
    AugmentConfig,
    Elastic,
    Flip,
    Gamma,
    Params,
    Rotation,
    Scaling,
    augment,
    draw,
    sampling_grid,
)

EVERYTHING = AugmentConfig(rotation=Rotation(p=1.0, degrees=30), scale=Scaling(p=1.0, range=(0.8, 1.25)),
                           flip=Flip(p=0.5), elastic=Elastic(p=1.0, alpha=2.0, points=4), gamma=Gamma(p=1.0))


def _params(n, angle=0.0, scale=1.0, flip=0.0, gamma=1.0, control=None):
    def full(value: float) -> torch.Tensor:
        return torch.full((n,), float(value), dtype=torch.float64)

    control = torch.zeros(n, 2, 4, 4, dtype=torch.float64) if control is None else control
    return Params(full(angle), full(scale), full(flip), full(gamma), control)


def _batch(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, size, size, generator=g) * 1000
    label = torch.randint(0, 7, (n, size, size), generator=g)
    return image, label


def _direct(image: np.ndarray, params: Params, i: int) -> np.ndarray:
    """Sample ``image`` [S, S] at p = A·q + d(q) for every output pixel q, bilinearly with zeros outside: the
    module's documented mapping, computed pixel by pixel without grid_sample."""
    size = image.shape[-1]
    c = (size - 1) / 2
    theta, s, m = float(params.angle[i]), float(params.scale[i]), 1 - 2 * float(params.flip[i])
    a = np.array([[math.cos(theta) * m, -math.sin(theta)], [math.sin(theta) * m, math.cos(theta)]]) / s
    field = torch.nn.functional.interpolate(params.control[i:i + 1], size=(size, size), mode="bicubic",
                                            align_corners=True)[0].numpy()
    out = np.zeros_like(image)
    for y in range(size):
        for x in range(size):
            px, py = a @ np.array([x - c, y - c]) + field[:, y, x] + c
            x0, y0 = math.floor(px), math.floor(py)
            value = 0.0
            for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
                for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
                    if 0 <= yy < size and 0 <= xx < size:
                        value += wy * wx * image[yy, xx]
            out[y, x] = value
    return out


def test_the_warp_is_the_documented_mapping_computed_pixel_by_pixel():
    image, label = _batch(n=2, size=12)
    params = draw(EVERYTHING, seed=1, epoch=2, index=3, batch=2)
    params = Params(params.angle, params.scale, params.flip, torch.ones(2, dtype=torch.float64), params.control)
    warped, _ = augment(image, label, params, peak=1000.0)
    for i in range(2):
        assert params.angle[i] != 0 and params.scale[i] != 1 and params.control[i].abs().sum() > 0
        expected = _direct(image[i, 0].numpy().astype(np.float64), params, i)
        np.testing.assert_allclose(warped[i, 0].numpy(), expected, atol=0.05)  # of intensities up to 1000


def test_a_quarter_turn_and_a_flip_move_images_and_labels_exactly():
    image, label = _batch(size=16)
    turned, turned_label = augment(image, label, _params(3, angle=math.pi / 2), peak=1000.0)
    # p = R(90°)·q: output (x, y) reads input (−y, x) about the centre: out[i, j] = in[j, S−1−i], torch.rot90's k=1
    assert torch.equal(turned_label, torch.rot90(label, 1, dims=(1, 2)))
    torch.testing.assert_close(turned, torch.rot90(image, 1, dims=(2, 3)), atol=1e-3, rtol=0)
    mirrored, mirrored_label = augment(image, label, _params(3, flip=1.0), peak=1000.0)
    assert torch.equal(mirrored_label, torch.flip(label, dims=(2,)))
    torch.testing.assert_close(mirrored, torch.flip(image, dims=(3,)), atol=1e-3, rtol=0)


def test_labels_stay_labels_and_the_outside_becomes_background():
    image, label = _batch(size=16)
    label = label.clamp_min(1)  # no background inside, so any 0 came from outside the image
    _, shrunk = augment(image, label, _params(3, scale=0.5, angle=0.3), peak=1000.0)
    assert shrunk.dtype == torch.int64 and set(shrunk.unique().tolist()) <= set(range(7))
    assert (shrunk[:, 0, :] == 0).all() and (shrunk[:, 8, 8] != 0).all()  # border outside, centre inside


def test_gamma_is_peak_times_the_normalised_intensity_to_the_power_gamma():
    image, label = _batch()
    out, same_label = augment(image, label, _params(3, gamma=1.5), peak=1000.0)
    torch.testing.assert_close(out, 1000.0 * (image / 1000.0) ** 1.5)
    assert torch.equal(same_label, label)


def test_probabilities_zero_leave_the_batch_untouched_and_one_changes_every_sample():
    image, label = _batch(n=8)
    none = draw(AugmentConfig(), seed=0, epoch=0, index=0, batch=8)
    out, out_label = augment(image, label, none, peak=1000.0)
    assert not AugmentConfig().enabled and not none.warps
    assert torch.equal(out, image) and torch.equal(out_label, label)
    params = draw(EVERYTHING, seed=0, epoch=0, index=0, batch=64)
    assert (params.angle != 0).all() and (params.scale != 1).all() and (params.gamma != 1).all()
    assert (params.control.flatten(1).abs().sum(1) > 0).all() and 16 < params.flip.sum() < 48
    assert params.angle.abs().max() <= math.radians(30) and params.scale.min() >= 0.8 and params.scale.max() <= 1.25


def test_parameters_are_a_pure_function_of_seed_epoch_and_batch_and_ranks_split_one_draw():
    one = draw(EVERYTHING, seed=4, epoch=1, index=7, batch=8)
    again = draw(EVERYTHING, seed=4, epoch=1, index=7, batch=8)
    assert all(torch.equal(a, b) for a, b in zip(vars(one).values(), vars(again).values()))
    for other in (dict(seed=5, epoch=1, index=7), dict(seed=4, epoch=2, index=7), dict(seed=4, epoch=1, index=8)):
        assert not torch.equal(draw(EVERYTHING, batch=8, **other).angle, one.angle), other
    image, label = _batch(n=8)
    whole, whole_label = augment(image, label, one, peak=1000.0)
    for rank in range(2):  # each of 2 ranks augments its 4 rows as the single process does
        rows = slice(4 * rank, 4 * rank + 4)
        part, part_label = augment(image[rows], label[rows], one.rows(4 * rank, 4 * rank + 4), peak=1000.0)
        assert torch.equal(part, whole[rows]) and torch.equal(part_label, whole_label[rows])


def test_the_grid_is_built_on_the_batch_device():
    meta = torch.device("meta")
    grid = sampling_grid(draw(EVERYTHING, seed=0, epoch=0, index=0, batch=2), 16, meta)
    assert grid.device == meta and grid.shape == (2, 16, 16, 2)


@pytest.mark.parametrize("section, bad", [("scale", {"range": [1.2, 0.8]}), ("gamma", {"range": [0, 1]})])
def test_an_unordered_or_non_positive_range_is_refused_naming_the_field(section, bad):
    kind = {"scale": Scaling, "gamma": Gamma}[section]
    with pytest.raises(ValueError, match=f"augment.{section}.range"):
        kind(p=0.5, **bad)


def test_the_unet_task_serves_augmented_batches_that_repeat_exactly_for_the_same_epoch(store_64, tmp_path):
    from toolkit.train.distributed import Dist
    from toolkit.train.unet import DataConfig, ModelConfig, OptimConfig, UNetRunConfig, UNetTask

    def first_batches(augment: AugmentConfig, epoch: int = 1, start: int = 2):
        cfg = UNetRunConfig(data=DataConfig(real=store_64, real_n=32), model=ModelConfig(widths=(4, 8), bridge=8),
                            optim=OptimConfig(batch=4), augment=augment)
        task = UNetTask(cfg, Dist(device=torch.device("cpu")), tmp_path)
        batches = task.batches(epoch, start)
        return [next(batches) for _ in range(2)]

    plain, augmented, again = first_batches(AugmentConfig()), first_batches(EVERYTHING), first_batches(EVERYTHING)
    for p, a, b in zip(plain, augmented, again):
        assert not torch.equal(p["label"].long(), a["label"]) and not torch.equal(p["image"].float(), a["image"])
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    resumed = first_batches(EVERYTHING, start=3)[0]  # a resume at batch 3 serves what batch 3 was
    assert torch.equal(resumed["image"], augmented[1]["image"])
