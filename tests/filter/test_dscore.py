"""The discriminator-score filter: scores equal the snapshot's D on fixed batches, the threshold rules, rank-count
invariance, calibration, and the provenance checks (changed snapshot, no D, a z-score-filtered input).

The PGAN is freshly initialised and tiny, saved as the trainer saves a tick snapshot (G_ema and D): the filter does not
care whether D was trained, and no training keeps the tests short. The masks are generated from it by `generate masks`,
so the store's provenance is the real one.
"""

import csv
import shutil
import subprocess

import numpy as np
import pytest
import torch

from toolkit.bench.zscore import phantom_masks
from toolkit.config import to_dict
from toolkit.data.labels import reduce_labels
from toolkit.data.store import Store, StoreWriter
from toolkit.filter import dscore, zscore
from toolkit.models.pgan import Discriminator, Generator, PGANConfig
from toolkit.mpi import clean_environment, mpirun_command
from toolkit.provenance import OptionsChanged
from toolkit.train.generate import generate_masks
from toolkit.train.pgan import to_unit

SIZE = 16
BATCH = 8


def _real_store(root):
    rng = np.random.default_rng(1)
    writer = StoreWriter(root, classes=7)
    counts = {}
    for split, n in (("train", 40), ("val", 45), ("test", 5)):
        labels = phantom_masks(rng, n, 2 * SIZE)  # real masks are larger than the generator's: reduced first
        labels[::6] = 0  # empty rows, which the real scores skip
        writer.write(split, 0, label=labels, subject=[f"{split}{i}" for i in range(n)], slice_index=np.arange(n))
        counts[split] = 1
    writer.finish(kind="real", image_size=2 * SIZE, has_image=False, shard_counts=counts)
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dscore")
    torch.manual_seed(0)
    config = PGANConfig(resolution=SIZE, latent=16, fmap_base=64, fmap_max=16)
    D = Discriminator(config)
    (root / "pgan" / "snapshots").mkdir(parents=True)
    torch.save({"G_ema": Generator(config).state_dict(), "D": D.state_dict(), "model": to_dict(config), "lod": 0.0,
                "kimg": 1.0, "tick": 0, "store": "none"}, root / "pgan" / "snapshots" / "tick-0000.pt")
    # 3 shards of 20, 20 and 5 rows: a partial batch at the end of each shard
    generate_masks(root / "pgan", 45, root / "masks", snapshot="tick-0000", shard_size=20, batch=16)
    return {"root": root, "D": D.eval(), "real": _real_store(root / "real"), "masks": root / "masks"}


