"""SliceDataset over real HDF5 stores written with StoreWriter, and label loading for the ``dice`` command."""

import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import png
import pytest
import torch
from torch.utils.data import DataLoader

from toolkit.data.dataset import DatasetError, SliceDataset, Source
from toolkit.data.labelio import LabelIOError, load_labels
from toolkit.data.labels import to_view
from toolkit.data.store import Store, StoreWriter

SIZE = 16
SHARDS = {"train": (5, 7, 4), "val": (3,), "test": (4, 2)}


def make_store(root: Path, *, seed: int, kind: str = "real", has_image: bool = True) -> dict[str, dict]:
    """A 7-class store from random arrays (about a third of the rows all background); returns its rows per split."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root, classes=7)
    rows = {}
    for split, sizes in SHARDS.items():
        n = sum(sizes)
        label = rng.integers(0, 7, (n, SIZE, SIZE), dtype=np.uint8)
        label[rng.random(n) < 0.35] = 0
        image = rng.integers(0, 4000, (n, SIZE, SIZE), dtype=np.uint16)
        for i, (lo, hi) in enumerate(zip(np.cumsum((0, *sizes))[:-1], np.cumsum(sizes))):
            writer.write(split, i, label=label[lo:hi], subject=[f"{kind}{seed}"] * (hi - lo),
                         slice_index=np.arange(lo, hi), image=image[lo:hi] if has_image else None)
        rows[split] = {"label": label, "image": image}
    writer.finish(kind=kind, image_size=SIZE, has_image=has_image, reduced_fraction=0.5,
                  shard_counts={split: len(sizes) for split, sizes in SHARDS.items()})
    return rows


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("stores")
    return {
        "real": (root / "real", make_store(root / "real", seed=1)),
        "synthetic": (root / "synthetic", make_store(root / "synthetic", seed=2, kind="synthetic")),
        "masks": (root / "masks", make_store(root / "masks", seed=3, kind="synthetic", has_image=False)),
    }


def stacked(dataset: SliceDataset) -> dict[str, np.ndarray]:
    """Every item of ``dataset``, read one by one, stacked per field."""
    items = [dataset[i] for i in range(len(dataset))]
    return {key: np.stack([np.asarray(item[key]) for item in items]) for key in items[0]}


def test_prefix_semantics(stores):
    path, rows = stores["real"]
    assert len(SliceDataset([Source(path)])) == 16
    six = SliceDataset([Source(path, n=6)])  # crosses the first shard boundary
    got = stacked(six)
    np.testing.assert_array_equal(got["label"], rows["train"]["label"][:6])
    np.testing.assert_array_equal(got["image"][:, 0], rows["train"]["image"][:6])
    assert got["image"].dtype == np.uint16 and got["label"].dtype == np.uint8  # the stored types, converted on device
    reduced = SliceDataset([Source(path, n="reduced")])
    assert len(reduced) == Store(path).manifest.reduced == 8
    assert len(SliceDataset([Source(path, "test")])) == 6
    with pytest.raises(DatasetError, match="asked for 17 rows"):
        SliceDataset([Source(path, n=17)])
    with pytest.raises(DatasetError, match="prefix of the train split"):
        SliceDataset([Source(path, "val", n="reduced")])


def test_drop_empty_filters_within_the_prefix(stores):
    path, rows = stores["real"]
    labels = rows["train"]["label"][:10]
    keep = labels.reshape(10, -1).any(axis=1)
    assert 0 < keep.sum() < 10
    got = stacked(SliceDataset([Source(path, n=10, drop_empty=True)]))
    np.testing.assert_array_equal(got["label"], labels[keep])


@pytest.mark.parametrize("classes", [7, 4, 2])
def test_views_match_to_view(stores, classes):
    path, rows = stores["real"]
    got = stacked(SliceDataset([Source(path, "test")], classes=classes))
    np.testing.assert_array_equal(got["label"], to_view(rows["test"]["label"], 7, classes))


def test_mix_of_stores(stores):
    (real, real_rows), (synth, synth_rows), (masks, _) = stores["real"], stores["synthetic"], stores["masks"]
    mix = SliceDataset([Source(real, n=5), Source(synth, n=9)])
    assert len(mix) == 14 and mix.describe() == "5 real + 9 synthetic"
    item = mix[5]
    assert item["source"] == 1 and item["index"] == 5
    np.testing.assert_array_equal(item["label"], synth_rows["train"]["label"][0])
    np.testing.assert_array_equal(mix[-1]["label"], synth_rows["train"]["label"][8])
    with pytest.raises(DatasetError, match=f"{masks}: mask-only"):
        SliceDataset([Source(real), Source(masks)])
    labels_only = SliceDataset([Source(real, n=2), Source(masks, n=3)], with_image=False)
    assert "image" not in labels_only[4] and labels_only.describe() == "2 real + 3 synthetic"
    np.testing.assert_array_equal(labels_only[0]["label"], real_rows["train"]["label"][0])


def test_getitems_keeps_the_requested_order(stores):
    dataset = SliceDataset([Source(stores["real"][0]), Source(stores["synthetic"][0], "val")], classes=4)
    order = [17, 0, 12, 5, 5, 3, -1]
    batch = dataset.__getitems__(order)
    for want, got in zip(order, batch):
        single = dataset[want]
        assert got.keys() == single.keys() and got["source"] == single["source"]
        for key in ("image", "label"):
            assert torch.equal(got[key], single[key])
    with pytest.raises(IndexError):
        dataset.__getitems__([len(dataset)])


@pytest.mark.parametrize("collate", [None, SliceDataset.collate])
def test_dataloader_workers_agree(stores, collate):
    dataset = SliceDataset([Source(stores["real"][0]), Source(stores["synthetic"][0], n=9)])
    dataset[0]  # open handles in the parent: the forked workers must not use them

    def everything(workers: int) -> dict[str, torch.Tensor]:
        kwargs = {} if collate is None else {"collate_fn": collate}
        loader = DataLoader(dataset, batch_size=4, shuffle=True, num_workers=workers, **kwargs)
        batches = list(loader)
        merged = {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        order = torch.argsort(merged["index"])
        return {key: value[order] for key, value in merged.items()}

    serial, parallel = everything(0), everything(2)
    assert serial["image"].shape == (25, 1, SIZE, SIZE)
    assert torch.equal(serial["index"], torch.arange(25))
    for key in serial:
        assert torch.equal(serial[key], parallel[key])


def test_pickling_drops_handles(stores):
    dataset = SliceDataset([Source(stores["real"][0], n=7)], classes=2)
    before = dataset[6]
    clone = pickle.loads(pickle.dumps(dataset))
    after = clone[6]
    assert torch.equal(before["label"], after["label"]) and torch.equal(before["image"], after["image"])
    dataset.close()
    clone.close()


def test_class_pixels_over_served_rows(stores):
    (real, real_rows), (synth, synth_rows) = stores["real"], stores["synthetic"]
    dataset = SliceDataset([Source(real, n=11, drop_empty=True), Source(synth, "test")], classes=4)
    prefix = real_rows["train"]["label"][:11]
    served = np.concatenate([prefix[prefix.reshape(11, -1).any(axis=1)], synth_rows["test"]["label"]])
    np.testing.assert_array_equal(dataset.class_pixels(), np.bincount(to_view(served, 7, 4).ravel(), minlength=4))


def test_intensity_stats(stores):
    dataset = SliceDataset([Source(stores["real"][0], n=9, drop_empty=True), Source(stores["synthetic"][0], "val")])
    images = stacked(dataset)["image"].astype(np.float64)
    peak, mean, channel_max = dataset.intensity_stats()
    assert peak == images.max() and channel_max == (peak,)
    assert mean == pytest.approx((images / images.max()).mean(), rel=1e-12)
    with pytest.raises(DatasetError, match="mask-only"):
        SliceDataset([Source(stores["masks"][0])], with_image=False).intensity_stats()


def test_load_labels_round_trips(stores, tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (12, 10), dtype=np.uint8)
    np.save(tmp_path / "a.npy", labels)
    with open(tmp_path / "a.png", "wb") as handle:
        png.Writer(width=10, height=12, greyscale=True, bitdepth=8).write(handle, labels.tolist())
    volume = rng.integers(0, 4, (6, 5, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "a.nii.gz")
    np.testing.assert_array_equal(load_labels(tmp_path / "a.npy"), labels)
    np.testing.assert_array_equal(load_labels(tmp_path / "a.png"), labels)
    np.testing.assert_array_equal(load_labels(tmp_path / "a.nii.gz"), volume)
    path, rows = stores["real"]
    np.testing.assert_array_equal(load_labels(path), rows["test"]["label"])
    np.testing.assert_array_equal(load_labels(path, "val", classes=2), to_view(rows["val"]["label"], 7, 2))


def test_load_labels_errors_name_the_file(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
    np.save(tmp_path / "soft.npy", np.full((2, 2), 0.5))
    np.save(tmp_path / "big.npy", np.full((2, 2), 5, dtype=np.uint8))
    (tmp_path / "incomplete").mkdir()
    cases = {"bad.npy": "cannot read", "soft.npy": "non-integer", "missing.png": "no such file",
             "a.txt": "unknown label file type", "incomplete": "incomplete store"}
    for name, message in cases.items():
        with pytest.raises(LabelIOError, match=message) as info:
            load_labels(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
    with pytest.raises(LabelIOError, match="not a 4-class"):
        load_labels(tmp_path / "big.npy", classes=4)


def test_a_split_without_rows_mixes_in_as_nothing(stores, tmp_path):
    """E.g. a synthetic store whose every mask the filter dropped: serving it adds no rows and breaks nothing."""
    empty = StoreWriter(tmp_path / "empty", classes=7)
    empty.finish(kind="synthetic", image_size=SIZE, has_image=True, shard_counts={"train": 0})
    real = SliceDataset([Source(stores["real"][0], "train", n=5)])
    mixed = SliceDataset([Source(stores["real"][0], "train", n=5), Source(tmp_path / "empty", "train")])
    assert len(mixed) == 5 and mixed._local.dtype.kind == "i"
    assert mixed.intensity_stats() == real.intensity_stats()
    np.testing.assert_array_equal(mixed.class_pixels(), real.class_pixels())
