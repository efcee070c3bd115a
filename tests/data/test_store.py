"""The sharded HDF5 store: shard writing, manifest, reading, resume bookkeeping, verification."""

import json
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from toolkit.data.store import (
    PROGRESS,
    CorruptShardError,
    Store,
    StoreError,
    StoreWriter,
    sha256_file,
    summary,
    verify,
    write_shard,
)


def _rows(n, size=16, seed=0, image=True):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 7, size=(n, size, size), dtype=np.uint8)
    label[0] = 0  # one empty mask
    rows = {"label": label, "subject": [f"s{i % 3}" for i in range(n)], "slice_index": np.arange(n)}
    if image:
        rows["image"] = rng.integers(0, 4000, size=(n, size, size), dtype=np.uint16)
    return rows


def _write_store(root, counts=None, image=True):
    counts = counts or {"train": [10, 10, 5], "val": [4], "test": [4]}
    writer = StoreWriter(root, classes=7)
    written = {}
    for split, sizes in counts.items():
        for index, n in enumerate(sizes):
            rows = _rows(n, seed=10 * index + len(split), image=image)
            writer.write(split, index, **rows)
            written[(split, index)] = rows
    manifest = writer.finish(kind="real", image_size=16, has_image=image,
                             shard_counts={k: len(v) for k, v in counts.items()}, modality="t1ce")
    return manifest, written


def test_round_trip_manifest_and_rows(tmp_path):
    manifest, written = _write_store(tmp_path / "s")
    store = Store(tmp_path / "s")
    assert store.manifest.to_json() == manifest.to_json()
    assert store.manifest.splits["train"].n == 25 and store.manifest.reduced == 5
    got = store.read("train", 8, 22, fields=("label", "image", "slice"))
    expected_label = np.concatenate([written[("train", i)]["label"] for i in range(3)])[8:22]
    np.testing.assert_array_equal(got["label"], expected_label)
    assert got["image"].dtype == np.uint16 and got["image"].shape == (14, 16, 16)
    doc = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert doc["format"] == "tumorsynth-store/1" and doc["splits"]["val"]["n"] == 4
    assert not (tmp_path / "s" / PROGRESS).exists()


def test_shard_layout_chunks_and_per_row_statistics(tmp_path):
    _write_store(tmp_path / "s")
    with h5py.File(tmp_path / "s" / "train" / "shard-00000.h5", "r") as f:
        assert f["image"].chunks == (1, 16, 16)
        for name in f:  # Blosc, then a fletcher32 checksum of the compressed chunk, on every dataset
            plist = f[name].id.get_create_plist()
            assert [plist.get_filter(i)[0] for i in range(plist.get_nfilters())] == [
                hdf5plugin.BLOSC_ID, h5py.h5z.FILTER_FLETCHER32], name
        assert f["label"].dtype == np.uint8 and f["slice"].dtype == np.int16
        label, counts = f["label"][:], f["class_pixels"][:]
        assert f["empty"][:].tolist() == [bool((row == 0).all()) for row in label]
        for row, count in zip(label, counts):
            assert count.tolist() == np.bincount(row.ravel(), minlength=7).tolist()


def test_summary_class_frequencies_match_labels(tmp_path):
    _write_store(tmp_path / "s")
    store = Store(tmp_path / "s")
    info = summary(store)
    labels = store.read("train")["label"]
    freq = np.bincount(labels.ravel(), minlength=7) / labels.size
    np.testing.assert_allclose(list(info["class_frequencies"]["train"].values()), freq)
    assert info["splits"] == {"train": 25, "val": 4, "test": 4} and info["empty"]["train"] == 3


def test_writer_resumes_verified_shards_and_redoes_corrupt_ones(tmp_path):
    root = tmp_path / "s"
    writer = StoreWriter(root, classes=7)
    writer.write("train", 0, **_rows(5, seed=1))
    writer.write("train", 1, **_rows(5, seed=2))
    with open(root / PROGRESS, "a") as handle:
        handle.write('{"split": "train", "ind')  # torn line, as a kill mid-append would leave
    (root / "train" / "shard-00001.h5").write_bytes(b"garbage")
    writer.close()  # as a killed writer's lock goes with its process
    again = StoreWriter(root, classes=7)
    assert again.done("train", 0) is not None
    assert again.done("train", 1) is None
    with pytest.raises(StoreError, match="lacks shards"):
        again.finish(kind="real", image_size=16, has_image=True, shard_counts={"train": 2})


