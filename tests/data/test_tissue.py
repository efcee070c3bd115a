"""Tests of toolkit.data.tissue: FAST-like CSF/GM/WM segmentation on template-derived and phantom volumes.

Where the Dice thresholds come from: each quality test compares against a baseline computed in the test on the same
volume (global intensity thresholds at the true class proportions, 3-means clustering, or the method with one part
switched off); the remaining absolute floors are this code's own measured scores minus a margin, regression guards
that say so where they are asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
from nilearn import datasets

from toolkit.data.phantom import make_subject
from toolkit.data.tissue import TissueConfig, segment_tissue

# Relative T1 signal of CSF, GM, WM (as in the demo phantom).
_CONTRAST = (0.30, 0.65, 1.00)
# An axial slab of the template: large enough for the bias fit and MRF, ~3 s per segmentation.
_SLAB = (slice(None), slice(None), slice(70, 110))


@pytest.fixture(scope="module")
def template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MNI152 CSF/GM/WM probability maps (CSF = brain - GM - WM), brain mask and argmax truth."""
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float64)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float64)
    brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).dataobj) > 0
    probs = np.stack([np.clip(1.0 - gm - wm, 0.0, 1.0), gm, wm])
    truth = np.where(brain, probs.argmax(axis=0) + 1, 0).astype(np.uint8)
    return probs, brain, truth


def _render(probs: np.ndarray, brain: np.ndarray, bias: float, noise: float, seed: int = 0) -> np.ndarray:
    """Partial-volume T1 with a smooth multiplicative bias of +-``bias`` and Rician noise, as int16."""
    image = np.tensordot(_CONTRAST, probs, axes=1)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in brain.shape), indexing="ij")
    field = np.sin(1.3 * x + 0.4) + 0.8 * np.cos(1.1 * y - 0.3) + np.sin(0.9 * z + x)
    field = 2 * (field - field[brain].min()) / np.ptp(field[brain]) - 1
    rng = np.random.default_rng(seed)
    image = image * (1 + bias * field)
    image = np.hypot(image + rng.normal(0, noise, image.shape), rng.normal(0, noise, image.shape))
    return np.where(brain, 1000 * image, 0).astype(np.int16)


