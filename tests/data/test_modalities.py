"""Stores of several MR modalities (``prepare --modality t1ce,flair``): the [n,C,S,S] layout, what prepare writes into
it, the PNG export per modality, the datasets that serve it, and ``--intensity volume``, which takes the scanner gain
out of every volume."""

import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest

from toolkit.data.dataset import DatasetError, SliceDataset, Source
from toolkit.data.png import png_name, read_png
from toolkit.data.prepare import VOLUME_MEDIAN, PrepareConfig, PrepareError, prepare
from toolkit.data.slicing import axial_slices
from toolkit.data.store import Store, StoreWriter, verify, write_shard


@pytest.fixture(scope="module")
def two_channel(cohort, store_64, store_64_two, tmp_path_factory):
    """The session cohort prepared as store_64 is: T1ce (store_64), T1ce and FLAIR (store_64_two), FLAIR alone."""
    flair = tmp_path_factory.mktemp("modalities") / "flair"
    prepare(PrepareConfig(src=cohort, out=flair, size=64, shard_size=128, workers=2, modality="flair", png=False))
    return {"t1ce": store_64, "both": store_64_two, "flair": flair}


def test_each_channel_of_a_two_modality_store_is_that_modalitys_one_channel_store(two_channel):
    both, t1ce, flair = (Store(two_channel[k]) for k in ("both", "t1ce", "flair"))
    m = both.manifest
    assert (m.modality, m.modalities, m.channels) == ("t1ce,flair", ("t1ce", "flair"), 2)
    assert t1ce.manifest.channels == 1 and verify(both) == []
    for split in m.splits:
        rows = both.read(split, fields=("image", "label", "subject", "slice"))
        assert rows["image"].shape == (m.splits[split].n, 2, 64, 64) and rows["image"].dtype == np.uint16
        for c, single in enumerate((t1ce, flair)):
            alone = single.read(split, fields=("image", "label", "subject", "slice"))
            np.testing.assert_array_equal(rows["image"][:, c], alone["image"])
            for field in ("label", "subject", "slice"):
                np.testing.assert_array_equal(rows[field], alone[field])
    assert m.intensity_max == max(t1ce.manifest.intensity_max, flair.manifest.intensity_max)


def test_png_export_writes_one_folder_per_modality_equal_to_its_channel(two_channel):
    store = Store(two_channel["both"])
    rows = store.read("val", fields=("image", "subject", "slice"))
    folders = sorted(p.name for p in (two_channel["both"] / "png" / "val").iterdir())
    assert folders == ["image-flair", "image-t1ce", "label"]
    for i in range(len(rows["slice"])):
        name = png_name(rows["subject"][i].decode(), int(rows["slice"][i]))
        for c, modality in enumerate(("t1ce", "flair")):
            png = read_png(two_channel["both"] / "png" / "val" / f"image-{modality}" / name)
            np.testing.assert_array_equal(png, rows["image"][i, c])


@pytest.mark.parametrize("modality, problem", [("t1ce,pd", "one of"), ("t1ce,t1ce", "without repeats"),
                                               ("", "one of"), ("t1ce,", "one of")])
def test_a_bad_modality_list_is_refused_naming_the_option(tmp_path, modality, problem):
    with pytest.raises(PrepareError, match=rf"option --modality = {modality!r}: expected .*{problem}"):
        PrepareConfig(src=tmp_path, out=tmp_path / "s", modality=modality)
    assert not (tmp_path / "s").exists()


def test_dataset_serves_every_channel_and_refuses_mixing_other_modalities(two_channel):
    both = SliceDataset([Source(two_channel["both"], "val")])
    assert (both.channels, both.modalities) == (2, ("t1ce", "flair"))
    batch = both.collate(both.__getitems__([3, 0]))
    expected = Store(two_channel["both"]).read("val", fields=("image",))["image"][[3, 0]]
    assert batch["image"].shape == (2, 2, 64, 64)
    np.testing.assert_array_equal(batch["image"].numpy(), expected)
    stats = both.intensity_stats()
    assert stats.channel_max == tuple(float(v) for v in expected_all(two_channel["both"]).max(axis=(0, 2, 3)))
    assert stats.max == max(stats.channel_max)
    one = SliceDataset([Source(two_channel["t1ce"], "val")])
    assert one.channels == 1 and one.collate(one.__getitems__([0]))["image"].shape == (1, 1, 64, 64)
    with pytest.raises(DatasetError, match=r"modality 't1ce'.*first source's are t1ce,flair"):
        SliceDataset([Source(two_channel["both"], "val"), Source(two_channel["t1ce"], "val")])
    with pytest.raises(DatasetError, match=r"modality 'flair'.*first source's are t1ce"):
        SliceDataset([Source(two_channel["t1ce"], "val"), Source(two_channel["flair"], "val")])
    masks_only = SliceDataset([Source(two_channel["both"], "val"), Source(two_channel["t1ce"], "val")],
                              with_image=False)  # labels alone mix whatever the images are
    assert len(masks_only) == 2 * len(one)