def test_verify_names_a_corrupt_shard(tmp_path):
    _write_store(tmp_path / "s")
    store = Store(tmp_path / "s")
    assert verify(store) == []
    shard = tmp_path / "s" / "val" / "shard-00000.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify(store)
    assert len(problems) == 1 and "val/shard-00000.h5" in problems[0] and "corrupt" in problems[0]


def test_incomplete_and_malformed_stores_are_named(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(StoreError, match="incomplete store"):
        Store(tmp_path / "s")
    (tmp_path / "s" / "manifest.json").write_text('{"format": "tumorsynth-store/1", "kind": "real"}')
    with pytest.raises(StoreError, match=r"manifest\.json: missing field 'splits'"):
        Store(tmp_path / "s")


def test_mask_only_store_has_no_image(tmp_path):
    manifest, _ = _write_store(tmp_path / "m", counts={"train": [6]}, image=False)
    assert manifest.intensity_max is None and not manifest.has_image
    with h5py.File(tmp_path / "m" / "train" / "shard-00000.h5", "r") as f:
        assert "image" not in f
    assert verify(Store(tmp_path / "m")) == []


def test_subject_names_are_fixed_length_utf8_and_round_trip(tmp_path):
    rows = _rows(3)
    rows["subject"] = ["Brats18_2013_1_1", "BraTS-GLI-ü", "x"]
    writer = StoreWriter(tmp_path / "s", classes=7)
    writer.write("train", 0, **rows)
    with h5py.File(tmp_path / "s" / "train" / "shard-00000.h5", "r") as f:
        assert f["subject"].dtype.kind == "S"  # inline, not in HDF5's variable-length global heap
        assert f["subject"].asstr()[:].tolist() == rows["subject"]


def _flip_chunk_bit(path, dataset="label", row=0):
    """Flip one bit in the middle of a chunk's stored bytes (the data region, not HDF5's metadata)."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(row)
    data = bytearray(path.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_read_of_a_flipped_bit_raises_naming_the_shard(tmp_path):
    _write_store(tmp_path / "s")
    store = Store(tmp_path / "s")
    shard = tmp_path / "s" / "train" / "shard-00001.h5"
    _flip_chunk_bit(shard, row=3)
    store.read("train", 0, 10)  # the first shard is intact
    with pytest.raises(CorruptShardError, match=r"train/shard-00001\.h5: cannot read the shard"):
        store.read("train", 10, 20)


def test_shard_without_fletcher32_is_checked_against_its_checksum_on_first_open(tmp_path):
    """A shard of a store written before fletcher32 (rewritten here with the old Blosc-only filter)."""
    _write_store(tmp_path / "s", counts={"train": [6]})
    path = tmp_path / "s" / "train" / "shard-00000.h5"
    with h5py.File(path, "r") as f:
        rows = {name: f[name][:] for name in f}
    with h5py.File(path, "w") as f:
        for name, array in rows.items():
            f.create_dataset(name, data=array, **hdf5plugin.Blosc(cname="lz4", clevel=5,
                                                                  shuffle=hdf5plugin.Blosc.SHUFFLE))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = sha256_file(path)
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_array_equal(Store(tmp_path / "s").read("train")["label"], rows["label"])
    _flip_chunk_bit(path)
    with pytest.raises(CorruptShardError, match=r"train/shard-00000\.h5: checksum mismatch"):
        Store(tmp_path / "s").read("train")


def test_shard_bytes_do_not_depend_on_the_writing_process(tmp_path):
    """The same rows written here and in a fresh interpreter give the same file: checksums name content only."""
    script = (
        "import sys; from pathlib import Path; from tests.data.test_store import _rows; "
        "from toolkit.data.store import write_shard; "
        "print(write_shard(Path(sys.argv[1]), classes=7, **_rows(9, seed=4)).sha256)"
    )
    other = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b" / "shard-00000.h5")],
                           capture_output=True, text=True, timeout=120, check=True, cwd=Path(__file__).parents[2])
    mine = write_shard(tmp_path / "a" / "shard-00000.h5", classes=7, **_rows(9, seed=4))
    assert other.stdout.strip() == mine.sha256 == sha256_file(tmp_path / "a" / "shard-00000.h5")
    assert (tmp_path / "a" / "shard-00000.h5").read_bytes() == (tmp_path / "b" / "shard-00000.h5").read_bytes()
