"""SPADE for real: training writes a generator and sample grids, a killed run resumes bit-identically, 2 DDP ranks
equal one process, and synthesis turns a mask store into a paired store the U-Net dataset can mix with real data.

Runs are real `tumorsynth` subprocesses on the 64² phantom store with narrow networks and the reduced training prefix.
"""

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
import yaml

from toolkit.data.dataset import SliceDataset, Source
from toolkit.data.png import read_png
from toolkit.data.store import Store, StoreWriter, verify

CLI = [sys.executable, "-m", "toolkit.cli"]


def write_config(path, store, **loop):
    config = {
        "data": {"store": str(store), "reduced": True},
        "model": {"resolution": 64, "ngf": 4, "ndf": 8, "hidden": 8},
        "optim": {"batch": 4},
        "loop": {"epochs": 2, "checkpoint_every_steps": 4, "checkpoint_every_minutes": 0.0, "log_every_steps": 2,
                 **loop},
        "runtime": {"threads": 1},
        "samples": 4,
        "seed": 2,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def train(config, run_dir, *extra):
    return [*CLI, "train", "spade", "-c", str(config), "--run-dir", str(run_dir), *extra]


@pytest.fixture(scope="module")
def spade_run(store_64, tmp_path_factory):
    root = tmp_path_factory.mktemp("spade")
    config = write_config(root / "spade.yaml", store_64)
    done = subprocess.run(train(config, root / "run"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return config, root / "run"


def _matches(fig, panel, arrays):
    """Index of the label array of ``arrays`` [n,S,S] that the label ``panel`` shows, read back exactly."""
    k = int((fig.labels(fig.cells(panel, arrays.shape[-1]))[None] == arrays).mean((1, 2)).argmax())
    assert fig.agreement(panel, arrays[k]) > 0.999
    return k


def _shows_image(fig, panel, image):
    """A grey panel is ``image`` scaled to its own range: its grey levels follow the image's values."""
    grey = fig.cells(panel, image.shape[-1])[..., 0].astype(float)
    return not fig.classes(panel) and np.corrcoef(grey.ravel(), image.astype(float).ravel())[0, 1] > 0.95


def test_training_writes_generator_samples_and_metrics(spade_run, store_64, figure):
    _, run_dir = spade_run
    saved = torch.load(run_dir / "generator.pt", weights_only=True)
    assert saved["intensity_max"] == Store(store_64).manifest.intensity_max and saved["epoch"] == 1
    assert saved["model"]["resolution"] == 64 and saved["modality"] == "t1ce"
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["epoch-0000.png", "epoch-0001.png"]
    # the sample grid: mask / synthetic / class mean / real rows of 4 validation pairs spread over the larger half by
    # brain pixels
    val = _validation(store_64)
    larger = np.argsort(-(val["label"] != 0).reshape(len(val["label"]), -1).sum(1), kind="stable")
    larger = larger[:len(larger) // 2]
    shown = larger[[0, round((len(larger) - 1) / 3), round(2 * (len(larger) - 1) / 3), len(larger) - 1]]
    painted = _class_means(store_64)[val["label"][shown]]
    fig = figure(run_dir / "samples" / "epoch-0001.png")
    assert (fig.width, fig.height) == (4 * 176, 4 * 176) and [len(row) for row in fig.panels] == [4, 4, 4, 4]
    for k, (mask, synthetic, baseline, real) in enumerate(zip(*fig.panels)):
        assert _matches(fig, mask, val["label"][shown]) == k
        assert _shows_image(fig, real, val["image"][shown[k]]) and not fig.classes(synthetic)
        assert _shows_image(fig, baseline, painted[k])
    lines = [yaml.safe_load(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [line for line in lines if "loss_d_real" in line]
    assert losses and all(np.isfinite(line["loss_g_feat"]) for line in losses)
    assert [line["epoch"] for line in lines if "val_l1" in line] == [0, 1]
    done = json.loads((run_dir / "DONE").read_text())
    assert done["epochs"] == 2 and done["step"] == lines[-1]["step"]
    assert done["best_val"] is None  # no validation loss: null, as strict JSON has no Infinity


def _validation(store):
    """The non-empty validation pairs, in store order."""
    val = Store(store).read("val", fields=("label", "image"))
    keep = val["label"].reshape(len(val["label"]), -1).any(1)
    return {k: v[keep] for k, v in val.items()}


def _class_means(store):
    """Mean intensity per class over the non-empty pairs of the reduced training prefix (0 for absent classes)."""
    train = Store(store).read("train", 0, Store(store).manifest.reduced, fields=("label", "image"))
    keep = train["label"].reshape(len(train["label"]), -1).any(1)
    label, image = train["label"][keep].astype(int), train["image"][keep].astype(float)
    return np.array([image[label == c].mean() if (label == c).any() else 0.0 for c in range(7)])


def test_epoch_metrics_score_spade_and_the_class_mean_baseline_on_the_validation_pairs(spade_run, store_64):
    _, run_dir = spade_run
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if "val_l1" in line]
    keys = {f"{who}_{m}" for who in ("val", "baseline") for m in ("l1", "psnr", "ssim")}
    assert [line["epoch"] for line in epochs] == [0, 1] and all(keys <= line.keys() for line in epochs)
    val = _validation(store_64)
    painted = _class_means(store_64)[val["label"]]
    baseline_l1 = np.abs(painted - val["image"]).reshape(len(painted), -1).mean(1).mean()
    for line in epochs:
        assert line["baseline_l1"] == pytest.approx(baseline_l1, rel=1e-5)  # the same rows every epoch
        assert 0 < line["baseline_ssim"] < 1 and 0 < line["val_ssim"] < 1
        assert np.isfinite(line["val_psnr"]) and np.isfinite(line["baseline_psnr"])
    assert epochs[0]["val_l1"] != epochs[1]["val_l1"]  # SPADE's numbers follow its training


def _latest_checkpoint(run_dir):
    folder = run_dir / "checkpoints"
    return torch.load(folder / (folder / "latest").read_text().strip(), weights_only=True)


def test_killed_run_resumes_bit_identically(spade_run, tmp_path, assert_same_state):
    config, reference = spade_run
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train(config, run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "latest").exists():
        assert proc.poll() is None, f"run ended before the kill: {proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run_dir / "DONE").exists()
    resumed = subprocess.run(train(config, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    mine, theirs = _latest_checkpoint(run_dir), _latest_checkpoint(reference)
    assert set(theirs["task"]) >= {"G", "D", "opt_G", "opt_D"} and theirs["progress"]["epoch"] == 2
    # everything: both networks (weights and BatchNorm buffers), both optimisers' moments, steps and hyperparameters,
    # the precision state, the progress and the config. Not the global RNG states: the trainer seeds none of Python's
    # and numpy's (each process starts from OS entropy) and draws its randomness from generators seeded per use, and
    # the global torch generator, seeded for the initial weights, is drawn from outside training too (a data loader
    # draws a base seed per iterator, and a resumed run starts one more); measured: all three differ at every
    # checkpoint while every tensor above agrees.
    assert mine.keys() == theirs.keys() >= {"task", "progress", "config", "rng"}
    assert_same_state({k: v for k, v in mine.items() if k != "rng"}, {k: v for k, v in theirs.items() if k != "rng"})


def test_two_ranks_with_synchronised_batch_norm_equal_one_process(store_64, tmp_path, launch_ddp):
    path = write_config(tmp_path / "spade.yaml", store_64, epochs=1, checkpoint_every_steps=1, keep_checkpoints=100)
    single = subprocess.run(train(path, tmp_path / "single"), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    launch_ddp([*train(path, tmp_path / "ddp"), "--dist", "ddp"])

    def task(run, step):
        return torch.load(tmp_path / run / "checkpoints" / f"ckpt-{step:09d}.pt", weights_only=True)["task"]

    a, b, later = task("single", 1), task("ddp", 1), task("single", 2)
    worst = max(float((a[n][k].float() - b[n][k].float()).abs().max()) for n in ("G", "D") for k in a[n])
    moved = max(float((a[n][k].float() - later[n][k].float()).abs().max()) for n in ("G", "D") for k in a[n])
    assert worst < 1e-3 * moved, (worst, moved)
    stats = [k for k in a["G"] if k.endswith("running_var")]
    assert stats and all(torch.allclose(a["G"][k], b["G"][k], rtol=1e-4) for k in stats)  # global batch statistics


@pytest.fixture(scope="module")
def mask_store(store_64, tmp_path_factory):
    """A mask-only store (as the filter writes): the real validation masks in two shards."""
    out = tmp_path_factory.mktemp("masks") / "kept"
    labels = Store(store_64).read("val", 0, 20)["label"]
    writer = StoreWriter(out, classes=7)
    for k in range(2):
        rows = labels[10 * k:10 * (k + 1)]
        writer.write("train", k, label=rows, subject=[f"mask-{10 * k + i:03d}" for i in range(10)],
                     slice_index=np.full(10, -1))
    writer.finish(kind="synthetic", image_size=64, has_image=False, shard_counts={"train": 2},
                  provenance={"test": "masks"})
    return out


def test_generate_images_pairs_every_mask_with_uint16_mr(spade_run, mask_store, store_64, tmp_path, figure):
    _, run_dir = spade_run
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, png in zip(outs, ("--png", "--no-png")):
        done = subprocess.run([*CLI, "generate", "images", str(run_dir), "--masks", str(mask_store), "--out", str(out),
                               "--batch", "3", png], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    store = Store(outs[0])
    m = store.manifest
    assert m.kind == "synthetic" and m.has_image and m.splits["train"].n == 20 and verify(store) == []
    assert m.provenance["masks_provenance"] == {"test": "masks"} and m.provenance["epoch"] == 1
    rows = store.read("train", fields=("image", "label", "subject"))
    assert np.array_equal(rows["label"], Store(mask_store).read("train")["label"])
    peak = Store(store_64).manifest.intensity_max
    assert rows["image"].dtype == np.uint16 and 0 < m.intensity_max <= peak
    name = rows["subject"][0].decode()
    assert np.array_equal(read_png(outs[0] / "png" / "train" / "image" / f"{name}.png"), rows["image"][0])
    assert not (outs[1] / "png").exists()
    preview = figure(outs[0] / "preview.png")  # mask / synthetic MR rows of the store's first 8 pairs
    assert (preview.width, preview.height) == (8 * 176, 2 * 176) and [len(r) for r in preview.panels] == [8, 8]
    for k, (mask, synthetic) in enumerate(zip(*preview.panels)):
        assert _matches(preview, mask, rows["label"][:8]) == k and _shows_image(preview, synthetic, rows["image"][k])
    shas = [[s.sha256 for s in Store(o).manifest.splits["train"].shards] for o in outs]
    assert shas[0] == shas[1]  # eval-mode generator, no noise: synthesis is deterministic
    mixed = SliceDataset([Source(store_64, "train", n=8), Source(outs[0], "train")], classes=4)
    batch = mixed.collate(mixed.__getitems__([0, 8, 27]))
    assert batch["image"].shape == (3, 1, 64, 64) and batch["label"].max() <= 3
    assert batch["source"].tolist() == [0, 1, 1]


def test_generate_images_resumes_by_shard_and_refuses_mismatched_masks(spade_run, mask_store, tmp_path):
    _, run_dir = spade_run
    out = tmp_path / "out"
    cmd = [*CLI, "generate", "images", str(run_dir), "--masks", str(mask_store), "--out", str(out)]
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    first = Store(out).manifest.splits["train"].shards
    # as if killed while writing shard 1: no manifest, shard 0 logged as done, shard 1 missing
    (out / "manifest.json").unlink()
    (out / first[1].file).unlink()
    (out / ".progress.jsonl").write_text(json.dumps({"split": "train", "index": 0, "info": asdict(first[0])}) + "\n")
    before = (out / first[0].file).stat()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [s.sha256 for s in Store(out).manifest.splits["train"].shards] == [s.sha256 for s in first]
    # synthesis is deterministic, so equal checksums alone would not show the skip: the finished shard is the same
    # file, untouched (a rewrite renames a new inode in), while the missing one was written again
    after = (out / first[0].file).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert (out / first[1].file).stat().st_mtime_ns >= before.st_mtime_ns
    bad = subprocess.run([*CLI, "generate", "images", str(run_dir), "--masks", str(run_dir), "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "manifest" in bad.stderr
