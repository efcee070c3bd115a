"""`generate masks` / `generate images` over MPI ranks: the store is byte-identical to a one-rank run, and a killed
multi-rank run's per-rank progress records are adopted (checksums re-verified) on resume.

The generators are freshly initialised, tiny and saved in the formats the trainers write (a PGAN tick snapshot, a
SPADE ``generator.pt``): generation does not care whether they were trained, and no training keeps the test short.
"""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import torch

from toolkit.config import to_dict
from toolkit.data.store import Store, verify
from toolkit.models.pgan import Generator, PGANConfig
from toolkit.models.spade import SPADEConfig, SPADEGenerator
from toolkit.mpi import clean_environment, mpirun_command
from toolkit.train.ranks import RANK_LOG
from toolkit.train.spade import GENERATOR, save_generator

CLI = [sys.executable, "-m", "toolkit.cli"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A PGAN run with one 32² snapshot and a SPADE run taking 7-class 32² masks."""
    root = tmp_path_factory.mktemp("generators")
    torch.manual_seed(0)
    pgan = PGANConfig(resolution=32, latent=16, fmap_base=64, fmap_max=16)
    (root / "pgan" / "snapshots").mkdir(parents=True)
    torch.save({"G_ema": Generator(pgan).state_dict(), "model": to_dict(pgan), "lod": 0.0, "kimg": 1.0, "tick": 0,
                "store": "none"}, root / "pgan" / "snapshots" / "tick-0000.pt")
    spade = SPADEConfig(resolution=32, ngf=4, ndf=8, hidden=8)
    (root / "spade").mkdir()
    save_generator(SPADEGenerator(spade), spade, {"intensity_max": 1000.0, "modality": "t1ce", "store": "none",
                                                  "epoch": 0}, root / "spade" / GENERATOR)
    return root / "pgan", root / "spade"


def run(ranks, *args):
    if ranks == 1:
        done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
    else:
        if shutil.which("mpirun") is None:
            pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
        done = subprocess.run(mpirun_command(ranks, *args), env=clean_environment(), capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def masks(pgan_run, out, ranks=1):
    # 5 shards: the ranks get unequal shares (0, 2, 4 and 1, 3)
    return run(ranks, "generate", "masks", str(pgan_run), "--n", "37", "--out", str(out), "--snapshot", "tick-0000",
               "--shard-size", "8", "--batch", "3", "--png")


def assert_same_store(a, b):
    ma, mb = Store(a).manifest, Store(b).manifest
    assert ma.to_json()["splits"] == mb.to_json()["splits"]  # shard files, sha256s, counts, class pixels
    assert ma.provenance == mb.provenance
    assert verify(Store(b)) == []
    pngs = sorted(p.relative_to(a) for p in (a / "png").rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(b) for p in (b / "png").rglob("*.png"))
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in pngs)
    assert not list(b.glob(".progress*")), "progress logs must be gone once the store is complete"


@pytest.fixture(scope="module")
def one_rank_masks(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("masks1") / "store"
    masks(runs[0], out)
    return out


@pytest.mark.mpi
def test_generate_masks_over_two_ranks_is_byte_identical(runs, one_rank_masks, tmp_path):
    done = masks(runs[0], tmp_path / "two", ranks=2)
    assert done.stdout.count("synthetic masks") == 1  # rank 0 reports, rank 1 is silent
    assert Store(one_rank_masks).manifest.splits["train"].n == 37
    assert_same_store(one_rank_masks, tmp_path / "two")


@pytest.mark.mpi
def test_generate_images_over_two_ranks_is_byte_identical(runs, one_rank_masks, tmp_path, figure):
    outs = {ranks: tmp_path / f"ranks-{ranks}" for ranks in (1, 2)}
    for ranks, out in outs.items():
        run(ranks, "generate", "images", str(runs[1]), "--masks", str(one_rank_masks), "--out", str(out), "--batch",
            "3", "--png")
    assert Store(outs[1]).manifest.has_image
    assert_same_store(outs[1], outs[2])
    # rank 0 drew the preview: mask / synthetic rows of the first 8 pairs, each mask panel the stored mask
    preview = figure(outs[2] / "preview.png")
    assert [len(row) for row in preview.panels] == [8, 8]
    labels = Store(outs[2]).read("train", 0, 8)["label"]
    assert all(preview.agreement(panel, mask) > 0.999 for panel, mask in zip(preview.panels[0], labels))


def test_a_killed_runs_rank_records_are_adopted_after_their_checksums(runs, one_rank_masks, tmp_path):
    """As if a two-rank run were killed after rank 1 logged shards 1 and 3 in its own file and rank 0 had done
    nothing: the resumed (one-rank) run keeps shard 1, rewrites shard 3 (corrupt) and gives the same store."""
    out = tmp_path / "resumed"
    out.mkdir()
    shards = Store(one_rank_masks).manifest.splits["train"].shards
    records = []
    for k in (1, 3):
        (out / "train").mkdir(exist_ok=True)
        shutil.copy(one_rank_masks / shards[k].file, out / shards[k].file)
        records.append(json.dumps({"split": "train", "index": k, "info": dataclasses.asdict(shards[k])}))
    (out / shards[3].file).write_bytes(b"torn")
    (out / RANK_LOG.format(rank=1)).write_text("\n".join(records) + "\n{\"torn")
    kept = (out / shards[1].file).stat().st_ino
    done = masks(runs[0], out)
    assert "shard train/shard-00003.h5 failed its checksum" in done.stderr
    assert (out / shards[1].file).stat().st_ino == kept  # adopted, not recomputed (a rewrite renames a new file in)
    assert_same_store(one_rank_masks, out)
