"""The `tumorsynth` command: JSON contract, exit codes, and errors that name the file."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest


def run(*args):
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_store_info_json_has_the_contract_keys(store_64):
    result = run("store", "info", store_64, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"format", "kind", "image_size", "classes", "splits", "reduced"} <= set(doc)
    assert doc["format"] == "tumorsynth-store/1" and doc["splits"]["val"] == 62


def test_store_verify_names_a_corrupt_shard_and_exits_non_zero(store_64, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(store_64), str(copy)], check=True)
    assert run("store", "verify", copy).returncode == 0
    shard = copy / "train" / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run("store", "verify", copy, "--json")
    assert result.returncode == 1
    assert any("train/shard-00001.h5" in p for p in json.loads(result.stdout)["problems"])


def test_prepare_error_names_the_file_and_exits_non_zero(tmp_path):
    result = run("prepare", tmp_path / "nowhere", tmp_path / "out")
    assert result.returncode != 0 and "nowhere" in result.stderr and not (tmp_path / "out").exists()


def _test_labels_4class(store):
    """The store's test-split labels in the 4-class view, read straight from the shard files (not through the
    library's reader) and mapped by the stored scheme (0 BG, 1 NCR/NET, 2 ED, 3 ET, 4-6 tissue → BG)."""
    manifest = json.loads((store / "manifest.json").read_text())
    parts = []
    for shard in manifest["splits"]["test"]["shards"]:
        with h5py.File(store / shard["file"], "r") as f:
            parts.append(f["label"][:])
    labels = np.concatenate(parts)
    return np.where(labels <= 3, labels, 0).astype(np.uint8)


def test_dice_command_on_a_store_against_a_known_prediction_and_label_files(store_64, tmp_path):
    """A prediction that relabels k oedema pixels of the store's test split as necrosis: per class, with counts n_c
    of the truth, Dice(NCR) = 2 n1 / (2 n1 + k), Dice(ED) = 2 (n2 − k) / (2 n2 − k), BG and ET exactly 1."""
    truth = _test_labels_4class(store_64)
    n1, n2 = int((truth == 1).sum()), int((truth == 2).sum())
    oedema = np.flatnonzero(truth == 2)
    assert n1 > 0 and len(oedema) >= 4, (n1, n2)  # the phantom's test slices have tumour
    k = len(oedema) // 3
    pred = truth.copy()
    pred.flat[oedema[:k]] = 1
    np.save(tmp_path / "pred.npy", pred)
    expected = [1.0, 2 * n1 / (2 * n1 + k), 2 * (n2 - k) / (2 * n2 - k), 1.0]
    for args in (("pred.npy", store_64), (store_64, "pred.npy")):  # the store as ground truth, then as prediction
        result = run("dice", *(tmp_path / a if a == "pred.npy" else a for a in args), "--classes", "4", "--json")
        assert result.returncode == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["per_class"] == pytest.approx(expected, rel=1e-12)
        assert doc["weighted"] == pytest.approx(sum(expected) / 4, rel=1e-12)  # the command weighs classes uniformly
    gt = np.zeros((2, 4, 4), np.uint8)
    gt[:, :2] = 1
    pred = gt.copy()
    pred[0] = 0  # half of the foreground lost: Dice(1) = 2·16 / (16 + 32) = 2/3
    np.save(tmp_path / "gt.npy", gt)
    np.save(tmp_path / "pred.npy", pred)
    doc = json.loads(run("dice", tmp_path / "pred.npy", tmp_path / "gt.npy", "--classes", "2", "--json").stdout)
    assert doc["per_class"][1] == pytest.approx(2 / 3)
    bad = run("dice", tmp_path / "pred.npy", tmp_path / "missing.npy", "--classes", "2")
    assert bad.returncode != 0 and "missing.npy" in bad.stderr
