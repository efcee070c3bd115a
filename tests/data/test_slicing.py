"""Axial slicing: padding geometry, block reduction of MR and masks, uint16 conversion."""

import logging
from pathlib import Path

import numpy as np
import pytest

from toolkit.data.slicing import axial_slices, canvas_size, to_uint16


def test_padding_places_240_slices_in_the_centre_of_256():
    rng = np.random.default_rng(0)
    volume = rng.integers(1, 1000, size=(240, 240, 5)).astype(np.uint16)
    slices = axial_slices(volume, 256, labels=False)
    assert slices.shape == (5, 256, 256)
    # rows follow y, columns follow x; 8 zero pixels on every side
    np.testing.assert_array_equal(slices[3, 8:248, 8:248], volume[:, :, 3].T)
    assert slices[:, :8].max() == 0 and slices[:, 248:].max() == 0
    assert slices[:, :, :8].max() == 0 and slices[:, :, 248:].max() == 0


def test_larger_power_of_two_pads_without_resampling():
    volume = np.ones((240, 240, 2), dtype=np.uint8)
    slices = axial_slices(volume, 512, labels=True)
    assert slices.shape == (2, 512, 512) and slices.sum() == 2 * 240 * 240


def test_downsampling_uses_block_mean_for_mr_and_majority_for_masks():
    image = np.zeros((256, 256, 1), dtype=np.uint16)
    image[:2, :2, 0] = [[1, 2], [3, 5]]  # one 2×2 block at the top-left of the canvas: mean 2.75 → 3
    assert axial_slices(image, 128, labels=False)[0, 0, 0] == 3
    labels = np.zeros((256, 256, 1), dtype=np.uint8)
    labels[:2, :2, 0] = [[2, 2], [5, 0]]
    assert axial_slices(labels, 128, labels=True)[0, 0, 0] == 2
    labels[:2, :2, 0] = [[3, 3], [5, 5]]  # tie → lower class
    assert axial_slices(labels, 128, labels=True)[0, 0, 0] == 3


def test_canvas_size_rejects_non_powers_of_two():
    assert canvas_size(240, 240, 64) == 256
    with pytest.raises(ValueError, match="power of two"):
        canvas_size(240, 240, 200)


def test_to_uint16_clips_negatives_and_rescales_overflow_with_warnings(caplog):
    with caplog.at_level(logging.WARNING):
        out = to_uint16(np.array([-5.0, 1.4, 2.6]), Path("a.nii.gz"))
    assert out.tolist() == [0, 1, 3] and "a.nii.gz" in caplog.text and "negative" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = to_uint16(np.array([0.0, 65535.0 * 2]), Path("b.nii.gz"))
    assert out.tolist() == [0, 65535] and "b.nii.gz" in caplog.text and "rescaled" in caplog.text
