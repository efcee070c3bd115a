"""Checkpoints: atomic files with a latest pointer, pruning, weights-only loading, RNG round trip, resuming past torn
files and pointers that lead elsewhere."""

import logging
import random

import numpy as np
import pytest
import torch

from toolkit.train.checkpoint import Checkpoints, rng_state, set_rng_state
from toolkit.train.errors import CheckpointError


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


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("pointer", [b"../outside.pt\n", b"OUTSIDE\n", b"\x00\xff\xfe garbage\n", b"ckpt-1.pt/../x\n"],
                         ids=["parent", "absolute", "garbage", "traversal"])
def test_a_pointer_out_of_the_folder_or_unreadable_is_ignored_with_a_warning(tmp_path, caplog, pointer):
    ckpts = Checkpoints(tmp_path / "run", keep=3)
    ckpts.save({"w": torch.zeros(2)}, 1)
    ckpts.save({"w": torch.ones(2)}, 2)
    outside = tmp_path / "run" / "outside.pt"  # a loadable checkpoint that must never be read
    torch.save({"w": torch.full((2,), 99.0)}, outside)
    pointer = pointer.replace(b"OUTSIDE", str(outside).encode())
    (ckpts.folder / "latest").write_bytes(pointer)
    with caplog.at_level(logging.WARNING):
        path, state = ckpts.load_newest()
    assert path.name == "ckpt-000000002.pt" and torch.equal(state["w"], torch.ones(2))
    assert "ignoring the pointer" in caplog.text


def test_load_newest_skips_a_torn_checkpoint_logs_it_and_sets_it_aside(tmp_path, caplog):
    ckpts = Checkpoints(tmp_path, keep=3)
    for step in (10, 20, 30):
        ckpts.save({"w": torch.full((4,), float(step))}, step)
    _truncate(ckpts.folder / "ckpt-000000030.pt")
    (ckpts.folder / "ckpt-000000020.pt").write_bytes(b"not a checkpoint at all")
    with caplog.at_level(logging.WARNING):
        path, state = ckpts.load_newest(set_aside=True)
    assert path.name == "ckpt-000000010.pt" and torch.equal(state["w"], torch.full((4,), 10.0))
    for torn in ("ckpt-000000030.pt", "ckpt-000000020.pt"):
        assert f"{torn}: cannot load" in caplog.text
        assert (ckpts.folder / f"{torn}.unloadable").exists() and not (ckpts.folder / torn).exists()
    # set aside, the torn step-30 file no longer outranks what the resumed run saves: keep=1 keeps the new one
    ckpts.keep = 1
    ckpts.save({"w": torch.zeros(4)}, 11)
    assert sorted(p.name for p in ckpts.folder.glob("ckpt-*.pt")) == ["ckpt-000000011.pt"]
    assert ckpts.load_newest()[0].name == "ckpt-000000011.pt"


def test_load_newest_without_set_aside_leaves_the_torn_files_in_place(tmp_path):
    ckpts = Checkpoints(tmp_path)
    ckpts.save({"w": torch.zeros(2)}, 1)
    ckpts.save({"w": torch.ones(2)}, 2)
    _truncate(ckpts.folder / "ckpt-000000002.pt")
    assert ckpts.load_newest()[0].name == "ckpt-000000001.pt"  # as a non-main rank loads
    assert (ckpts.folder / "ckpt-000000002.pt").exists()


def test_no_loadable_checkpoint_is_an_error_naming_every_file_and_changes_nothing(tmp_path):
    ckpts = Checkpoints(tmp_path)
    for step in (1, 2):
        ckpts.save({"w": torch.zeros(2)}, step)
        _truncate(ckpts.folder / f"ckpt-{step:09d}.pt")
    before = sorted(p.name for p in ckpts.folder.iterdir())
    with pytest.raises(CheckpointError, match=r"no checkpoint loads \(ckpt-000000002\.pt: .*ckpt-000000001\.pt: "):
        ckpts.load_newest(set_aside=True)
    assert sorted(p.name for p in ckpts.folder.iterdir()) == before


def test_a_symbolic_link_named_like_a_checkpoint_is_never_loaded(tmp_path, caplog):
    ckpts = Checkpoints(tmp_path / "run")
    ckpts.save({"w": torch.zeros(2)}, 1)
    elsewhere = tmp_path / "elsewhere.pt"
    torch.save({"w": torch.ones(2)}, elsewhere)
    (ckpts.folder / "ckpt-000000009.pt").symlink_to(elsewhere)
    with caplog.at_level(logging.WARNING):
        path, state = ckpts.load_newest()
    assert path.name == "ckpt-000000001.pt" and torch.equal(state["w"], torch.zeros(2))
    assert "ckpt-000000009.pt: a symbolic link" in caplog.text


def test_no_checkpoint_at_all_is_a_fresh_start(tmp_path):
    assert Checkpoints(tmp_path).load_newest() is None