def _direct_scores(D, labels):
    """D's scores of ``labels`` in batches of BATCH consecutive rows, the last batch filled from the start."""
    n = len(labels)
    padded = labels[np.arange(-(-n // BATCH) * BATCH) % n]
    with torch.no_grad():
        x = to_unit(torch.from_numpy(padded))[:, None]
        return torch.cat([D(x[i:i + BATCH])[:, 0] for i in range(0, len(x), BATCH)])[:n].double().numpy()


def _csv(out):
    with open(out / "dscore.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_scores_are_the_snapshots_discriminator_on_fixed_batches_and_the_threshold_keeps_scores_at_or_above(
        setup, tmp_path):
    masks = Store(setup["masks"])
    expected = np.concatenate([_direct_scores(setup["D"], masks.read("train", lo, lo + n)["label"])
                               for lo, n in ((0, 20), (20, 20), (40, 5))])
    threshold = float(np.median(expected))  # one mask scores exactly this: it is kept
    doc = dscore.filter_store(setup["real"], setup["masks"], tmp_path / "out", threshold=threshold, batch=BATCH)
    rows = _csv(tmp_path / "out")
    scores = np.array([float(r["score"]) for r in rows])
    assert np.array_equal(scores, expected)
    keep = expected >= threshold
    assert [int(r["kept"]) for r in rows] == keep.astype(int).tolist()
    assert doc["kept"] == keep.sum() and doc["dropped"] == (~keep).sum() and doc["threshold"] == threshold
    kept_store = Store(tmp_path / "out")
    assert np.array_equal(kept_store.read("train")["label"], masks.read("train")["label"][keep])
    assert kept_store.manifest.provenance["filter"] == "dscore" and (tmp_path / "out" / "dropped.png").exists()


def test_default_threshold_is_the_real_quantile_of_the_non_empty_validation_masks(setup, tmp_path):
    labels = Store(setup["real"]).read("val")["label"]
    val = reduce_labels(labels[labels.reshape(len(labels), -1).any(axis=1)], SIZE)
    q = 0.25
    expected = float(np.quantile(_direct_scores(setup["D"], val), q))
    doc = dscore.filter_store(setup["real"], setup["masks"], tmp_path / "out", real_quantile=q, batch=BATCH)
    assert doc["threshold"] == expected and doc["real_quantile"] == q
    scores = np.array([float(r["score"]) for r in _csv(tmp_path / "out")])
    assert doc["kept"] == (scores >= expected).sum()
    assert Store(tmp_path / "out").manifest.provenance["options"]["real_quantile"] == q


def test_output_is_identical_for_1_and_2_ranks(setup, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    outputs = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        args = ("filter", "dscore", "--real", str(setup["real"]), "--synthetic", str(setup["masks"]), "--out",
                str(out), "--batch", str(BATCH), "--real-quantile", "0.2")
        done = subprocess.run(mpirun_command(ranks, *args), env=clean_environment(), capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        outputs[ranks] = out
    one, two = outputs[1], outputs[2]
    assert (one / "dscore.csv").read_bytes() == (two / "dscore.csv").read_bytes()
    assert Store(one).manifest.to_json()["splits"] == Store(two).manifest.to_json()["splits"]
    assert 0 < Store(one).manifest.provenance["kept"] < 45


def test_calibration_is_monotone_and_the_suggestion_drops_the_most_synthetic_masks_within_the_real_budget(
        setup, tmp_path):
    q = 0.2
    doc = dscore.calibrate(setup["real"], setup["masks"], tmp_path / "cal", real_quantile=q, batch=BATCH)
    with open(tmp_path / "cal" / "calibration.csv", newline="") as handle:
        curve = [(float(r["threshold"]), float(r["real_dropped"]), float(r["synthetic_dropped"]))
                 for r in csv.DictReader(handle)]
    t, real_drop, synth_drop = (np.array(c) for c in zip(*curve))
    assert len(t) == 401 and np.all(np.diff(t) > 0)
    assert np.all(np.diff(real_drop) >= 0) and np.all(np.diff(synth_drop) >= 0)  # dropping below t: grows with t
    assert real_drop[0] == synth_drop[0] == 0 and real_drop[-1] >= 1 - 1 / 37  # the grid spans the scores
    allowed = real_drop <= q
    assert doc["suggested_threshold"] == t[allowed][np.argmax(synth_drop[allowed])]
    assert doc["real_masks"] == 37 and doc["synthetic_masks"] == 45 and (tmp_path / "cal" / "calibration.png").exists()


def test_a_zscore_filtered_store_leads_back_to_its_snapshot_and_the_chain_records_both_stages(setup, tmp_path):
    zscore.filter_store(setup["real"], setup["masks"], tmp_path / "z", threshold=float("inf"))
    doc = dscore.filter_store(setup["real"], tmp_path / "z", tmp_path / "d", real_quantile=0.5, batch=BATCH)
    chain = Store(tmp_path / "d").manifest.provenance
    assert chain["filter"] == "dscore" and chain["kept"] == doc["kept"]
    assert chain["source"]["filter"] == "zscore" and chain["source"]["kept"] == 45
    assert chain["snapshot"].endswith("tick-0000.pt")


def test_a_complete_output_is_kept_with_the_same_options_and_refused_with_others(setup, tmp_path):
    first = dscore.filter_store(setup["real"], setup["masks"], tmp_path / "out", threshold=0.0, batch=BATCH)
    again = dscore.filter_store(setup["real"], setup["masks"], tmp_path / "out", threshold=0.0, batch=BATCH)
    assert again["already_complete"] and again["kept"] == first["kept"]
    with pytest.raises(OptionsChanged, match="threshold"):
        dscore.filter_store(setup["real"], setup["masks"], tmp_path / "out", threshold=1.0, batch=BATCH)


def test_a_changed_snapshot_a_snapshot_without_d_and_a_batch_splitting_mbstd_groups_are_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="minibatch-stddev group"):
        dscore.filter_store(setup["real"], setup["masks"], tmp_path / "a", threshold=0.0, batch=6)
    assert not (tmp_path / "a" / "manifest.json").exists()
    snapshot = setup["root"] / "pgan" / "snapshots" / "tick-0000.pt"
    saved = snapshot.read_bytes()
    try:
        state = torch.load(snapshot, weights_only=True)
        torch.save({k: v for k, v in state.items() if k != "D"}, snapshot)
        with pytest.raises(ValueError, match="changed since it generated"):
            dscore.filter_store(setup["real"], setup["masks"], tmp_path / "b", threshold=0.0, batch=BATCH)
        with pytest.raises(ValueError, match="holds no discriminator"):
            dscore.load_discriminator(snapshot, torch.device("cpu"))
    finally:
        snapshot.write_bytes(saved)


def test_the_pipeline_s_filter_job_runs_the_dscore_stage_with_its_quantile(setup, tmp_path):
    from jobs.filter import FilterJob

    job = FilterJob(setup["real"], setup["masks"], tmp_path / "job", method="dscore", threshold=None,
                    real_quantile=0.3)
    direct = dscore.filter_store(setup["real"], setup["masks"], tmp_path / "direct", real_quantile=0.3)
    doc = job.run()
    assert doc["threshold"] == direct["threshold"] and doc["kept"] == direct["kept"]
    assert (tmp_path / "job" / "dscore.csv").read_bytes() == (tmp_path / "direct" / "dscore.csv").read_bytes()


def test_the_filter_job_fails_naming_the_csv_when_its_stage_keeps_no_mask(setup, tmp_path):
    from jobs.filter import FilterJob

    job = FilterJob(setup["real"], setup["masks"], tmp_path / "none", method="dscore", threshold=1e30)
    with pytest.raises(RuntimeError, match=r"kept none of \d+ masks .*none/dscore\.csv"):
        job.run()
