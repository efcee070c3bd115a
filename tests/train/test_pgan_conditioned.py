"""The slice-position-conditioned PGAN (``model.label_size`` > 0, the official label conditioning with the axial bin as
label): the AC-GAN loss terms, the resident labels, a bit-identical resume mid-fade, snapshots with the bins,
generation in proportion to the training bins (byte-identical over MPI ranks) and the per-bin SWD.

Stores are tiny: 60 random 16² phantom masks (every 5th empty) whose slice indices are 10…69 in shuffled order.
"""

import csv
import itertools
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from toolkit.bench.zscore import phantom_masks
from toolkit.config import load, to_dict
from toolkit.data.bins import SliceBins
from toolkit.data.store import Store, StoreWriter, verify
from toolkit.metrics.swd import swd
from toolkit.models.pgan import Discriminator, Generator, PGANConfig
from toolkit.mpi import clean_environment, mpirun_command
from toolkit.train.distributed import Dist
from toolkit.train.generate import draw_bins, generate_labels, generate_masks
from toolkit.train.pgan import PGANOptimConfig, PGANRunConfig, PGANTask, d_loss, g_loss, to_unit
from toolkit.train.pgan_eval import evaluate_snapshots
from toolkit.train.precision import Precision
from toolkit.train.sampling import epoch_seed

