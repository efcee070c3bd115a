"""Stores that any HDF5 tool reads: `prepare --compression`, `store convert`, and the manifest's ``compression``.

Both stores are the shared phantom cohort prepared small (32², 4 classes, no PNGs: seconds each), with prepare's
default codec (Blosc LZ4) and with ``--compression gzip``. "Plain" readers run in a child process with
``HDF5_PLUGIN_PATH`` pointing at an empty folder and never import hdf5plugin, as h5py, h5dump, HDFView or MATLAB would
on a machine without it.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest

from toolkit.cli import main
from toolkit.data.convert import convert
from toolkit.data.prepare import PrepareConfig, PrepareError, prepare
from toolkit.data.store import MANIFEST, Store, StoreError, StoreWriter, dataset_codec, sha256_file, verify
from toolkit.lock import LockedError, WriterLock
from toolkit.provenance import OptionsChanged

# Reads every shard of a store with h5py and prints, per shard, the sha256 of each dataset's bytes and the HDF5
# filter ids it carries. Plain (argv[2] "plain"), it asserts that hdf5plugin never got imported (by h5py or anything
# else); with "plugin" it imports hdf5plugin first, as the README tells readers of a Blosc store to.
_READER = """
import hashlib, json, sys
from pathlib import Path
if sys.argv[2] == "plugin":
    import hdf5plugin
