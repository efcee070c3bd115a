"""Label mapping tables: BraTS + FAST → 7 classes, and the 4- and 2-class views."""

import numpy as np
import pytest

from toolkit.data.labels import compose_mask, reduce_labels, to_view, view_table


def test_compose_maps_brats_and_fast_labels_with_tumour_overriding_tissue():
    seg = np.array([0, 1, 2, 4, 0, 0, 0, 1, 4])
    tissue = np.array([0, 0, 0, 0, 1, 2, 3, 3, 1])  # FAST: 1 CSF, 2 GM, 3 WM
    assert compose_mask(seg, tissue).tolist() == [0, 1, 2, 3, 6, 5, 4, 1, 3]


def test_compose_without_tissue_is_four_class():
    seg = np.array([0, 1, 2, 4])
    assert compose_mask(seg, None).tolist() == [0, 1, 2, 3]


def test_views_of_seven_class_labels():
    labels = np.arange(7)
    assert to_view(labels, 7, 7).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert to_view(labels, 7, 4).tolist() == [0, 1, 2, 3, 0, 0, 0]
    assert to_view(labels, 7, 2).tolist() == [0, 1, 1, 1, 0, 0, 0]
    assert to_view(np.arange(4), 4, 2).tolist() == [0, 1, 1, 1]


def test_four_class_store_has_no_seven_class_view():
    with pytest.raises(ValueError, match="no 7-class view"):
        view_table(4, 7)


def test_reduce_labels_box_averages_then_rounds_half_to_even():
    labels = np.zeros((1, 4, 4), np.uint8)
    labels[0, :2, :2] = [[1, 2], [3, 4]]  # mean 2.5 → 2 (half to even)
    labels[0, :2, 2:] = [[3, 4], [4, 5]]  # mean 4.0 → 4
    labels[0, 2:, :2] = [[6, 6], [6, 5]]  # mean 5.75 → 6
    labels[0, 2:, 2:] = [[0, 0], [1, 2]]  # mean 0.75 → 1
    assert reduce_labels(labels, 2).tolist() == [[[2, 4], [6, 1]]]
    assert reduce_labels(labels, 4) is labels
    with pytest.raises(ValueError, match="must divide"):
        reduce_labels(labels, 3)
