"""The z-score filter: moments, norms, the σ = 0 rule, the filtered store and CSV, rank invariance, calibration."""

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
from mpi4py import MPI

from toolkit.bench.zscore import phantom_masks
from toolkit.data.labels import reduce_labels
from toolkit.data.store import Store, StoreWriter, verify
from toolkit.filter.zscore import Moments, calibrate, filter_store, norms, real_moments
from toolkit.mpi import clean_environment, mpirun_command

SIZE = 16


def _store(root, splits, *, kind, image=False, shard=40):
    """A store from {split: labels}, written in shards of ``shard`` rows (images derived from labels if asked)."""
    writer = StoreWriter(root, classes=7)
    counts = {}
    for split, labels in splits.items():
        counts[split] = 0
        for i, lo in enumerate(range(0, len(labels), shard)):
            rows = labels[lo:lo + shard]
            writer.write(split, i, label=rows, subject=[f"{split}{lo + j}" for j in range(len(rows))],
                         slice_index=np.arange(lo, lo + len(rows)),
                         image=(rows.astype(np.uint16) * 100 + 7) if image else None)
            counts[split] = i + 1
    size = next(iter(splits.values())).shape[-1]
    writer.finish(kind=kind, image_size=size, has_image=image, shard_counts=counts)
    return root


def _labels(seed, n, empty_every=5):
    labels = phantom_masks(np.random.default_rng(seed), n, SIZE)
    labels[::empty_every] = 0  # some all-background rows, which the statistics must skip
    return labels


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("zscore")
    train, val = _labels(1, 130), _labels(2, 60)
    real = _store(root / "real", {"train": train, "val": val, "test": _labels(3, 10)}, kind="real")
    synth = {"train": _labels(4, 90, empty_every=7), "val": _labels(5, 30, empty_every=7)}
    synth["train"][3, 0, 0] = 6  # a corner pixel that is background in every real mask: σ = 0 there
    synthetic = _store(root / "synthetic", synth, kind="synthetic", image=True)
    return {"real": real, "synthetic": synthetic, "train": train, "val": val, "synth": synth, "root": root}


def test_moments_merge_matches_numpy_over_random_splits():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 7, (200, 5, 4)).astype(np.float64)
    for _ in range(5):
        cuts = np.sort(rng.choice(np.arange(1, 200), 4, replace=False))
        merged = Moments.of(data[:0])
        for part in np.split(data, cuts):
            merged = merged.merge(Moments.of(part))
        assert merged.count == 200
        np.testing.assert_allclose(merged.mean, data.mean(0), rtol=1e-12)
        np.testing.assert_allclose(merged.std, data.std(0), rtol=1e-12)


@pytest.mark.parametrize("reduced", [False, True])
def test_real_moments_cover_the_non_empty_training_masks(stores, reduced):
    rows = stores["train"][:Store(stores["real"]).manifest.reduced] if reduced else stores["train"]
    rows = rows[rows.reshape(len(rows), -1).any(1)].astype(np.float64)
    moments = real_moments(stores["real"], reduced=reduced, comm=MPI.COMM_SELF)
    assert moments.count == len(rows)
    np.testing.assert_allclose(moments.mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.std, rows.std(0), rtol=1e-12, atol=1e-12)


def test_norms_match_the_direct_formula_and_follow_the_zero_variance_rule():
    rng = np.random.default_rng(1)
    mean, std = rng.uniform(0, 6, (4, 4)), rng.uniform(0.5, 2, (4, 4))
    mean[0, 0], std[0, 0] = 2.0, 0.0  # a zero-variance pixel whose value is 2
    moments = Moments(10, mean, std**2 * 10)
    labels = rng.integers(0, 7, (50, 4, 4)).astype(np.uint8)
    labels[:25, 0, 0] = 2
    labels[25:, 0, 0] = 3
    got = norms(labels, moments)
    live = np.ones((4, 4), bool)
    live[0, 0] = False
    expected = np.sqrt((((labels - mean) / np.where(live, std, 1)) ** 2 * live).sum(axis=(1, 2)))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got[:25], expected[:25], rtol=1e-12)  # equal to μ: contributes 0
    assert np.isinf(got[25:]).all()  # differs from μ where σ = 0: infinite, always dropped


def _norms_by_split(stores):
    moments = real_moments(stores["real"], reduced=False, comm=MPI.COMM_SELF)
    return {split: norms(labels, moments) for split, labels in stores["synth"].items()}