def expected_all(store):
    return Store(store).read("val", fields=("image",))["image"]


def test_write_shard_takes_c_channels_and_refuses_other_image_shapes(tmp_path):
    label = np.zeros((3, 8, 8), np.uint8)
    rows = {"label": label, "subject": ["s"] * 3, "slice_index": np.arange(3), "classes": 7}
    image = np.arange(3 * 2 * 64, dtype=np.uint16).reshape(3, 2, 8, 8)
    info = write_shard(tmp_path / "train" / "shard-00000.h5", image=image, **rows)
    assert info.intensity_max == int(image.max())
    with h5py.File(tmp_path / "train" / "shard-00000.h5") as f:
        assert f["image"].chunks == (1, 2, 8, 8)
        np.testing.assert_array_equal(f["image"][:], image)
    for bad in (image[:, :1], image[:2], image[..., :4], image.astype(np.int32)):
        with pytest.raises(ValueError, match=r"image must be uint16 \[n,S,S\] or \[n,C,S,S\] with C ≥ 2"):
            write_shard(tmp_path / "train" / "shard-00001.h5", image=bad, **rows)
    assert not (tmp_path / "train" / "shard-00001.h5").exists()


def test_verify_reports_a_shard_whose_channels_disagree_with_the_modalities(tmp_path):
    writer = StoreWriter(tmp_path / "s", classes=7)
    writer.write("train", 0, label=np.zeros((2, 8, 8), np.uint8), image=np.ones((2, 8, 8), np.uint16),
                 subject=["a", "b"], slice_index=np.arange(2))
    writer.finish(kind="real", image_size=8, has_image=True, shard_counts={"train": 1}, modality="t1ce,flair")
    problems = verify(Store(tmp_path / "s"))
    assert len(problems) == 1 and "dataset 'image' is not uint16 (2, 2, 8, 8)" in problems[0]


def test_volume_intensity_scales_each_modality_of_each_subject_to_a_brain_median_of_1000(cohort, tmp_path):
    """At full size the stored rows are exactly each volume × 1000 / its brain median, rounded; gains are gone."""
    subject = sorted(cohort.iterdir())[1]
    shutil.copytree(subject, tmp_path / "cohort" / subject.name)
    out = tmp_path / "store"
    prepare(PrepareConfig(src=tmp_path / "cohort", out=out, size=256, png=False, split="subject", tissue="none",
                          modality="t1ce,flair", intensity="volume"))
    store = Store(out)
    (split,) = [k for k, v in store.manifest.splits.items() if v.n]
    rows = store.read(split, fields=("image", "slice"))
    order = rows["slice"].astype(int)
    for c, modality in enumerate(("t1ce", "flair")):
        volume = np.asanyarray(nib.load(subject / f"{subject.name}_{modality}.nii.gz").dataobj).astype(np.float64)
        scaled = np.rint(volume * (VOLUME_MEDIAN / np.median(volume[volume > 0]))).astype(np.uint16)
        np.testing.assert_array_equal(rows["image"][:, c], axial_slices(scaled, 256, labels=False)[order])
        stored = rows["image"][:, c]
        assert abs(np.median(stored[stored > 0]) - VOLUME_MEDIAN) <= 1
    assert store.manifest.provenance["options"]["intensity"] == "volume"
    with pytest.raises(PrepareError, match=r"option --intensity = 'zscore': expected one of \('raw', 'volume'\)"):
        PrepareConfig(src=tmp_path, out=tmp_path / "x", intensity="zscore")
