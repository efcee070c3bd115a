"""`tumorsynth export nnunet`: the raw dataset follows nnU-Net v2's documented format, its pixels are the store's, and
bad inputs are refused naming the field, leaving nothing behind.

The format facts checked here are nnU-Net v2's (documentation/dataset_format.md, experiment_planning/
verify_dataset_integrity.py, imageio/natural_image_reader_writer.py): ``DatasetNNN_NAME`` with a three-digit id;
``imagesTr/<case>_0000.png`` + ``labelsTr/<case>.png`` with the same identifiers and shapes; dataset.json with
``channel_names``, ``labels`` (name → consecutive integers, background 0), ``numTraining`` (= the imagesTr cases) and
``file_ending``. Where nnunetv2 is installed, its own ``verify_dataset_integrity`` runs on an export too.
"""

import csv
import json
import os
import re
import shutil
import stat
from pathlib import Path

import h5py
import numpy as np
import png
import pytest

from toolkit.cli import main
from toolkit.data.png import encode_png
from toolkit.data.store import Store, StoreWriter
from toolkit.export import nnunet

SIZE = 16
SUBJECTS = ("Brats18_TCIA01_131_1", "Brats18_CBICA_AAB_1")


def _write_store(root: Path, kind: str, counts: dict[str, int], classes: int = 7, image: bool = True,
                 seed: int = 0, modality: str = "t1ce") -> Path:
    """A tiny store written with the project's writer: random uint16 images and labels 0…classes−1."""
    rng = np.random.default_rng(seed)
    writer = StoreWriter(root, classes=classes)
    first = 0
    for split, n in counts.items():
        label = rng.integers(0, classes, size=(n, SIZE, SIZE), dtype=np.uint8)
        label[0] = 0  # an empty mask, as real stores have
        rows = {"label": label, "slice_index": np.arange(first, first + n) if kind == "real" else np.full(n, -1)}
        rows["subject"] = ([SUBJECTS[i % 2] for i in range(n)] if kind == "real"
                           else [f"masks-{first + i:07d}" for i in range(n)])
        if image:
            rows["image"] = rng.integers(0, 60000, size=(n, SIZE, SIZE), dtype=np.uint16)
        writer.write(split, 0, **rows)
        first += n
    writer.finish(kind=kind, image_size=SIZE, has_image=image, shard_counts={k: 1 for k in counts},
                  modality=modality)
    return root


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    return _write_store(tmp_path_factory.mktemp("stores") / "real", "real", {"train": 7, "val": 3, "test": 4})


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return _write_store(tmp_path_factory.mktemp("stores") / "syn", "synthetic", {"train": 6}, seed=1)


