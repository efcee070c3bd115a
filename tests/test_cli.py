"""The `tumorsynth` command: JSON contract, exit codes, and errors that name the file."""

import json
import subprocess
import sys


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
