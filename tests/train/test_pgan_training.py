"""PGAN for real: resume mid-fade is bit-identical, snapshots per tick, SWD over MPI ranks, generation into a store.

Runs are real `tumorsynth` subprocesses on the phantom store: a tiny 16² PGAN trained for 3 kimg (ticks: 4² stable,
the 4²→8² fade, 8² stable), so its second tick is a fade.
"""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from toolkit.config import load
from toolkit.data.png import read_png
from toolkit.data.store import Store, verify
from toolkit.mpi import clean_environment, mpirun_command
from toolkit.train.distributed import Dist
from toolkit.train.pgan import PGANRunConfig, PGANTask, to_labels, to_unit

CLI = [sys.executable, "-m", "toolkit.cli"]


def write_config(path, store):
    config = {
        "data": {"store": str(store)},
        "model": {"resolution": 16, "latent": 16, "fmap_base": 64, "fmap_max": 16},
        "schedule": {"total_kimg": 3, "lod_training_kimg": 1, "lod_transition_kimg": 1,
                     "minibatch": {4: 4, 8: 4, 16: 4}, "tick_kimg": {4: 1, 8: 1, 16: 1}},
        "loop": {"checkpoint_every_steps": 10, "checkpoint_every_minutes": 0.0, "log_every_steps": 10},
        "runtime": {"threads": 1},
        "samples": 8,
        "seed": 5,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def train(config, run_dir):
    return [*CLI, "train", "pgan", "-c", str(config), "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def pgan_run(store_64, tmp_path_factory):
    root = tmp_path_factory.mktemp("pgan")
    config = write_config(root / "pgan.yaml", store_64)
    done = subprocess.run(train(config, root / "run"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return config, root / "run"


def test_labels_map_to_unit_range_and_back():
    labels = torch.arange(7, dtype=torch.uint8)
    unit = to_unit(labels)
    assert unit[0] == -1 and unit[-1] == 1
    assert torch.equal(to_labels(unit), labels)
    assert to_labels(torch.tensor([-3.0, 0.05, 5.0])).tolist() == [0, 3, 6]  # rounded to the nearest class, clipped


def test_resident_masks_are_the_non_empty_train_rows_of_the_store(store_64, tmp_path):
    task = PGANTask(load(PGANRunConfig, write_config(tmp_path / "pgan.yaml", store_64)), Dist(), tmp_path / "run")
    labels = Store(store_64).read("train")["label"]
    expected = torch.from_numpy(labels[labels.reshape(len(labels), -1).any(axis=1)])
    assert task.masks.dtype == torch.uint8 and task.masks.device == Dist().device
    assert len(expected) < len(labels) and torch.equal(task.masks, expected)


def test_compiling_the_pgan_is_refused_with_a_clear_error(tmp_path):
    config = load(PGANRunConfig, write_config(tmp_path / "pgan.yaml", tmp_path / "nowhere"),
                  ["runtime.compile=default"])
    with pytest.raises(ValueError, match=r"runtime\.compile.*not supported by the PGAN"):
        PGANTask(config, Dist(), tmp_path / "run")


def test_dry_schedule_of_the_paper_config_has_205_ticks():
    result = subprocess.run([*CLI, "train", "pgan", "-c", "configs/paper/pgan.yaml", "--dry-schedule", "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["ticks"] == 205 and doc["total_kimg"] == 12000
    assert doc["per_resolution"]["256"]["minibatch"] == 8


def test_a_snapshot_and_sample_grid_per_tick(pgan_run, figure):
    from toolkit.train.generate import generate_labels, load_generator

    _, run_dir = pgan_run
    ticks = json.loads((run_dir / "DONE").read_text())["epochs"]
    assert ticks == 3
    assert sorted(p.name for p in (run_dir / "snapshots").glob("tick-*.pt")) == [f"tick-{t:04d}.pt" for t in range(3)]
    latents = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))  # `samples` fixed latents of the seed
    for t in range(3):
        # each tick's grid shows its snapshot's EMA generator on the fixed latents, one panel per sample
        generator, meta = load_generator(run_dir / "snapshots" / f"tick-{t:04d}.pt", torch.device("cpu"))
        masks = generate_labels(generator, meta["lod"], latents, batch=8)
        fig = figure(run_dir / "samples" / f"tick-{t:04d}.png")
        assert (fig.width, fig.height) == (8 * 96, 96 + 32) and [len(row) for row in fig.panels] == [8]
        for panel, mask in zip(fig.panels[0], masks):
            assert (fig.labels(fig.cells(panel, 16)) == mask).mean() > 0.99
    lods = [json.loads(line)["lod"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lods[0] == 2.0 and lods[-1] == 1.0 and any(1 < lod < 2 for lod in lods)  # stable, fade, stable


def test_killed_mid_fade_resumes_bit_identically(pgan_run, tmp_path, latest_task_state, kill_at):
    config, reference = pgan_run
    run_dir = tmp_path / "run"
    # 63 iterations per 1-kimg tick at minibatch 4 × 4 repeats: step 90 lies inside tick 1, the 4²→8² fade
    state = kill_at(train(config, run_dir), run_dir, "ckpt-000000090.pt")
    assert 1 < state["task"]["prev_lod"] < 2, "the kill must land mid-fade"
    resumed = subprocess.run(train(config, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    mine, theirs = latest_task_state(run_dir), latest_task_state(reference)
    for net in ("G", "D", "G_ema"):
        for key in theirs[net]:
            assert torch.equal(mine[net][key], theirs[net][key]), (net, key)
    assert mine["opt_D"]["state"].keys() == theirs["opt_D"]["state"].keys()
    for k, v in theirs["opt_D"]["state"].items():
        assert torch.equal(mine["opt_D"]["state"][k]["exp_avg"], v["exp_avg"])


def _mpirun(ranks, *args):
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    return subprocess.run(mpirun_command(ranks, *args), env=clean_environment(), capture_output=True, text=True,
                          timeout=600)


@pytest.mark.mpi
def test_swd_over_two_mpi_ranks_equals_one_rank_and_picks_the_best(pgan_run, tmp_path):
    _, reference = pgan_run
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir in (one, two):
        shutil.copytree(reference / "snapshots", run_dir / "snapshots")
        (run_dir / "snapshots" / "best").unlink(missing_ok=True)
    single = subprocess.run([*CLI, "evaluate", "swd", str(one), "--images", "64", "--json"], capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    double = _mpirun(2, "evaluate", "swd", str(two), "--images", "64", "--json")
    assert double.returncode == 0, double.stderr
    assert json.loads(double.stdout)["ranks"] == 2 and json.loads(single.stdout)["ranks"] == 1
    rows = [list(csv.DictReader((d / "swd.csv").read_text().splitlines())) for d in (one, two)]
    assert rows[0] == rows[1] and len(rows[0]) == 3
    best = min(rows[0], key=lambda r: float(r["swd_avg"]))["snapshot"]
    assert (two / "snapshots" / "best").read_text().strip() == best
    again = subprocess.run([*CLI, "evaluate", "swd", str(two), "--images", "64", "--json"], capture_output=True,
                           text=True, timeout=600)
    assert json.loads(again.stdout)["scored_now"] == 0  # a re-run skips scored snapshots


def test_generate_masks_into_a_synthetic_store(pgan_run, tmp_path):
    _, run_dir = pgan_run
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, png in zip(outs, ("--png", "--no-png")):
        done = subprocess.run([*CLI, "generate", "masks", str(run_dir), "--n", "50", "--out", str(out),
                               "--snapshot", "tick-0002", "--shard-size", "16", png], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
    store = Store(outs[0])
    m = store.manifest
    assert m.kind == "synthetic" and not m.has_image and m.splits["train"].n == 50 and m.image_size == 16
    assert m.provenance["snapshot"] == "tick-0002.pt" and verify(store) == []
    rows = store.read("train", fields=("label", "subject"))
    labels = rows["label"]
    assert labels.dtype == np.uint8 and labels.max() <= 6
    pngs = sorted((outs[0] / "png" / "train" / "label").glob("*.png"))
    assert len(pngs) == 50 and not (outs[1] / "png").exists()
    first = read_png(outs[0] / "png" / "train" / "label" / f"{rows['subject'][0].decode()}.png")
    assert np.array_equal(first, labels[0])
    assert [s.sha256 for s in m.splits["train"].shards] == [
        s.sha256 for s in Store(outs[1]).manifest.splits["train"].shards]  # seeded per shard: reproducible
    missing = subprocess.run([*CLI, "generate", "masks", str(tmp_path / "nowhere"), "--n", "5", "--out",
                              str(tmp_path / "c")], capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "best" in missing.stderr


def test_two_ranks_split_each_minibatch_and_average_gradients(store_64, tmp_path, launch_ddp):
    """With mbstd groups of 1 (the only part the official multi-GPU code leaves per GPU), 2 ranks × 4 must match
    1 process × 8 after the first iteration (4 D and 4 G Adam steps)."""
    config = yaml.safe_load(write_config(tmp_path / "base.yaml", store_64).read_text())
    config["model"]["mbstd_group"] = 1
    config["schedule"].update(total_kimg=1, minibatch={4: 8, 8: 8, 16: 8})
    config["loop"].update(checkpoint_every_steps=1, keep_checkpoints=1000)
    path = tmp_path / "pgan.yaml"
    path.write_text(yaml.safe_dump(config))
    single = subprocess.run(train(path, tmp_path / "single"), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    launch_ddp([*train(path, tmp_path / "ddp"), "--dist", "ddp"])
    first = "checkpoints/ckpt-000000001.pt"
    a, b = (torch.load(tmp_path / d / first, weights_only=True)["task"] for d in ("single", "ddp"))
    worst = max(float((a[net][k] - b[net][k]).abs().max()) for net in ("G", "D") for k in a[net])
    moved = max(float((a[net][k] - torch.load(tmp_path / "single" / "checkpoints" / "ckpt-000000002.pt",
                                              weights_only=True)["task"][net][k]).abs().max())
                for net in ("G", "D") for k in a[net])
    assert worst < 1e-3 * moved, (worst, moved)  # agreement far below one iteration's change