def _export(capsys, *argv) -> tuple[int, str, str]:
    code = main(["export", "nnunet", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _pixels(path: Path) -> tuple[np.ndarray, int]:
    """A greyscale PNG's pixels and bit depth, read with pypng directly."""
    width, height, rows, info = png.Reader(filename=str(path)).read()
    assert info["greyscale"] and not info["alpha"] and info["planes"] == 1, path
    return np.vstack([np.asarray(r) for r in rows]).reshape(height, width), info["bitdepth"]


def _ihdr(path: Path) -> tuple[int, int]:
    """Bit depth and colour type from the PNG header bytes (colour type 0: greyscale)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return data[24], data[25]


def _rows(store: Path, split: str) -> dict[str, np.ndarray]:
    return Store(store).read(split, fields=("image", "label", "subject", "slice"))


@pytest.fixture(scope="module")
def exported(real, synthetic, tmp_path_factory) -> Path:
    """Real train+val (10) + the first 4 synthetic pairs, 7-class view, id 501."""
    out = tmp_path_factory.mktemp("nnunet_raw")
    doc = nnunet.export_nnunet(real, out, dataset_id=501, name="TumourSynth", classes=7, synthetic=synthetic,
                               synthetic_n=4)
    assert doc["dataset"] == str(out / "Dataset501_TumourSynth")
    return out / "Dataset501_TumourSynth"


def test_dataset_follows_nnunet_v2_raw_format(exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "dataset.json", "imagesTr", "imagesTs", "labelsTr", "labelsTs", "tumorsynth_cases.csv"]
    assert re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", exported.name)
    doc = json.loads((exported / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "T1ce"}
    assert doc["file_ending"] == ".png" and doc["overwrite_image_reader_writer"] == "NaturalImage2DIO"
    assert doc["labels"] == {"background": 0, "NCR/NET": 1, "ED": 2, "ET": 3, "WM": 4, "GM": 5, "CSF": 6}
    values = sorted(doc["labels"].values())
    assert values == list(range(len(values)))  # consecutive from 0
    for half in ("Tr", "Ts"):
        images = sorted(p.name for p in (exported / f"images{half}").iterdir())
        labels = sorted(p.name for p in (exported / f"labels{half}").iterdir())
        assert all(re.fullmatch(r".+_0000\.png", name) for name in images), images
        cases = [name[: -len("_0000.png")] for name in images]
        assert [f"{c}.png" for c in cases] == labels  # one label per case, same identifiers
        for case in cases:
            image, image_depth = _pixels(exported / f"images{half}" / f"{case}_0000.png")
            label, label_depth = _pixels(exported / f"labels{half}" / f"{case}.png")
            assert image.shape == label.shape == (SIZE, SIZE)
            assert (image_depth, label_depth) == (16, 8)
            assert _ihdr(exported / f"images{half}" / f"{case}_0000.png") == (16, 0)
            assert _ihdr(exported / f"labels{half}" / f"{case}.png") == (8, 0)
            assert set(np.unique(label)) <= set(values), case
        if half == "Tr":
            assert doc["numTraining"] == len(cases) == 10 + 4
            assert sum(c.startswith("real_") for c in cases) == 10  # the real store's train + val
            assert [c for c in cases if c.startswith("syn_")] == [f"syn_{i:06d}" for i in range(4)]
            assert "real_Brats18_TCIA01_131_1_s000" in cases
        else:
            assert len(cases) == doc["numTest"] == 4 and all(c.startswith("real_") for c in cases)


def test_pixels_round_trip_to_the_store_rows(exported, real, synthetic):
    rows = _rows(real, "val")
    subject, slice_index = rows["subject"][1].decode(), int(rows["slice"][1])
    case = f"real_{subject}_s{slice_index:03d}"
    image, _ = _pixels(exported / "imagesTr" / f"{case}_0000.png")
    label, _ = _pixels(exported / "labelsTr" / f"{case}.png")
    np.testing.assert_array_equal(image, rows["image"][1])
    np.testing.assert_array_equal(label, rows["label"][1])
    syn = _rows(synthetic, "train")
    np.testing.assert_array_equal(_pixels(exported / "imagesTr" / "syn_000003_0000.png")[0], syn["image"][3])
    np.testing.assert_array_equal(_pixels(exported / "labelsTr" / "syn_000003.png")[0], syn["label"][3])
    test = _rows(real, "test")
    case = f"real_{test['subject'][0].decode()}_s{int(test['slice'][0]):03d}"
    np.testing.assert_array_equal(_pixels(exported / "imagesTs" / f"{case}_0000.png")[0], test["image"][0])
    with open(exported / "tumorsynth_cases.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 10 + 4 + 4
    assert {(r["case"], r["kind"], r["split"], r["row"]) for r in table if r["case"] == "syn_000003"} == {
        ("syn_000003", "syn", "train", "3")}


@pytest.mark.parametrize("classes, labels, view", [
    (7, {"background": 0, "NCR/NET": 1, "ED": 2, "ET": 3, "WM": 4, "GM": 5, "CSF": 6}, [0, 1, 2, 3, 4, 5, 6]),
    (4, {"background": 0, "NCR/NET": 1, "ED": 2, "ET": 3}, [0, 1, 2, 3, 0, 0, 0]),  # tissue → background
    (2, {"background": 0, "tumour": 1}, [0, 1, 1, 1, 0, 0, 0]),  # every tumour class → 1
])
def test_each_class_view_writes_its_labels(real, tmp_path, capsys, classes, labels, view):
    code, out, err = _export(capsys, real, tmp_path, "--id", 502, "--name", f"View{classes}", "--classes", classes,
                             "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["labels"] == labels and doc["numTraining"] == 10 and doc["synthetic"] == 0 and doc["test"] == 4
    folder = Path(doc["dataset"])
    assert json.loads((folder / "dataset.json").read_text())["labels"] == labels
    stored = _rows(real, "train")
    for row in range(len(stored["label"])):
        case = f"real_{stored['subject'][row].decode()}_s{int(stored['slice'][row]):03d}"
        got, depth = _pixels(folder / "labelsTr" / f"{case}.png")
        np.testing.assert_array_equal(got, np.asarray(view, np.uint8)[stored["label"][row]])
        assert depth == 8 and got.max() < classes


def test_a_4_class_store_exports_its_2_class_view_and_refuses_7(tmp_path, capsys):
    store = _write_store(tmp_path / "real4", "real", {"train": 3, "test": 1}, classes=4, modality="flair")
    code, out, err = _export(capsys, store, tmp_path / "raw", "--id", 503, "--name", "Two", "--classes", 2, "--json")
    assert code == 0, err
    assert json.loads(out)["channel_names"] == {"0": "FLAIR"}
    code, _, err = _export(capsys, store, tmp_path / "raw", "--id", 504, "--name", "Seven", "--classes", 7)
    assert code == 2 and "field 'classes'" in err and "no 7-class view" in err
    assert not list((tmp_path / "raw").glob("Dataset504*"))


def _nothing_left(out: Path) -> bool:
    return not out.exists() or not [p for p in out.iterdir() if p.name != ".lock"]


def test_an_existing_dataset_id_is_refused_whatever_its_name(real, tmp_path, capsys):
    (tmp_path / "Dataset501_SomethingElse").mkdir()
    code, _, err = _export(capsys, real, tmp_path, "--id", 501, "--name", "Mine", "--classes", 4)
    assert code == 2 and "Dataset501_SomethingElse" in err and "id 501 is taken" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset501_SomethingElse"]  # nothing else, not even a lock
    code, _, err = _export(capsys, real, tmp_path, "--id", 505, "--name", "Mine", "--classes", 4)
    assert code == 0, err
    code, _, err = _export(capsys, real, tmp_path, "--id", 505, "--name", "Mine", "--classes", 4)
    assert code == 2 and "Dataset505_Mine" in err  # a re-run does not overwrite


def test_too_large_synthetic_n_is_refused_leaving_nothing(real, synthetic, tmp_path, capsys):
    out = tmp_path / "raw"
    code, _, err = _export(capsys, real, out, "--synthetic", synthetic, "--synthetic-n", 7, "--id", 501, "--name",
                           "X", "--classes", 7)
    assert code == 2 and "--synthetic-n" in err and "splits.train.n" in err and "6 synthetic pairs" in err
    assert not out.exists()
    code, _, err = _export(capsys, real, out, "--synthetic", synthetic, "--synthetic-n", 6, "--id", 501, "--name",
                           "X", "--classes", 7)  # all of them is fine
    assert code == 0, err
    assert sorted(p.name for p in (out / "Dataset501_X" / "labelsTr").glob("syn_*")) == [
        f"syn_{i:06d}.png" for i in range(6)]


@pytest.mark.parametrize("case, field", [
    ("mask-only synthetic store", "has_image"),
    ("synthetic store as STORE", "kind"),
    ("other modality", "modality"),
    ("synthetic-n without synthetic", "--synthetic-n"),
    ("bad name", "--name"),
])
def test_bad_inputs_are_refused_naming_the_field(real, synthetic, tmp_path, capsys, case, field):
    out = tmp_path / "raw"
    argv = [real, out]
    if case == "mask-only synthetic store":
        argv += ["--synthetic", _write_store(tmp_path / "masks", "synthetic", {"train": 2}, image=False)]
    elif case == "synthetic store as STORE":
        argv = [synthetic, out]
    elif case == "other modality":
        argv += ["--synthetic", _write_store(tmp_path / "t2", "synthetic", {"train": 2}, modality="t2")]
    elif case == "synthetic-n without synthetic":
        argv += ["--synthetic-n", 2]
    code, _, err = _export(capsys, *argv, "--id", 501, "--name", "bad name" if case == "bad name" else "X",
                           "--classes", 7)
    assert code == 2 and field in err, err
    assert not out.exists()


def test_export_honours_the_umask(real, tmp_path):
    previous = os.umask(0o027)
    try:
        doc = nnunet.export_nnunet(real, tmp_path / "raw", dataset_id=506, name="Group", classes=2)
    finally:
        os.umask(previous)
    folder = Path(doc["dataset"])
    for path in [folder, *folder.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))


def test_a_failed_export_leaves_no_dataset_and_the_next_one_cleans_up(real, tmp_path, monkeypatch):
    out = tmp_path / "raw"
    calls = {"n": 0}
    encode = nnunet.encode_png

    def failing(array):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(28, "No space left on device")
        return encode(array)

    monkeypatch.setattr(nnunet, "encode_png", failing)
    with pytest.raises(OSError, match="No space left"):
        nnunet.export_nnunet(real, out, dataset_id=507, name="Full", classes=4)
    assert _nothing_left(out)
    monkeypatch.setattr(nnunet, "encode_png", encode)
    (out / ".Dataset507_Full.killed.tmp" / "imagesTr").mkdir(parents=True)  # what a killed export leaves
    nnunet.export_nnunet(real, out, dataset_id=507, name="Full", classes=4)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "Dataset507_Full"]


def test_nnunet_verify_dataset_integrity_accepts_the_export_and_rejects_a_broken_one(exported, tmp_path, capfd):
    integrity = pytest.importorskip(
        "nnunetv2.experiment_planning.verify_dataset_integrity",
        reason="nnunetv2 is not installed (pip install nnunetv2; it is not a dependency of tumorsynth)")
    integrity.verify_dataset_integrity(str(exported), num_processes=1)  # raises on any violation
    printed = capfd.readouterr().out  # its worker processes print their findings to the real stdout
    assert "verify_dataset_integrity Done" in printed
    assert not re.search(r"Error:|ERROR|Warning|WARNING", printed), printed
    # the checker is not vacuous: a label outside dataset.json's labels fails it
    broken = tmp_path / exported.name
    shutil.copytree(exported, broken)
    label = next((broken / "labelsTr").glob("real_*.png"))
    label.write_bytes(encode_png(np.full((SIZE, SIZE), 9, np.uint8)))
    with pytest.raises(RuntimeError, match="unexpected labels"):
        integrity.verify_dataset_integrity(str(broken), num_processes=1)


def test_a_corrupt_shard_stops_the_export_naming_it_and_leaves_no_dataset(real, tmp_path, capsys):
    store = tmp_path / "real"
    shutil.copytree(real, store)
    shard = store / "val" / "shard-00000.h5"
    with h5py.File(shard, "r") as f:
        chunk = f["image"].id.get_chunk_info(1)  # row 1's image
    data = bytearray(shard.read_bytes())
    data[chunk.byte_offset + chunk.size // 2] ^= 0xFF  # fletcher32 fails when the row is read
    shard.write_bytes(bytes(data))
    out = tmp_path / "raw"
    code, _, err = _export(capsys, store, out, "--id", 508, "--name", "Corrupt", "--classes", 7)
    assert code == 2 and str(shard) in err, err
    assert _nothing_left(out)