CLI = [sys.executable, "-m", "toolkit.cli"]
LABELS = 4
TINY = PGANConfig(resolution=16, latent=16, fmap_base=64, fmap_max=16, label_size=LABELS)
FP32 = Precision.for_device("fp32", torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    labels = phantom_masks(rng, 60, 16)
    labels[::5] = 0
    slices = rng.permutation(np.arange(10, 70))
    root = tmp_path_factory.mktemp("cond") / "store"
    writer = StoreWriter(root, classes=7)
    for i, lo in enumerate(range(0, 60, 16)):
        rows = labels[lo:lo + 16]
        writer.write("train", i, label=rows, subject=[f"s{lo + j}" for j in range(len(rows))],
                     slice_index=slices[lo:lo + 16])
    writer.finish(kind="real", image_size=16, has_image=False, shard_counts={"train": 4})
    return root


def _non_empty(store: Path) -> dict[str, np.ndarray]:
    rows = Store(store).read("train", fields=("label", "slice", "empty"))
    keep = ~rows["empty"]
    return {"label": rows["label"][keep], "slice": rows["slice"][keep].astype(np.int64)}


def write_config(path: Path, store: Path, **model) -> Path:
    config = {
        "data": {"store": str(store)},
        "model": {"resolution": 16, "latent": 16, "fmap_base": 64, "fmap_max": 16, "label_size": LABELS, **model},
        "schedule": {"total_kimg": 2, "lod_training_kimg": 1, "lod_transition_kimg": 1,
                     "minibatch": {4: 4, 8: 4, 16: 4}, "tick_kimg": {4: 1, 8: 1, 16: 1}},
        "loop": {"checkpoint_every_steps": 10, "checkpoint_every_minutes": 0.0, "log_every_steps": 10},
        "runtime": {"threads": 1},
        "samples": 8,
        "seed": 3,
    }
    path.write_text(yaml.safe_dump(config))
    return path


# --- the loss -------------------------------------------------------------------------------------------------------
def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)[label], per row, written out."""
    return torch.log(torch.exp(logits).sum(dim=1)) - logits[torch.arange(len(labels)), labels]


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_the_ac_gan_loss_terms_equal_the_formula(weight):
    torch.manual_seed(0)
    G, D = Generator(TINY), Discriminator(TINY)
    optim = PGANOptimConfig(cond_weight=weight)
    reals = torch.rand(4, 1, 16, 16) * 2 - 1
    latents, mix = torch.randn(4, 16), torch.rand(4, 1, 1, 1)
    labels = torch.tensor([0, 3, 1, 3])
    lod = 0.5

    # D: the WGAN-GP terms on the score column, the label terms on the logits of reals and of fakes made with the
    # reals' labels
    with torch.no_grad():
        fakes = G(latents, lod, labels)
    real_out, fake_out = D(reals, lod), D(fakes, lod)
    mixed = (reals + mix * (fakes - reals)).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(mixed, lod)[:, 0].sum(), mixed)
    penalty = (grad.flatten(1).norm(dim=1) - 1) ** 2
    wgan = fake_out[:, 0] - real_out[:, 0] + 10.0 * penalty + 1e-3 * real_out[:, 0] ** 2
    ac = _cross_entropy(real_out[:, 1:], labels) + _cross_entropy(fake_out[:, 1:], labels)
    expected_d = (wgan + weight * ac).mean()
    got_d = d_loss(G, D, reals, latents, mix, lod, optim, FP32, labels)
    assert float(got_d.detach()) == pytest.approx(float(expected_d.detach()), rel=1e-5)
    assert float(ac.mean().detach()) > 0.1  # not negligible: leaving the label term out would fail the check above
    unconditioned_part = d_loss(G, D, reals, latents, mix, lod, PGANOptimConfig(cond_weight=0.0), FP32, labels)
    assert float(unconditioned_part.detach()) == pytest.approx(float(wgan.mean().detach()), rel=1e-5)

    # G: −score + weight·CE on D's logits of G(z, labels)
    out = D(G(latents, lod, labels), lod)
    expected_g = (-out[:, 0] + weight * _cross_entropy(out[:, 1:], labels)).mean()
    got_g = g_loss(G, D, latents, lod, FP32, labels, weight)
    assert float(got_g.detach()) == pytest.approx(float(expected_g.detach()), rel=1e-5)


def test_a_conditioned_step_needs_both_label_sets():
    from toolkit.train.pgan import WGANGP

    torch.manual_seed(0)
    nets = WGANGP(TINY, PGANOptimConfig(), Dist(), FP32)
    reals, labels = torch.rand(4, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"pgan\.label_size 4"):
        nets.step(reals, 0.0, 4)
    with pytest.raises(ValueError, match=r"pgan\.label_size 4"):
        nets.step(reals, 0.0, 4, labels)
    loss_d, loss_g = nets.step(reals, 0.0, 4, labels, labels.flip(0))
    assert torch.isfinite(loss_d) and torch.isfinite(loss_g)


# --- the trainer ----------------------------------------------------------------------------------------------------
def test_resident_labels_are_the_bins_of_the_masks_slices(tiny_store, tmp_path):
    task = PGANTask(load(PGANRunConfig, write_config(tmp_path / "pgan.yaml", tiny_store)), Dist(), tmp_path / "run")
    rows = _non_empty(tiny_store)
    assert len(rows["slice"]) == 48 and torch.equal(task.masks, torch.from_numpy(rows["label"]))
    lo, hi = int(rows["slice"].min()), int(rows["slice"].max()) + 1
    assert task.cond.bins == SliceBins(LABELS, lo, hi)
    bins = (rows["slice"] - lo) * LABELS // (hi - lo)  # equal-width bins, written out
    assert task.cond.labels.dtype == torch.int64 and task.cond.labels.tolist() == bins.tolist()
    assert task.cond.counts == np.bincount(bins, minlength=LABELS).tolist() and sum(task.cond.counts) == 48

    # every real row comes with the bin of its own mask (masks are unique: find each real row's mask)
    flat = to_unit(task.masks).flatten(1)
    assert len(torch.unique(flat, dim=0)) == len(flat)
    iterations = list(task.batches(0, 0))
    g_labels = []
    for it in iterations[:5]:
        assert it.labels.shape == it.g_labels.shape == it.reals.shape[:2] and it.labels.dtype == torch.int64
        for reals, labels in zip(it.reals, it.labels):
            index = (reals.flatten(1)[:, None] == flat[None]).all(dim=2).int().argmax(dim=1)
            assert torch.equal(flat[index], reals.flatten(1)) and torch.equal(task.cond.labels[index], labels)
    for it in iterations:
        g_labels.append(it.g_labels.flatten())
    # the G steps' labels: bins of other random rows, so distributed like the training bins
    g_labels = torch.cat(g_labels)
    freq = torch.bincount(g_labels, minlength=LABELS).double() / len(g_labels)
    assert len(g_labels) > 900 and torch.allclose(freq, torch.tensor(task.cond.counts).double() / 48, atol=0.06)
    assert any(not torch.equal(it.labels, it.g_labels) for it in iterations)
    again = next(task.batches(0, 3))  # an iteration is a function of its index: the same labels when asked again
    assert torch.equal(again.labels, iterations[3].labels) and torch.equal(again.g_labels, iterations[3].g_labels)


def test_too_many_bins_for_the_slice_range_is_refused_naming_label_size(tiny_store, tmp_path):
    config = load(PGANRunConfig, write_config(tmp_path / "pgan.yaml", tiny_store, label_size=100))
    with pytest.raises(ValueError, match=r"model\.label_size: slice bins: 100 bins do not fit"):
        PGANTask(config, Dist(), tmp_path / "run")


def train(config: Path, run_dir: Path) -> list[str]:
    return [*CLI, "train", "pgan", "-c", str(config), "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def cond_run(tiny_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("cond-run")
    config = write_config(root / "pgan.yaml", tiny_store)
    done = subprocess.run(train(config, root / "run"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return config, root / "run"


def test_snapshots_hold_the_bins_and_the_training_bin_counts(cond_run, tiny_store):
    _, run_dir = cond_run
    rows = _non_empty(tiny_store)
    bins = SliceBins.spanning(LABELS, rows["slice"])
    for t in (0, 1):
        snap = torch.load(run_dir / "snapshots" / f"tick-{t:04d}.pt", weights_only=True)
        assert snap["model"]["label_size"] == LABELS and snap["slice_bins"] == bins.to_dict()
        assert snap["bin_counts"] == np.bincount(bins.of(rows["slice"]), minlength=LABELS).tolist()
        D = Discriminator(PGANConfig(**snap["model"]))
        D.load_state_dict(snap["D"], strict=True)
        assert D(torch.zeros(4, 1, 16, 16), snap["lod"]).shape == (4, 1 + LABELS)
    assert (run_dir / "samples" / "tick-0001.png").exists()


def test_a_conditioned_run_killed_mid_fade_resumes_bit_identically(cond_run, tmp_path, latest_task_state, kill_at):
    config, reference = cond_run
    run_dir = tmp_path / "run"
    # 63 iterations per 1-kimg tick at minibatch 4 × 4 repeats: step 80 lies inside tick 1, the 4²→8² fade
    state = kill_at(train(config, run_dir), run_dir, "ckpt-000000080.pt")
    assert 1 < state["task"]["prev_lod"] < 2, "the kill must land mid-fade"
    resumed = subprocess.run(train(config, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    mine, theirs = latest_task_state(run_dir), latest_task_state(reference)
    assert theirs["D"]["blocks.0.dense1.weight"].shape[0] == 1 + LABELS
    for net in ("G", "D", "G_ema"):
        for key in theirs[net]:
            assert torch.equal(mine[net][key], theirs[net][key]), (net, key)
    for k, v in theirs["opt_D"]["state"].items():
        assert torch.equal(mine["opt_D"]["state"][k]["exp_avg"], v["exp_avg"])


# --- generation -----------------------------------------------------------------------------------------------------
BINS = SliceBins(LABELS, 10, 70)
COUNTS = [10, 30, 0, 60]


def _snapshot(path: Path, tick: int, store: Path | str, config: PGANConfig = TINY) -> Path:
    """A tick snapshot of fresh networks as the trainer writes it."""
    torch.manual_seed(tick)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"G_ema": Generator(config).state_dict(), "D": Discriminator(config).state_dict(),
           "model": to_dict(config), "lod": 0.0, "kimg": 1.0 + tick, "tick": tick, "store": str(store),
           "reduced": False}
    if config.label_size:
        doc.update(slice_bins=BINS.to_dict(), bin_counts=COUNTS)
    torch.save(doc, path)
    return path


def test_labels_are_drawn_in_proportion_to_the_bin_counts():
    labels = draw_bins(COUNTS, 200_000, torch.Generator().manual_seed(0))
    assert labels.dtype == torch.int64
    freq = np.bincount(labels.numpy(), minlength=LABELS) / len(labels)
    # binomial sd ≤ 0.0011 per bin at n = 200,000: 0.005 is > 4 sd, and a bin without masks is never drawn
    np.testing.assert_allclose(freq, np.array(COUNTS) / 100, atol=0.005)
    assert freq[2] == 0
    assert torch.equal(labels[:100], draw_bins(COUNTS, 100, torch.Generator().manual_seed(0)))  # seeded


def test_generated_masks_record_their_bin_centre_drawn_as_the_training_bins(tmp_path):
    run_dir = tmp_path / "run"
    snap = _snapshot(run_dir / "snapshots" / "tick-0000.pt", 0, "none")
    out = tmp_path / "masks"
    manifest = generate_masks(run_dir, 2000, out, snapshot="tick-0000", seed=7, shard_size=512, batch=256)
    assert manifest.provenance["slice_bins"] == BINS.to_dict()
    assert manifest.provenance["options"]["label_size"] == LABELS
    assert verify(Store(out)) == []
    rows = Store(out).read("train", fields=("label", "slice"))
    slices = rows["slice"].astype(np.int64)
    assert set(slices.tolist()) <= set(BINS.centre(np.arange(LABELS)).tolist())
    bins = BINS.of(slices)
    assert np.array_equal(BINS.centre(bins), slices)  # the slice is the bin's centre, mapped back to the bin
    # n = 2000: binomial sd ≤ 0.011, so 0.045 is 4 sd; the empty bin never appears
    np.testing.assert_allclose(np.bincount(bins, minlength=LABELS) / 2000, np.array(COUNTS) / 100, atol=0.045)
    # shard 0 as drawn from its (seed, shard) generator: the latents, then the labels; the masks are G(z, labels)
    from toolkit.train.generate import load_generator

    G, _ = load_generator(snap, torch.device("cpu"))
    stream = torch.Generator().manual_seed(epoch_seed(7, 0))
    z = torch.randn(512, 16, generator=stream)
    labels = draw_bins(COUNTS, 512, stream)
    assert np.array_equal(slices[:512], BINS.centre(labels.numpy()))
    assert np.array_equal(rows["label"][:512], generate_labels(G, 0.0, z, 64, labels))


def test_unconditioned_generation_keeps_slice_minus_one_and_no_bins(tmp_path):
    run_dir = tmp_path / "run"
    _snapshot(run_dir / "snapshots" / "tick-0000.pt", 0, "none", PGANConfig(resolution=16, latent=16, fmap_base=64,
                                                                            fmap_max=16))
    manifest = generate_masks(run_dir, 20, tmp_path / "masks", snapshot="tick-0000", shard_size=8)
    assert "slice_bins" not in manifest.provenance and "label_size" not in manifest.provenance["options"]
    assert (Store(tmp_path / "masks").read("train", fields=("slice",))["slice"] == -1).all()


@pytest.mark.mpi
def test_conditioned_generation_over_two_ranks_is_byte_identical(tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    run_dir = tmp_path / "run"
    _snapshot(run_dir / "snapshots" / "tick-0000.pt", 0, "none")
    args = ["generate", "masks", str(run_dir), "--n", "37", "--snapshot", "tick-0000", "--shard-size", "8",
            "--batch", "3"]
    one = subprocess.run([*CLI, *args, "--out", str(tmp_path / "one")], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(mpirun_command(2, *args, "--out", str(tmp_path / "two")), env=clean_environment(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = Store(tmp_path / "one").manifest, Store(tmp_path / "two").manifest
    assert a.to_json()["splits"] == b.to_json()["splits"] and a.provenance == b.provenance
    assert len(set(Store(tmp_path / "one").read("train", fields=("slice",))["slice"].tolist())) > 1  # several bins


# --- per-bin SWD ----------------------------------------------------------------------------------------------------
def _scored_conditioned_run(store: Path, run_dir: Path) -> tuple[SliceBins, dict]:
    """Two tick snapshots of fresh conditioned networks with the bins of ``store``'s masks, scored per bin."""
    rows = _non_empty(store)
    bins = SliceBins.spanning(LABELS, rows["slice"])
    for tick in (0, 1):
        path = _snapshot(run_dir / "snapshots" / f"tick-{tick:04d}.pt", tick, store)
        snap = torch.load(path, weights_only=True)
        snap["slice_bins"] = bins.to_dict()
        snap["bin_counts"] = np.bincount(bins.of(rows["slice"]), minlength=LABELS).tolist()
        torch.save(snap, path)
    return bins, evaluate_snapshots(run_dir, images=64, per_bin=True)


