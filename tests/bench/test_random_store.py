"""Random benchmark stores: the rows asked for, every class present, images that look like stored MR slices."""

import numpy as np

from toolkit.bench.random_store import CONTRASTS, random_slices, write_random_store
from toolkit.data.store import Store, summary, verify


def test_random_store_has_the_rows_asked_for_and_verifies(tmp_path):
    store = Store(write_random_store(tmp_path / "s", size=32, rows={"train": 20, "val": 3}, shard_size=8))
    assert summary(store)["splits"] == {"train": 20, "val": 3}
    assert verify(store) == []


def test_random_slices_hold_every_class_and_uint16_images():
    image, label = random_slices(np.random.default_rng(0), 8, 64)
    assert image.dtype == np.uint16 and label.dtype == np.uint8 and image.shape == label.shape == (8, 64, 64)
    assert set(np.unique(label)) == set(range(7))


def test_a_two_modality_random_store_has_one_channel_per_modality_each_with_its_contrast(tmp_path):
    store = Store(write_random_store(tmp_path / "s", size=32, rows={"train": 6}, modalities=("t1ce", "flair")))
    assert store.manifest.modalities == ("t1ce", "flair") and verify(store) == []
    rows = store.read("train", fields=("image", "label"))
    assert rows["image"].shape == (6, 2, 32, 32)
    for c, modality in enumerate(("t1ce", "flair")):  # each channel's class means are its contrast (noise σ 120)
        means = [rows["image"][:, c][rows["label"] == k].mean() for k in range(1, 7)]
        np.testing.assert_allclose(means, CONTRASTS[modality][1:], atol=60)
