"""Checkpoints: atomic files with a latest pointer, pruning, weights-only loading, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from toolkit.train.checkpoint import Checkpoints, rng_state, set_rng_state


def test_save_points_latest_and_keeps_the_last_k(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=2)
    assert ckpts.latest() is None
    for step in (5, 10, 15):
        ckpts.save({"w": torch.full((2,), float(step)), "step": step}, step)
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("ckpt-*.pt"))
    assert names == ["ckpt-000000010.pt", "ckpt-000000015.pt"]
    latest = ckpts.latest()
    assert latest.name == "ckpt-000000015.pt"
    assert torch.equal(Checkpoints.load(latest)["w"], torch.full((2,), 15.0))


def test_latest_falls_back_to_the_newest_file_when_the_pointer_is_stale(tmp_path):
    ckpts = Checkpoints(tmp_path, keep=3)
    ckpts.save({"step": 1}, 1)
    ckpts.save({"step": 2}, 2)
    (tmp_path / "checkpoints" / "latest").write_text("ckpt-000000099.pt\n")
    assert ckpts.latest().name == "ckpt-000000002.pt"


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    ckpts = Checkpoints(tmp_path)
    ckpts.save({"rng": rng_state()}, 1)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(Checkpoints.load(ckpts.latest())["rng"])
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])


def test_background_save_writes_the_state_as_it_was_when_saved(tmp_path):
    ckpts = Checkpoints(tmp_path)
    weights = torch.zeros(1000)
    ckpts.save({"w": weights}, 7, background=True)
    weights.add_(1)  # training goes on while the writer thread runs
    ckpts.wait()
    assert ckpts.latest().name == "ckpt-000000007.pt"
    assert torch.equal(Checkpoints.load(ckpts.latest())["w"], torch.zeros(1000))


def test_a_failed_background_save_is_raised_by_the_next_wait(tmp_path):
    ckpts = Checkpoints(tmp_path)
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    ckpts.save({"w": torch.zeros(2)}, 1, background=True)
    with pytest.raises(OSError):
        ckpts.wait()
    ckpts.wait()  # reported once
