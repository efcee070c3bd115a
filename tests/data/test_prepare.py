"""End-to-end ingest on phantom subjects: counts, geometry, PNG ↔ HDF5, FAST ingest, re-runs (kills and other
faults: tests/faults/test_store_faults.py)."""

import shutil

import nibabel as nib
import numpy as np

from toolkit.data.labels import compose_mask
from toolkit.data.png import png_name, read_png
from toolkit.data.prepare import PrepareConfig, prepare
from toolkit.data.slicing import axial_slices
from toolkit.data.store import MANIFEST, Store, verify


def test_store_counts_splits_and_subject_slices(cohort, store_64):
    store = Store(store_64)
    m = store.manifest
    total = len(list(cohort.iterdir())) * 155
    assert {k: v.n for k, v in m.splits.items()} == {"train": total - 124, "val": 62, "test": 62}
    assert m.reduced == round(0.2 * (total - 124)) and m.classes == 7 and m.image_size == 64
    assert verify(store) == []
    rows = {k: store.read(k, fields=("subject", "slice")) for k in m.splits}
    pairs = [(s.decode() if isinstance(s, bytes) else s, int(z)) for r in rows.values()
             for s, z in zip(r["subject"], r["slice"])]
    assert len(set(pairs)) == total  # every slice of every subject exactly once
    assert sorted({z for _, z in pairs}) == list(range(155))
    # shuffled: the training split does not follow subject/slice order
    train = rows["train"]["slice"][:50]
    assert not np.array_equal(train, np.sort(train))


def test_all_seven_classes_present_and_empty_masks_flagged(store_64):
    store = Store(store_64)
    train = store.manifest.splits["train"]
    assert all(p > 0 for p in train.class_pixels)
    labels = store.read("train")["label"]
    assert train.empty == int((labels.reshape(len(labels), -1).max(1) == 0).sum()) > 0


def test_png_export_equals_hdf5(store_64):
    store = Store(store_64)
    for split in store.manifest.splits:
        rows = store.read(split, fields=("image", "label", "subject", "slice"))
        for i in range(len(rows["slice"])):
            name = png_name(rows["subject"][i].decode(), int(rows["slice"][i]))
            image = read_png(store_64 / "png" / split / "image" / name)
            label = read_png(store_64 / "png" / split / "label" / name)
            assert image.dtype == np.uint16 and label.dtype == np.uint8
            np.testing.assert_array_equal(image, rows["image"][i])
            np.testing.assert_array_equal(label, rows["label"][i])


def test_fast_ingest_at_full_size_reproduces_volumes_exactly(cohort, tmp_path):
    """With FAST output present, stored rows are exactly the padded slices of the volumes and composed masks."""
    subject = sorted(cohort.iterdir())[0]
    src = tmp_path / "cohort" / subject.name
    shutil.copytree(subject, src)
    truth = src / f"{subject.name}_tissue_truth.nii.gz"
    shutil.copy(truth, src / f"{subject.name}_fast_seg.nii.gz")
    out = tmp_path / "store"
    prepare(PrepareConfig(src=tmp_path / "cohort", out=out, size=256, png=False, split="subject"))
    store = Store(out)
    t1ce = np.asanyarray(nib.load(src / f"{subject.name}_t1ce.nii.gz").dataobj)
    seg = np.asanyarray(nib.load(src / f"{subject.name}_seg.nii.gz").dataobj)
    tissue = np.asanyarray(nib.load(truth).dataobj)
    expected_image = axial_slices(t1ce.astype(np.uint16), 256, labels=False)
    expected_label = axial_slices(compose_mask(seg, tissue), 256, labels=True)
    (split,) = [k for k, v in store.manifest.splits.items() if v.n]  # one subject: all rows in one split
    rows = store.read(split, fields=("image", "label", "slice"))
    order = rows["slice"].astype(int)
    np.testing.assert_array_equal(rows["image"], expected_image[order])
    np.testing.assert_array_equal(rows["label"], expected_label[order])
    assert store.manifest.intensity_max == int(t1ce.max())


def test_tissue_none_gives_a_four_class_store(cohort, tmp_path):
    prepare(PrepareConfig(src=cohort, out=tmp_path / "store", size=32, png=False, tissue="none"))
    m = Store(tmp_path / "store").manifest
    assert m.classes == 4 and len(m.splits["train"].class_pixels) == 4


def test_subject_split_keeps_subjects_apart(cohort, tmp_path):
    out = tmp_path / "store"
    prepare(PrepareConfig(src=cohort, out=out, size=32, png=False, split="subject", tissue="none"))
    store = Store(out)
    subjects = {k: set(store.read(k, fields=("subject",))["subject"].tolist()) for k in store.manifest.splits}
    assert all(len(v) == 1 for k, v in subjects.items() if k != "train") and len(subjects["train"]) == 2
    assert len(set.union(*subjects.values())) == len(list(cohort.iterdir()))


def test_rerun_with_the_same_options_on_a_complete_store_is_a_noop(cohort, store_64):
    before = (store_64 / MANIFEST).read_bytes()
    result = prepare(PrepareConfig(src=cohort, out=store_64, size=64, shard_size=128, workers=1))  # workers: any
    assert result.already_complete and (store_64 / MANIFEST).read_bytes() == before
