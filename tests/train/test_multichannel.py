"""Training on a store of several modalities (T1ce + FLAIR): the U-Net's per-slice normalisation, a two-channel U-Net
trained, evaluated and exported, SPADE generating both channels, and the nnU-Net export of both."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from toolkit.cli import main
from toolkit.data.dataset import SliceDataset, Source
from toolkit.data.store import Store, StoreWriter, verify
from toolkit.train.spade import to_uint16, to_unit
from toolkit.train.spade_eval import class_means, paint
from toolkit.train.unet import normalise

CLI = [sys.executable, "-m", "toolkit.cli"]


def _run(*argv, timeout=600):
    done = subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done


def test_slice_normalisation_puts_each_channels_brain_mean_at_one_whatever_the_gain():
    rng = np.random.default_rng(0)
    image = np.zeros((3, 2, 8, 8), np.float32)
    image[:, :, 2:6, 1:7] = rng.uniform(100, 900, (3, 2, 4, 6))
    image[2, 1] = 0  # a channel without brain
    x = torch.from_numpy(image)
    out = normalise(x, {"max": 1.0, "mean": 0.0, "normalise": "slice"})
    brain = image > 0
    for n in range(2):
        for c in range(2):
            np.testing.assert_allclose(out[n, c].numpy()[brain[n, c]].mean(), 1.0, rtol=1e-6)
            np.testing.assert_allclose(out[n, c].numpy(), image[n, c] / image[n, c][brain[n, c]].mean(), rtol=1e-6)
    assert out[2, 1].abs().sum() == 0 and (out.numpy()[~brain] == 0).all()
    gains = torch.tensor([7.0, 0.3]).view(1, 2, 1, 1)  # scanner gains per modality fall out
    torch.testing.assert_close(normalise(x * gains, {"normalise": "slice"}), out, rtol=1e-5, atol=1e-6)
    paper = normalise(x, {"max": 900.0, "mean": 0.25})  # the paper's scaling is unchanged (and the default)
    torch.testing.assert_close(paper, x / 900.0 - 0.25)


@pytest.fixture(scope="module")
def unet_two(store_64_two, tmp_path_factory):
    """A one-epoch U-Net on both channels, normalised per slice."""
    root = tmp_path_factory.mktemp("unet-two")
    config = {"data": {"real": str(store_64_two), "real_n": 32, "classes": 4, "normalise": "slice"},
              "model": {"widths": [4, 8, 16, 32], "bridge": 32}, "optim": {"lr": 1e-3, "batch": 8},
              "loop": {"epochs": 1, "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0.0},
              "runtime": {"threads": 1}, "seed": 0}
    (root / "unet.yaml").write_text(yaml.safe_dump(config))
    _run("train", "unet", "-c", root / "unet.yaml", "--run-dir", root / "run")
    return root / "run"


def test_a_two_modality_unet_takes_both_channels_and_evaluates_as_it_validated(unet_two, store_64_two, store_64):
    best = torch.load(unet_two / "best.pt", weights_only=True)
    assert best["in_channels"] == 2 and best["stats"]["normalise"] == "slice"
    first = next(v for k, v in best["model"].items() if k.endswith("weight") and v.ndim == 4)
    assert first.shape[1] == 2  # the first convolution reads both modalities
    _run("evaluate", "unet", unet_two, "--split", "val")
    result = json.loads((unet_two / "eval-val.json").read_text())
    validated = [json.loads(line) for line in (unet_two / "metrics.jsonl").read_text().splitlines()]
    logged = next(m["val_dice_error_percent"] for m in validated if "val_dice_error_percent" in m)
    assert result["dice_error_percent"] == pytest.approx(logged, abs=1e-3)
    done = subprocess.run([*CLI, "evaluate", "unet", str(unet_two), "--store", str(store_64)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "1-channel images, but the U-Net" in done.stderr


def test_exported_two_channel_model_normalises_inside_and_keras_is_refused(unet_two, tmp_path, capsys):
    assert main(["export", "unet", str(unet_two), "--format", "torchscript", "--out", str(tmp_path / "m.pt"),
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["input"]["shape"] == [None, 2, 64, 64] and doc["normalisation"]["formula"].startswith("x / mean")
    assert doc["validation"]["source"].endswith("test rows 0-3") and doc["validation"]["max_abs_diff"] <= 1e-4
    raw = torch.from_numpy(Store(yaml.safe_load((unet_two / "config.yaml").read_text())["data"]["real"])
                           .read("test", 0, 2, fields=("image",))["image"].astype(np.float32))
    model = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():  # the same probabilities for an image whose channels were scaled: normalised inside
        torch.testing.assert_close(model(raw * torch.tensor([3.0, 0.5]).view(1, 2, 1, 1)), model(raw),
                                   rtol=1e-4, atol=1e-4)
    assert main(["export", "unet", str(unet_two), "--format", "keras", "--out", str(tmp_path / "m.keras")]) != 0
    assert "Keras export takes the paper's normalisation" in capsys.readouterr().err
    assert not (tmp_path / "m.keras").exists()


def test_class_mean_baseline_paints_each_channel_with_its_own_class_means(store_64_two):
    dataset = SliceDataset([Source(store_64_two, "val")], classes=4)
    means = class_means(dataset)
    rows = Store(store_64_two).read("val", fields=("image", "label"))
    labels = SliceDataset([Source(store_64_two, "val")], classes=4, with_image=False)
    view = labels.collate(labels.__getitems__(list(range(len(labels)))))["label"].numpy()
    assert means.shape == (2, 4)
    for c in range(2):
        for k in range(4):
            assert means[c, k] == pytest.approx(rows["image"][:, c][view == k].mean(), rel=1e-9)
    painted = paint(torch.as_tensor(means), torch.from_numpy(view[:3]))
    assert painted.shape == (3, 2, 64, 64)
    np.testing.assert_allclose(painted[1, 1].numpy(), means[1][view[1]])


def test_unit_scaling_per_channel_round_trips_stored_intensities():
    peaks = torch.tensor([1000.0, 4000.0])
    image = torch.stack([torch.arange(0, 1001, 250.0), torch.arange(0, 4001, 1000.0)]).view(1, 2, 1, 5)
    unit = to_unit(image, peaks)
    assert unit.min() == -1 and (unit[:, :, :, -1] == 1).all()
    torch.testing.assert_close(to_uint16(unit, peaks).float(), image)
    assert to_uint16(torch.full((1, 2, 1, 1), 3.0), peaks).flatten().tolist() == [1000, 4000]  # clipped per channel


@pytest.fixture(scope="module")
def spade_two(store_64_two, tmp_path_factory):
    """A one-epoch, two-output SPADE on the reduced training pairs, and the masks it is asked to pair."""
    root = tmp_path_factory.mktemp("spade-two")
    config = {"data": {"store": str(store_64_two), "reduced": True},
              "model": {"resolution": 64, "ngf": 4, "ndf": 8, "hidden": 8, "out_channels": 2},
              "optim": {"batch": 4},
              "loop": {"epochs": 1, "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0.0},
              "runtime": {"threads": 1}, "samples": 4, "seed": 2}
    (root / "spade.yaml").write_text(yaml.safe_dump(config))
    _run("train", "spade", "-c", root / "spade.yaml", "--run-dir", root / "run")
    masks = root / "masks"
    writer = StoreWriter(masks, classes=7)
    writer.write("train", 0, label=Store(store_64_two).read("val", 0, 6)["label"], subject=[f"m{i}" for i in range(6)],
                 slice_index=np.full(6, -1))
    writer.finish(kind="synthetic", image_size=64, has_image=False, shard_counts={"train": 1})
    return root, masks


def test_spade_generates_both_modalities_each_within_its_training_range(spade_two, store_64_two, tmp_path):
    root, masks = spade_two
    saved = torch.load(root / "run" / "generator.pt", weights_only=True)
    train = Store(store_64_two).read("train", fields=("image",))["image"]
    assert saved["intensity_max"] == [float(v) for v in train.max(axis=(0, 2, 3))]
    assert saved["modality"] == "t1ce,flair"
    _run("generate", "images", root / "run", "--masks", masks, "--out", tmp_path / "syn", "--png")
    store = Store(tmp_path / "syn")
    m = store.manifest
    assert (m.modality, m.channels) == ("t1ce,flair", 2) and verify(store) == []
    rows = store.read("train", fields=("image", "label"))
    assert rows["image"].shape == (6, 2, 64, 64) and rows["image"].dtype == np.uint16
    assert all(rows["image"][:, c].max() <= saved["intensity_max"][c] for c in range(2))
    assert sorted(p.name for p in (tmp_path / "syn" / "png" / "train").iterdir()) == [
        "image-flair", "image-t1ce", "label"]
    mixed = SliceDataset([Source(store_64_two, "train", n=4), Source(tmp_path / "syn", "train")])
    assert mixed.collate(mixed.__getitems__([0, 5]))["image"].shape == (2, 2, 64, 64)


def test_spade_refuses_a_store_whose_channels_its_output_does_not_match(store_64_two, tmp_path):
    config = {"data": {"store": str(store_64_two)}, "model": {"resolution": 64, "ngf": 4, "ndf": 8, "hidden": 8},
              "runtime": {"threads": 1}}
    (tmp_path / "spade.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([*CLI, "train", "spade", "-c", str(tmp_path / "spade.yaml"), "--run-dir",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "2-channel images (modality t1ce,flair), model.out_channels is 1: set model.out_channels: 2" in done.stderr


def test_nnunet_export_writes_one_png_per_modality(store_64_two, tmp_path, capsys):
    assert main(["export", "nnunet", str(store_64_two), str(tmp_path / "raw"), "--id", "7", "--name", "Two",
                 "--classes", "4"]) == 0
    dataset = tmp_path / "raw" / "Dataset007_Two"
    doc = json.loads((dataset / "dataset.json").read_text())
    assert doc["channel_names"] == {"0": "T1ce", "1": "FLAIR"}
    images = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    labels = sorted(p.name for p in (dataset / "labelsTr").iterdir())
    assert len(images) == 2 * len(labels) == 2 * doc["numTraining"]
    assert {name[:-len("_0000.png")] for name in images} == {name[:-len(".png")] for name in labels}