def _dice(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    return [2 * np.sum((pred == k) & (truth == k)) / (np.sum(pred == k) + np.sum(truth == k)) for k in (1, 2, 3)]


def _global_thresholds(image: np.ndarray, inside: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Baseline: intensity quantiles cut at the *true* CSF / GM / WM proportions (an oracle no segmentation has),
    the best a single global threshold pair can do on a T1 without modelling bias, partial volume or neighbours."""
    values = image[inside]
    cuts = np.quantile(values, np.cumsum([np.mean(truth[inside] == k) for k in (1, 2)]))
    seg = np.zeros(image.shape, np.uint8)
    seg[inside] = 1 + np.digitize(values, cuts)
    return seg


def _kmeans(image: np.ndarray, inside: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Baseline: 3-means clustering of the in-mask intensities (no proportions, bias field or neighbours)."""
    values = image[inside].astype(np.float64)
    centres = np.quantile(values, [0.1, 0.5, 0.9])
    for _ in range(iterations):
        nearest = np.abs(values[:, None] - centres).argmin(axis=1)
        centres = np.array([values[nearest == k].mean() for k in range(3)])
    seg = np.zeros(image.shape, np.uint8)
    seg[inside] = 1 + nearest
    return seg


def _slab_dice(template, bias: float, noise: float, config: TissueConfig) -> list[float]:
    probs, brain, truth = template
    image = _render(probs, brain, bias, noise)[_SLAB]
    return _dice(segment_tissue(image, brain[_SLAB], config=config), truth[_SLAB])


def test_full_template_volume_dice_and_output_convention(template) -> None:
    probs, brain, truth = template
    image = _render(probs, brain, bias=0.15, noise=0.04)
    centre = np.array(brain.shape) // 2 + np.array([20, 10, 10])
    exclude = np.sum((np.indices(brain.shape).T - centre).T ** 2, axis=0) < 15**2  # a "tumour" ball
    seg = segment_tissue(image, brain, exclude)

    assert seg.dtype == np.uint8 and set(np.unique(seg)) <= {0, 1, 2, 3}
    inside = brain & ~exclude
    assert np.all(seg[~inside] == 0) and np.all(seg[inside] > 0)
    means = [image[seg == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]
    truth = np.where(inside, truth, 0)
    dice = _dice(seg, truth)
    # Against a baseline measured here: with a ±15 % bias field, global thresholds at the true proportions score
    # 0.81 / 0.91 / 0.89 (CSF / GM / WM) and the segmentation 0.85 / 0.95 / 0.96: the bias model and the MRF must
    # beat the oracle thresholds on every class (by 0.03; measured 0.04-0.07).
    baseline = _dice(_global_thresholds(image, inside, truth), truth)
    assert all(d >= b + 0.03 for d, b in zip(dice, baseline)), (dice, baseline)
    # Regression floors, not independent targets: the measured scores above minus 0.05 (CSF on this template is
    # mostly partial-volume voxels, as the MNI maps are population averages, so it is the hardest class).
    assert dice[0] >= 0.80 and dice[1] >= 0.90 and dice[2] >= 0.91, dice


def test_phantom_subject_dice() -> None:
    subject = make_subject(0, seed=0)
    brain, exclude = subject.t1 > 0, subject.seg > 0
    seg = segment_tissue(subject.t1, brain, exclude)
    inside = brain & ~exclude
    truth = np.where(inside, subject.tissue, 0)
    dice = _dice(seg, truth)
    # Against baselines measured here, on the phantom's own tissue truth: its mild bias leaves global thresholds at
    # the true proportions (an oracle) nearly as good as it gets (mean 0.930 vs the segmentation's 0.928), and plain
    # 3-means clustering of intensities scores 0.56 / 0.86 / 0.95. The segmentation, which knows no proportions,
    # must match the oracle's mean within 0.01 and beat 3-means on every class.
    oracle = _dice(_global_thresholds(subject.t1, inside, truth), truth)
    clusters = _dice(_kmeans(subject.t1, inside), truth)
    assert np.mean(dice) >= np.mean(oracle) - 0.01, (dice, oracle)
    assert all(d > c for d, c in zip(dice, clusters)), (dice, clusters)
    # Regression floors, not independent targets: measured on subjects 0-2, CSF 0.875 / 0.848 / 0.865, GM
    # 0.946-0.960, WM 0.947-0.962; subject 0 at the 0.85 goal for GM/WM and 0.02 below its CSF score.
    assert dice[0] >= 0.85 and dice[1] >= 0.92 and dice[2] >= 0.92, dice


def test_potts_prior_helps_with_noise(template) -> None:
    # Measured mean Dice 0.92 with beta = 1 vs 0.86 with beta = 0 at this noise level.
    with_mrf = _slab_dice(template, bias=0.15, noise=0.06, config=TissueConfig())
    without = _slab_dice(template, bias=0.15, noise=0.06, config=TissueConfig(beta=0.0))
    assert np.mean(with_mrf) > np.mean(without) + 0.03, (with_mrf, without)


def test_bias_correction_helps_on_strong_bias(template) -> None:
    # Measured mean Dice 0.68 with the polynomial bias model vs 0.62 without it at +-25 %.
    corrected = _slab_dice(template, bias=0.25, noise=0.04, config=TissueConfig())
    uncorrected = _slab_dice(template, bias=0.25, noise=0.04, config=TissueConfig(bias_degree=0))
    assert np.mean(corrected) > np.mean(uncorrected) + 0.03, (corrected, uncorrected)


def test_deterministic(template) -> None:
    probs, brain, _ = template
    image = _render(probs, brain, bias=0.15, noise=0.04)[:, :, 85:100]
    config = TissueConfig(iterations=3)
    first = segment_tissue(image, brain[:, :, 85:100], config=config)
    np.testing.assert_array_equal(first, segment_tissue(image, brain[:, :, 85:100], config=config))