import h5py
root = Path(sys.argv[1])
manifest = json.loads((root / "manifest.json").read_text())
out = {}
for split in manifest["splits"].values():
    for shard in split["shards"]:
        with h5py.File(root / shard["file"], "r") as f:
            for name in f:
                plist = f[name].id.get_create_plist()
                ids = sorted(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
                out[shard["file"] + ":" + name] = [hashlib.sha256(f[name][()].tobytes()).hexdigest(), ids]
assert sys.argv[2] == "plugin" or "hdf5plugin" not in sys.modules, "hdf5plugin was imported"
print(json.dumps(out))
"""


SMALL = {"size": 32, "shard_size": 256, "tissue": "none", "png": False}


@pytest.fixture(scope="module")
def blosc_store(cohort, tmp_path_factory) -> Path:
    """The phantom cohort prepared at 32², 4 classes, without PNGs, with the default codec (Blosc LZ4)."""
    out = tmp_path_factory.mktemp("blosc") / "store"
    prepare(PrepareConfig(src=cohort, out=out, **SMALL))
    return out


@pytest.fixture(scope="module")
def gzip_store(cohort, tmp_path_factory) -> Path:
    """The phantom cohort prepared at 32², 4 classes, without PNGs, with ``compression="gzip"``."""
    out = tmp_path_factory.mktemp("gzip") / "store"
    prepare(PrepareConfig(src=cohort, out=out, compression="gzip", **SMALL))
    return out


@pytest.fixture(scope="module")
def converted(blosc_store, tmp_path_factory) -> Path:
    """``blosc_store`` converted to gzip through the command line."""
    out = tmp_path_factory.mktemp("converted") / "gzip"
    assert main(["store", "convert", str(blosc_store), str(out), "--compression", "gzip"]) == 0
    return out


@pytest.fixture
def no_plugins(tmp_path) -> dict[str, str]:
    """An environment in which HDF5 finds no filter plugins (an empty ``HDF5_PLUGIN_PATH``)."""
    empty = tmp_path / "no-plugins"
    empty.mkdir()
    return {**os.environ, "HDF5_PLUGIN_PATH": str(empty)}


def _plain_read(store: Path, env: dict[str, str], plugin: bool = False) -> subprocess.CompletedProcess:
    """:data:`_READER` on ``store`` in a child process (importing hdf5plugin first only with ``plugin``)."""
    return subprocess.run([sys.executable, "-c", _READER, str(store), "plugin" if plugin else "plain"], env=env,
                          capture_output=True, text=True, timeout=60)


def _datasets(store: Path) -> dict[str, np.ndarray]:
    """Every dataset of every shard of ``store`` (read through the toolkit, hdf5plugin loaded), by file:name."""
    out = {}
    for split in Store(store).manifest.splits.values():
        for shard in split.shards:
            with h5py.File(store / shard.file, "r") as f:
                out.update({f"{shard.file}:{name}": f[name][()] for name in f})
    return out


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def test_gzip_prepared_store_reads_in_plain_h5py_without_hdf5plugin(gzip_store, no_plugins):
    result = _plain_read(gzip_store, no_plugins)
    assert result.returncode == 0, result.stderr
    plain = json.loads(result.stdout)
    expected = _datasets(gzip_store)
    assert set(plain) == set(expected) and any(key.endswith(":image") for key in plain)
    for key, array in expected.items():
        digest, filters = plain[key]
        assert digest == hashlib.sha256(array.tobytes()).hexdigest(), key
        assert filters == [1, 2, 3], f"{key}: filters {filters}, expected deflate, shuffle, fletcher32"
    manifest = Store(gzip_store).manifest
    assert manifest.codec == "gzip" and manifest.compression.startswith("gzip")
    assert manifest.provenance["options"]["compression"] == "gzip"
    assert verify(Store(gzip_store)) == []


def test_blosc_store_needs_hdf5plugin_which_is_why_gzip_exists(blosc_store, no_plugins):
    result = _plain_read(blosc_store, no_plugins)
    # h5py's words: "can't find plugin" here, "can't open directory (/usr/local/hdf5/lib/plugin)" with no path set
    assert result.returncode != 0 and "plugin" in result.stderr.splitlines()[-1], result.stderr[-2000:]
    # the same reader succeeds once hdf5plugin registers Blosc: it is the plugin that is missing, not the reader
    helped = _plain_read(blosc_store, no_plugins, plugin=True)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert all(filters == [3, 32001] for _, filters in json.loads(helped.stdout).values())


def test_h5dump_reads_a_gzip_shard_value_for_value(gzip_store, no_plugins, tmp_path):
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump is not installed (Debian's hdf5-tools: apt-get install hdf5-tools)")
    shard = Store(gzip_store).manifest.splits["train"].shards[0]
    dumped = tmp_path / "label.txt"
    command = ["h5dump", "-d", "/label", "-y", "-w", "0", "-o", str(dumped), str(gzip_store / shard.file)]
    result = subprocess.run(command, env=no_plugins, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stderr
    values = np.array(dumped.read_text().replace(",", " ").split(), dtype=np.uint8)
    with h5py.File(gzip_store / shard.file, "r") as f:
        label = f["label"][()]
    assert label.any() and values.shape == (label.size,)
    np.testing.assert_array_equal(values.reshape(label.shape), label)


def test_convert_blosc_to_gzip_keeps_every_dataset_and_the_manifest_and_passes_verify(blosc_store, converted,
                                                                                      no_plugins):
    source, out = _datasets(blosc_store), _datasets(converted)
    assert set(out) == set(source)
    for key, array in source.items():
        assert out[key].dtype == array.dtype and h5py.check_string_dtype(out[key].dtype) == h5py.check_string_dtype(
            array.dtype), key
        np.testing.assert_array_equal(out[key], array, err_msg=key)
    before, after = Store(blosc_store).manifest.to_json(), Store(converted).manifest.to_json()
    assert after["compression"] == "gzip-4-shuffle+fletcher32" and before["compression"].startswith("blosc-lz4")
    for split, info in before["splits"].items():
        old, new = info.pop("shards"), after["splits"][split].pop("shards")
        assert [dict(s, sha256=None) for s in old] == [dict(s, sha256=None) for s in new]
        assert all(a["sha256"] != b["sha256"] for a, b in zip(old, new))  # the bytes did change
    conversion = after["provenance"].pop("conversions")[-1]
    assert conversion["source_compression"] == "blosc-lz4" and conversion["compression"] == "gzip"
    assert after["provenance"]["options"].pop("compression") == "gzip"
    for doc in (before, after):
        doc.pop("compression")
    assert after == before
    assert verify(Store(converted)) == []
    assert main(["store", "verify", str(converted)]) == 0
    assert _plain_read(converted, no_plugins).returncode == 0


def test_store_converted_to_gzip_is_complete_for_prepare_with_gzip_and_refused_without(cohort, converted):
    assert prepare(PrepareConfig(src=cohort, out=converted, compression="gzip", **SMALL)).already_complete
    with pytest.raises(OptionsChanged, match="compression"):
        prepare(PrepareConfig(src=cohort, out=converted, **SMALL))


def test_convert_to_none_copies_the_pngs_honours_the_umask_and_reads_back(gzip_store, tmp_path, no_plugins):
    source, out = tmp_path / "source", tmp_path / "plain"
    shutil.copytree(gzip_store, source)
    pngs = {Path("png/val/image/a_s000.png"): b"\x89PNG one", Path("png/test/label/b_s154.png"): b"\x89PNG two"}
    for name, data in pngs.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    previous = os.umask(0o027)
    try:
        result = convert(source, out, "none")
    finally:
        os.umask(previous)
    assert result.source_codec == "gzip" and result.manifest.codec == "none" and result.bytes > result.source_bytes
    assert result.pngs == 2 and all((out / name).read_bytes() == data for name, data in pngs.items())
    modes = {p.relative_to(out): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o750}
    assert {m for p, m in modes.items() if (out / p).is_file()} == {0o640}
    store = Store(out)
    for split in store.manifest.splits:
        np.testing.assert_array_equal(store.read(split, fields=("image",))["image"],
                                      Store(gzip_store).read(split, fields=("image",))["image"])
    with h5py.File(out / store.manifest.splits["val"].shards[0].file, "r") as f:
        assert {dataset_codec(f[name]) for name in f} == {"none"}
    assert json.loads(_plain_read(out, no_plugins).stdout)  # filters: fletcher32 only
    assert verify(store) == []


def test_convert_refuses_an_existing_out_and_leaves_it_untouched(gzip_store, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "keep.txt").write_text("mine")
    before = _files(tmp_path)
    for name in ("empty", "store"):
        assert main(["store", "convert", str(gzip_store), str(tmp_path / name), "--compression", "none"]) == 2
        assert f"{tmp_path / name}: already exists" in capsys.readouterr().err
    assert _files(tmp_path) == before and (tmp_path / "store" / "keep.txt").read_text() == "mine"


def test_convert_of_a_truncated_shard_fails_naming_it_and_leaves_nothing(gzip_store, tmp_path, capsys):
    source = tmp_path / "source"
    shutil.copytree(gzip_store, source)
    bad = source / Store(source).manifest.splits["val"].shards[0].file  # after the train shards are written
    bad.write_bytes(bad.read_bytes()[:4096])
    before = _files(tmp_path)
    assert main(["store", "convert", str(source), str(tmp_path / "out"), "--compression", "blosc-lz4"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: checksum mismatch" in err and "corrupt" in err
    assert _files(tmp_path) == before  # neither OUT nor its temporary folder


def test_convert_of_a_folder_that_is_no_store_fails_naming_it(tmp_path, capsys):
    (tmp_path / "cohort").mkdir()
    assert main(["store", "convert", str(tmp_path / "cohort"), str(tmp_path / "out"), "--compression", "gzip"]) == 2
    assert f"{tmp_path / 'cohort'}: incomplete store (no manifest.json)" in capsys.readouterr().err
    assert _files(tmp_path) == {"cohort"}
    assert main(["store", "convert", str(tmp_path / "cohort"), "--compression", "gzip"]) == 2  # no OUT
    assert "store convert needs OUT and --compression" in capsys.readouterr().err


def test_second_conversion_to_the_same_out_is_refused_and_a_killed_ones_leftovers_go(gzip_store, tmp_path):
    work = tmp_path / ".out.converting"
    with WriterLock(work, "store conversion"), pytest.raises(LockedError, match="being written"):
        convert(gzip_store, tmp_path / "out", "none")
    assert not (tmp_path / "out").exists()
    (work / "train").mkdir()
    (work / "train" / "shard-00099.h5").write_bytes(b"left by a killed conversion")
    convert(gzip_store, tmp_path / "out", "none")
    assert not work.exists() and not (tmp_path / "out" / "train" / "shard-00099.h5").exists()
    assert verify(Store(tmp_path / "out")) == []


def test_manifest_without_compression_means_blosc_and_an_unknown_one_is_refused(blosc_store, tmp_path):
    doc = json.loads((blosc_store / MANIFEST).read_text())
    cases = ((None, "blosc-lz4"), ("blosc-lz4-shuffle", "blosc-lz4"), ("gzip-4-shuffle+fletcher32", "gzip"))
    for value, codec in cases:
        folder = tmp_path / str(value)
        folder.mkdir()
        (folder / MANIFEST).write_text(json.dumps({k: v for k, v in doc.items() if k != "compression"}
                                                  | ({"compression": value} if value else {})))
        assert Store(folder).manifest.codec == codec, value
    (tmp_path / "zstd").mkdir()
    (tmp_path / "zstd" / MANIFEST).write_text(json.dumps(doc | {"compression": "zstd-3"}))
    with pytest.raises(StoreError, match="field 'compression' is 'zstd-3'"):
        Store(tmp_path / "zstd")


def test_unknown_codec_is_refused_by_prepare_and_the_store_writer(cohort, tmp_path):
    with pytest.raises(PrepareError, match="--compression"):
        PrepareConfig(src=cohort, out=tmp_path / "s", compression="lzf")
    with pytest.raises(ValueError, match="lzf"):
        StoreWriter(tmp_path / "w", classes=4, compression="lzf")
    with pytest.raises(ValueError, match="lzf"):
        convert(tmp_path, tmp_path / "out", "lzf")


def test_default_prepare_records_no_compression_option(blosc_store):
    """Stores prepared before ``--compression`` existed recorded no such option: their re-runs must still match."""
    options = Store(blosc_store).manifest.provenance["options"]
    assert "compression" not in options and Store(blosc_store).manifest.codec == "blosc-lz4"


def test_verify_names_shards_not_written_with_the_manifests_compression(blosc_store, tmp_path):
    """A manifest that says gzip over Blosc shards would promise plain HDF5 tools a store they cannot read."""
    source = tmp_path / "store"
    shutil.copytree(blosc_store, source)
    assert verify(Store(source)) == []
    doc = json.loads((source / MANIFEST).read_text())
    (source / MANIFEST).write_text(json.dumps(doc | {"compression": "gzip-4-shuffle+fletcher32"}))
    problems = verify(Store(source))
    shards = [s.file for split in Store(source).manifest.splits.values() for s in split.shards]
    assert len(problems) == len(shards) and all("not written with the manifest's compression" in p for p in problems)
    assert main(["store", "verify", str(source)]) == 1


def test_convert_rewrites_a_store_of_the_first_format_version(blosc_store, tmp_path):
    """Shards as the first tumorsynth wrote them: Blosc without fletcher32 on image and label, the per-row metadata
    uncompressed, subjects as variable-length strings; manifest ``blosc-lz4-shuffle``. They convert value for value."""
    source = tmp_path / "old"
    shutil.copytree(blosc_store, source)
    doc = json.loads((source / MANIFEST).read_text())
    for split in doc["splits"].values():
        for shard in split["shards"]:
            path = source / shard["file"]
            with h5py.File(path, "r") as f:
                rows = {name: f[name][()] for name in f}
            with h5py.File(path, "w") as f:
                blosc = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
                for name in ("image", "label"):
                    f.create_dataset(name, data=rows[name], chunks=(1, *rows[name].shape[1:]), **blosc)
                f.create_dataset("subject", data=rows["subject"].astype(object), dtype=h5py.string_dtype())
                for name in ("slice", "empty", "class_pixels"):
                    f.create_dataset(name, data=rows[name])
            shard["sha256"] = sha256_file(path)
    (source / MANIFEST).write_text(json.dumps(doc | {"compression": "blosc-lz4-shuffle"}))
    assert verify(Store(source)) == []
    convert(source, tmp_path / "new", "gzip")
    assert verify(Store(tmp_path / "new")) == []
    old, new = Store(source), Store(tmp_path / "new")
    for split in old.manifest.splits:
        fields = ("image", "label", "subject", "slice", "empty", "class_pixels")
        a, b = old.read(split, fields=fields), new.read(split, fields=fields)
        for name in fields:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{split}:{name}")
    with h5py.File(tmp_path / "new" / new.manifest.splits["train"].shards[0].file, "r") as f:
        assert {dataset_codec(f[name]) for name in f} == {"gzip"}
