"""`evaluate swd` of a reduced PGAN run: scored against the reduced prefix of its store, repeated to --images (as the
official code repeats its training set), said so in swd.csv and the options record; snapshots without ``reduced``
(older runs) are scored against the full split as before; the same rows on 1 and 2 MPI ranks."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.bench.zscore import phantom_masks
from toolkit.config import to_dict
from toolkit.data.store import Store, StoreWriter
from toolkit.models.pgan import Generator, PGANConfig
from toolkit.mpi import clean_environment, mpirun_command
from toolkit.provenance import OptionsChanged
from toolkit.train.pgan import reals_at, to_labels
from toolkit.train.pgan_eval import evaluate_snapshots, real_masks

CLI = [sys.executable, "-m", "toolkit.cli"]
ENV = {**clean_environment(), "OMP_NUM_THREADS": "1"}


def _store(root: Path, labels: np.ndarray, shard: int = 10) -> Path:
    """A real mask-only store whose train split is ``labels`` (rows in this order), in shards of ``shard`` rows."""
    writer = StoreWriter(root, classes=7)
    starts = range(0, len(labels), shard)
    for i, lo in enumerate(starts):
        rows = labels[lo:lo + shard]
        writer.write("train", i, label=rows, subject=[f"s{lo + j}" for j in range(len(rows))],
                     slice_index=np.arange(lo, lo + len(rows)))
    writer.finish(kind="real", image_size=labels.shape[-1], has_image=False, shard_counts={"train": len(starts)})
    return root


def _snapshot(path: Path, tick: int, store: Path, reduced: bool | None) -> None:
    """A tick snapshot of a fresh 32² generator as the trainer writes it (``reduced`` None: as before the key)."""
    torch.manual_seed(tick)
    config = PGANConfig(resolution=32, latent=16, fmap_base=64, fmap_max=16)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"G_ema": Generator(config).state_dict(), "model": to_dict(config), "lod": 0.0, "kimg": 1.0 + tick,
           "tick": tick, "store": str(store)}
    torch.save(doc if reduced is None else {**doc, "reduced": reduced}, path)


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """50 training rows of 32² masks, every 5th one empty: the reduced prefix is rows 0-9 (8 non-empty)."""
    labels = phantom_masks(np.random.default_rng(0), 50, 32)
    labels[::5] = 0
    return _store(tmp_path_factory.mktemp("swd-reduced") / "real", labels)


def _run(root: Path, real: Path, reduced: bool | None) -> Path:
    for tick in (0, 1):
        _snapshot(root / "snapshots" / f"tick-{tick:04d}.pt", tick, real, reduced)
    return root


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "swd.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_reduced_real_set_is_the_prefix_s_non_empty_masks_repeated_in_order(real):
    store = Store(real)
    assert store.manifest.reduced == 10
    prefix = store.read("train", 0, 10, fields=("label",))["label"]
    kept = to_labels(reals_at(torch.from_numpy(prefix[prefix.reshape(10, -1).any(1)]), 16)[:, 0]).numpy()
    assert len(kept) == 8
    tiled = real_masks(real, 20, 16, reduced=True)
    assert tiled.shape == (20, 16, 16)
    np.testing.assert_array_equal(tiled, kept[np.arange(20) % 8])  # 8 masks, then again, then the first 4
    full = real_masks(real, 64, 16)  # the full set keeps its rule: the first --images, fewer if it has fewer
    assert len(full) == 40


def test_a_reduced_run_is_scored_against_the_reduced_set_and_says_so(real, tmp_path):
    run = _run(tmp_path / "pgan", real, reduced=True)
    doc = evaluate_snapshots(run, images=16)
    assert doc["real_set"] == "reduced" and doc["snapshots"] == 2
    rows = _rows(run)
    assert [r["real_set"] for r in rows] == ["reduced", "reduced"]
    assert {"snapshot", "kimg", "swd_avg"} <= set(rows[0])  # what the demo report reads
    assert json.loads((run / "swd" / "options.json").read_text())["real_set"] == "reduced"
    assert torch.load(run / "swd-real.pt", weights_only=True)["meta"]["images"] == 16  # 8 masks, repeated
    with pytest.raises(OptionsChanged):  # rows against the reduced set are never mixed with rows against the full one
        evaluate_snapshots(run, images=16, reduced=False)
    # the same snapshots against the full split (explicitly): other numbers
    full = _run(tmp_path / "pgan-full", real, reduced=True)
    assert evaluate_snapshots(full, images=16, reduced=False)["real_set"] == "full"
    assert [r["swd_avg"] for r in _rows(full)] != [r["swd_avg"] for r in rows]


def test_snapshots_without_reduced_are_scored_against_the_full_set_as_before(real, tmp_path):
    old = _run(tmp_path / "old", real, reduced=None)
    explicit = _run(tmp_path / "explicit", real, reduced=False)
    for run in (old, explicit):
        assert evaluate_snapshots(run, images=16)["real_set"] == "full"
        assert "real_set" not in json.loads((run / "swd" / "options.json").read_text())  # as recorded before
    assert _rows(old) == _rows(explicit)
    # a table written before the column existed resumes: its row gets the column, the missing snapshots are scored
    first = _rows(old)[0]
    del first["real_set"]
    (old / "swd.csv").write_text(",".join(first) + "\n" + ",".join(first.values()) + "\n")
    _snapshot(old / "snapshots" / "tick-0002.pt", 2, real, None)
    assert evaluate_snapshots(old, images=16)["scored_now"] == 2  # tick-0001 (not in that table) and tick-0002
    rows = _rows(old)
    assert rows[0] == {**first, "real_set": "full"} and [r["real_set"] for r in rows] == ["full"] * 3


@pytest.mark.mpi
def test_reduced_swd_over_two_mpi_ranks_equals_one_rank(real, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    one, two = _run(tmp_path / "one", real, reduced=True), _run(tmp_path / "two", real, reduced=True)
    _snapshot(one / "snapshots" / "tick-0002.pt", 2, real, True)
    _snapshot(two / "snapshots" / "tick-0002.pt", 2, real, True)
    args = ["evaluate", "swd", "--images", "16", "--json"]
    single = subprocess.run([*CLI, args[0], args[1], str(one), *args[2:]], capture_output=True, text=True, env=ENV,
                            timeout=600)
    assert single.returncode == 0, single.stderr
    double = subprocess.run(mpirun_command(2, args[0], args[1], str(two), *args[2:]), capture_output=True, text=True,
                            env=ENV, timeout=600)
    assert double.returncode == 0, double.stderr
    assert json.loads(double.stdout)["ranks"] == 2 and json.loads(double.stdout)["real_set"] == "reduced"
    assert _rows(one) == _rows(two) and len(_rows(one)) == 3