def test_filter_keeps_exactly_the_rows_within_the_threshold(stores, tmp_path, figure):
    expected = _norms_by_split(stores)
    threshold = float(np.median(np.concatenate(list(expected.values()))))  # drops about half
    out = tmp_path / "kept"
    result = filter_store(stores["real"], stores["synthetic"], out, threshold=threshold, comm=MPI.COMM_SELF)
    kept = Store(out)
    assert verify(kept) == []
    assert kept.manifest.has_image and kept.manifest.kind == "synthetic"
    assert np.isinf(expected["train"][3])  # the σ = 0 corner
    total = sum(len(v) for v in expected.values())
    assert result["kept"] == sum(int((v <= threshold).sum()) for v in expected.values())
    assert result["kept"] + result["dropped"] == total and result["ranks"] == 1
    assert result["dropped_percent"] == pytest.approx(100 * result["dropped"] / total)
    for split, labels in stores["synth"].items():
        keep = expected[split] <= threshold
        rows = kept.read(split, fields=("label", "image", "subject"))
        np.testing.assert_array_equal(rows["label"], labels[keep])
        np.testing.assert_array_equal(rows["image"], labels[keep].astype(np.uint16) * 100 + 7)
        assert [s.decode() for s in rows["subject"]] == [f"{split}{i}" for i in np.flatnonzero(keep)]
    # the figure: up to 8 dropped masks, one panel each, every one of them a dropped mask
    dropped = np.concatenate([labels[expected[split] > threshold] for split, labels in stores["synth"].items()])
    assert result["figure"] == str(out / "dropped.png")
    fig = figure(out / "dropped.png")
    assert (fig.width, fig.height) == (8 * 176, 176) and [len(row) for row in fig.panels] == [8]
    for panel in fig.panels[0]:
        assert ((fig.labels(fig.cells(panel, SIZE))[None] == dropped).all(axis=(1, 2))).any()
    provenance = kept.manifest.provenance
    assert provenance["threshold"] == threshold and provenance["reduced"] is False
    assert provenance["kept"] == result["kept"] and provenance["synthetic"] == str(stores["synthetic"].resolve())
    with open(result["csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == total
    for split in expected:
        part = [r for r in table if r["split"] == split]
        assert [int(r["row"]) for r in part] == list(range(len(expected[split])))
        np.testing.assert_array_equal([float(r["norm"]) for r in part], expected[split])
        assert [r["kept"] == "1" for r in part] == list(expected[split] <= threshold)
        assert [r["subject"] for r in part] == [f"{split}{i}" for i in range(len(part))]


def test_filter_uses_the_reduced_prefix_statistics(stores, tmp_path):
    result = filter_store(stores["real"], stores["synthetic"], tmp_path / "kept", threshold=30.0, reduced=True,
                          comm=MPI.COMM_SELF)
    moments = real_moments(stores["real"], reduced=True, comm=MPI.COMM_SELF)
    expected = sum(int((norms(v, moments) <= 30.0).sum()) for v in stores["synth"].values())
    assert result["kept"] == expected
    assert Store(tmp_path / "kept").manifest.provenance["real_masks"] == moments.count


@pytest.mark.mpi
def test_output_is_identical_for_1_2_and_4_ranks(stores, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun")
    threshold = float(np.median(np.concatenate(list(_norms_by_split(stores).values()))))
    outputs = []
    for ranks in (1, 2, 4):
        out = tmp_path / f"kept{ranks}"
        # the real command line, as users run it on a cluster
        command = mpirun_command(ranks, "filter", "zscore", "--real", str(stores["real"]), "--synthetic",
                                 str(stores["synthetic"]), "--out", str(out), "--threshold", str(threshold), "--json")
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean_environment())
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["ranks"] == ranks
        manifest = Store(out).manifest
        outputs.append(({s: [sh.sha256 for sh in info.shards] for s, info in manifest.splits.items()},
                        (out / "zscore.csv").read_bytes()))
    assert outputs[0] == outputs[1] == outputs[2]


def test_calibration_curves_are_monotonic_and_the_suggestion_follows_the_rule(stores, tmp_path, figure):
    result = calibrate(stores["real"], stores["synthetic"], tmp_path, comm=MPI.COMM_SELF)
    with open(result["csv"], newline="") as handle:
        table = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    thresholds = np.array([r["threshold"] for r in table])
    real, synth = np.array([r["real_dropped"] for r in table]), np.array([r["synthetic_dropped"] for r in table])
    assert len(table) == 401 and (np.diff(thresholds) > 0).all()
    assert (np.diff(real) <= 0).all() and (np.diff(synth) <= 0).all()
    # both curves (tab10 blue: real, orange: synthetic) and the suggestion's red line in one 5 × 3 in plot
    plot = figure(tmp_path / "calibration.png")
    assert (plot.width, plot.height) == (400, 240) and [len(row) for row in plot.panels] == [1]
    assert plot.classes(plot.panels[0][0], below=4) == {0, 1, 3}
    # The real curve scores the non-empty validation masks against the training statistics.
    val = stores["val"][stores["val"].reshape(len(stores["val"]), -1).any(1)]
    val_norms = norms(val, real_moments(stores["real"], reduced=False, comm=MPI.COMM_SELF))
    assert result["real_masks"] == len(val)
    np.testing.assert_allclose(real, [(val_norms > t).mean() for t in thresholds])
    # The rule: the smallest threshold of the grid at which at most 1 % of real masks are dropped.
    assert result["suggested_threshold"] == thresholds[np.flatnonzero(real <= 0.01)[0]]
    grid = np.array([0.0, result["suggested_threshold"], 1e9])
    assert calibrate(stores["real"], stores["synthetic"], tmp_path / "grid", thresholds=grid,
                     comm=MPI.COMM_SELF)["suggested_threshold"] == result["suggested_threshold"]


def test_real_masks_are_reduced_to_the_size_of_smaller_synthetic_masks(stores, tmp_path):
    """A PGAN trained at half the store's size: statistics come from the real masks reduced to that size, and a
    shard whose every mask is dropped leaves no shard behind."""
    half = {"train": reduce_labels(stores["synth"]["train"], SIZE // 2)}
    half["train"][:40, 0, 0] = 6  # the whole first shard differs from μ at a σ = 0 corner: dropped
    synthetic = _store(tmp_path / "half", half, kind="synthetic")
    result = filter_store(stores["real"], synthetic, tmp_path / "kept", threshold=1e9, comm=MPI.COMM_SELF)
    train = stores["train"][stores["train"].reshape(len(stores["train"]), -1).any(1)]
    reduced = reduce_labels(train, SIZE // 2).astype(np.float64)
    moments = real_moments(stores["real"], reduced=False, size=SIZE // 2, comm=MPI.COMM_SELF)
    np.testing.assert_allclose(moments.mean, reduced.mean(0), rtol=1e-12)
    expected = norms(half["train"], moments) <= 1e9
    assert not expected[:40].any() and result["kept"] == int(expected.sum())
    kept = Store(tmp_path / "kept")
    assert len(kept.manifest.splits["train"].shards) == 2 and verify(kept) == []
    np.testing.assert_array_equal(kept.read("train")["label"], half["train"][expected])
    larger = _store(tmp_path / "large", {"train": np.zeros((2, 32, 32), np.uint8)}, kind="synthetic")
    with pytest.raises(ValueError, match="larger than the real masks"):
        filter_store(stores["real"], larger, tmp_path / "never", comm=MPI.COMM_SELF)
    assert not (tmp_path / "never").exists()


def test_min_std_floors_sigma_so_stray_pixels_cost_instead_of_dropping(stores, tmp_path):
    moments = real_moments(stores["real"], reduced=False, comm=MPI.COMM_SELF)
    floored = moments.floored(0.5)
    assert floored.count == moments.count and np.array_equal(floored.mean, moments.mean)
    np.testing.assert_allclose(floored.std, np.maximum(moments.std, 0.5), rtol=1e-12)
    assert moments.floored(0.0) is moments
    labels = stores["synth"]["train"]
    strict, soft = norms(labels, moments), norms(labels, floored)
    assert np.isinf(strict[3]) and np.isfinite(soft).all()  # the σ = 0 corner now costs (6 − 0)² / 0.5²
    result = filter_store(stores["real"], stores["synthetic"], tmp_path / "kept", threshold=float(soft[3]),
                          min_std=0.5, comm=MPI.COMM_SELF)
    expected = sum(int((norms(v, floored) <= soft[3]).sum()) for v in stores["synth"].values())
    assert result["kept"] == expected and Store(tmp_path / "kept").manifest.provenance["min_std"] == 0.5