def test_per_bin_swd_compares_each_bins_real_masks_with_masks_generated_for_it(tiny_store, tmp_path):
    rows = _non_empty(tiny_store)
    run_dir = tmp_path / "run"
    bins, summary = _scored_conditioned_run(tiny_store, run_dir)
    assert summary["snapshots"] == 2 and (run_dir / "swd.csv").exists()
    with open(run_dir / "swd-bins.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [int(r["bin"]) for r in table] == list(range(LABELS)) and len(summary["swd_bins"]) == LABELS
    assert all(r["snapshot"] == summary["best"] for r in table)
    # the slice ranges tile [lo, hi), and each bin's real masks are those of the real set whose slice falls in it
    assert int(table[0]["first_slice"]) == bins.lo and int(table[-1]["last_slice"]) == bins.hi - 1
    assert all(int(a["last_slice"]) + 1 == int(b["first_slice"]) for a, b in itertools.pairwise(table))
    real_bins = bins.of(rows["slice"])
    assert [int(r["real"]) for r in table] == np.bincount(real_bins, minlength=LABELS).tolist()
    # bin 1 by hand: its real masks against as many generated with label 1 from latents seeded by (seed 0, bin 1)
    from toolkit.train.generate import load_generator

    G, _ = load_generator(run_dir / "snapshots" / f"{summary['best']}.pt", torch.device("cpu"))
    real = rows["label"][real_bins == 1]
    z = torch.randn(len(real), 16, generator=torch.Generator().manual_seed(epoch_seed(0, 1)))
    fake = generate_labels(G, 0.0, z, 64, torch.full((len(real),), 1))
    assert float(table[1]["swd_avg"]) == pytest.approx(swd(real, fake, seed=0)["swd_x1e3_avg"], rel=1e-6)


def test_per_bin_swd_of_an_unconditioned_run_is_refused(tiny_store, tmp_path):
    plain = PGANConfig(resolution=16, latent=16, fmap_base=64, fmap_max=16)
    _snapshot(tmp_path / "run" / "snapshots" / "tick-0000.pt", 0, tiny_store, plain)
    with pytest.raises(ValueError, match=r"model\.label_size > 0"):
        evaluate_snapshots(tmp_path / "run", images=64, per_bin=True)


def test_the_cost_model_counts_the_label_path_flops_by_formula():
    from toolkit.bench.cost import pgan_forward

    plain = PGANConfig()
    conditioned = PGANConfig(label_size=31)
    (g0, d0), (g1, d1) = pgan_forward(plain, 0.0), pgan_forward(conditioned, 0.0)
    # G's first dense layer takes 31 more inputs (to 16·nf(0) units), D's last one has 31 more outputs (from nf(0))
    assert g1 - g0 == 2 * 31 * 16 * plain.nf(0) and d1 - d0 == 2 * 31 * plain.nf(0)


def test_compare_shows_both_runs_swd_and_the_conditioned_runs_drop_rate_per_bin(tiny_store, tmp_path):
    from toolkit.filter.zscore import filter_store

    cond, plain = tmp_path / "cond", tmp_path / "plain"
    bins, summary = _scored_conditioned_run(tiny_store, cond)
    _snapshot(plain / "snapshots" / "tick-0000.pt", 0, tiny_store, replace(TINY, label_size=0))
    evaluate_snapshots(plain, images=64)
    generate_masks(cond, 200, tmp_path / "masks", seed=3, shard_size=64, batch=64)
    # a threshold at the median norm drops about half of the masks
    everything = filter_store(tiny_store, tmp_path / "masks", tmp_path / "all", threshold=float("inf"), min_std=0.5)
    with open(everything["csv"], newline="") as handle:
        norms = np.array([float(r["norm"]) for r in csv.DictReader(handle)])
    filter_store(tiny_store, tmp_path / "masks", tmp_path / "kept", threshold=float(np.median(norms)), min_std=0.5)
    done = subprocess.run([*CLI, "compare", "pgan", str(cond), str(plain), "--filtered", str(tmp_path / "kept"),
                           "--filtered", str(tmp_path / "all"), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    assert [r["label_size"] for r in runs] == [LABELS, 0] and runs[0]["best"] == summary["best"]
    assert runs[0]["best_swd"] == pytest.approx(summary["best_swd_avg"]) and "bins" not in runs[1]
    # per bin, the dropped masks are those the filter dropped among the masks generated for that bin
    of = bins.of(Store(tmp_path / "masks").read("train", fields=("slice",))["slice"])
    dropped = norms > np.median(norms)
    expected = [{"bin": b, "masks": int((of == b).sum()), "dropped": int(dropped[of == b].sum())}
                for b in range(LABELS)]
    assert runs[0]["filtered"]["bins"] == expected
    assert runs[0]["filtered"]["dropped"] == dropped.sum() > 0 and runs[1]["filtered"]["dropped"] == 0
    rescored = subprocess.run([*CLI, "evaluate", "swd", str(cond), "--images", "64", "--per-bin"], capture_output=True,
                              text=True, timeout=120)  # the CLI's per-bin path: nothing new to score, bins again
    assert rescored.returncode == 0 and "(0 now" in rescored.stdout and "  bin 0 (slices" in rescored.stdout
    text = subprocess.run([*CLI, "compare", "pgan", str(cond), str(plain)], capture_output=True, text=True,
                          timeout=120).stdout
    assert f"`cond` ({LABELS} slice bins)" in text and "`plain` (unconditioned)" in text and "per slice bin" in text


def test_compare_refuses_an_unscored_run_and_a_filtered_list_that_does_not_pair_with_the_runs(tiny_store, tmp_path):
    from toolkit.report.pgan import compare

    run = tmp_path / "run"
    _snapshot(run / "snapshots" / "tick-0000.pt", 0, tiny_store)
    with pytest.raises(ValueError, match=r"run: no swd\.csv .*evaluate swd"):
        compare([run])
    with pytest.raises(ValueError, match=r"one filtered store per run \(1\), got 2"):
        compare([run], [tmp_path / "a", tmp_path / "b"])
