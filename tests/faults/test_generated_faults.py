"""Faults of the generated outputs, with real processes, real files and real signals: `generate masks`, `generate
images` and `filter zscore` killed while they write shards, then resumed; resumes and complete outputs met with other
options or inputs (a seed, a count, a moved ``best`` pointer, a retrained SPADE generator, a threshold, SWD rows of
other ``--images``/``--seed``); a second writer while one runs; a held lock under ``mpirun -n 2``.

The generators are freshly initialised and tiny (generation does not care whether they were trained), saved in the
formats the trainers write; the stores are small real stores written with :class:`StoreWriter`. Commands run with one
thread each (``OMP_NUM_THREADS=1``): the tests share a small machine, and a reference and the run compared with it
use the same setting. Where a refusal's one-line CLI error is shown once, further refusals of the same output call
the library function the command calls, in this process (a command costs seconds of start-up).
"""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.bench.zscore import phantom_masks
from toolkit.config import to_dict
from toolkit.data.store import MANIFEST, OPTIONS, PROGRESS, Store, StoreWriter, verify
from toolkit.filter.zscore import calibrate, filter_store
from toolkit.lock import LOCK, WriterLock
from toolkit.models.pgan import Generator, PGANConfig
from toolkit.models.spade import SPADEConfig, SPADEGenerator
from toolkit.mpi import clean_environment, mpirun_command
from toolkit.provenance import OptionsChanged
from toolkit.train.generate import generate_masks
from toolkit.train.pgan_eval import evaluate_snapshots
from toolkit.train.spade import GENERATOR, save_generator
from toolkit.train.synthesis import generate_images

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "toolkit.cli"]
ENV = {**clean_environment(), "OMP_NUM_THREADS": "1"}
MASKS = ["--n", "96", "--shard-size", "8", "--batch", "8", "--snapshot", "tick-0000"]  # 12 shards


# --- fixtures and helpers ---------------------------------------------------------------------------------------------
def _store(root: Path, splits: dict[str, np.ndarray], *, kind: str, shard: int) -> Path:
    """A mask-only store from {split: labels}, in shards of ``shard`` rows."""
    writer = StoreWriter(root, classes=7)
    counts = {}
    for split, labels in splits.items():
        starts = range(0, len(labels), shard)
        for i, lo in enumerate(starts):
            rows = labels[lo:lo + shard]
            writer.write(split, i, label=rows, subject=[f"{split}{lo + j}" for j in range(len(rows))],
                         slice_index=np.arange(lo, lo + len(rows)))
        counts[split] = len(starts)
    writer.finish(kind=kind, image_size=next(iter(splits.values())).shape[-1], has_image=False, shard_counts=counts)
    return root


def _snapshot(path: Path, seed: int, store: Path | str) -> None:
    """A PGAN tick snapshot of a fresh 32² generator, as the trainer writes it."""
    torch.manual_seed(seed)
    config = PGANConfig(resolution=32, latent=16, fmap_base=64, fmap_max=16)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"G_ema": Generator(config).state_dict(), "model": to_dict(config), "lod": 0.0, "kimg": 1.0 + seed,
                "tick": seed, "store": str(store)}, path)


def _spade_generator(path: Path, seed: int, epoch: int) -> None:
    """A SPADE ``generator.pt`` of a fresh generator taking 7-class 32² masks, as the trainer writes it."""
    torch.manual_seed(seed)
    config = SPADEConfig(resolution=32, ngf=4, ndf=8, hidden=8)
    save_generator(SPADEGenerator(config), config, {"intensity_max": 1000.0, "modality": "t1ce", "store": "none",
                                                    "epoch": epoch}, path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A real 32² store, a PGAN run with two tick snapshots (whose store is the real one), a SPADE run, a mask store
    of 6 shards for `generate images`, and real and synthetic 16² stores for the filter (60 synthetic shards)."""
    root = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(0)
    real = _store(root / "real32", {"train": phantom_masks(rng, 40, 32)}, kind="real", shard=16)
    for tick in (0, 1):
        _snapshot(root / "pgan" / "snapshots" / f"tick-{tick:04d}.pt", tick, real)
    (root / "spade").mkdir()
    _spade_generator(root / "spade" / GENERATOR, 0, 0)
    masks = _store(root / "masks", {"train": phantom_masks(rng, 24, 32)}, kind="synthetic", shard=4)
    real16 = _store(root / "real16", {s: phantom_masks(rng, n, 16) for s, n in (("train", 120), ("val", 30))},
                    kind="real", shard=40)
    synthetic16 = _store(root / "synthetic16", {"train": phantom_masks(rng, 240, 16)}, kind="synthetic", shard=4)
    return {"real": real, "pgan": root / "pgan", "spade": root / "spade", "masks": masks, "real16": real16,
            "synthetic16": synthetic16}


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=ENV)


def _ok(args: list[str]) -> subprocess.CompletedProcess:
    done = _run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``tumorsynth: error:`` line of a failed command (and no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("tumorsynth: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("*/shard-*.h5"))


def _logged(out: Path) -> list[str]:
    """The shard files the store's progress log records as finished (complete lines only)."""
    progress = out / PROGRESS
    lines = progress.read_text().split("\n")[:-1] if progress.exists() else []
    return [json.loads(line)["info"]["file"] for line in lines]


def _start_until(args: list[str], out: Path, log: Path, sig: int, ready=_shard_files,
                 timeout: float = 300) -> subprocess.Popen:
    """Start the command, wait (polling) until ``ready(out)`` lists something, then send ``sig``."""
    with open(log, "w") as stderr:  # a file, not a pipe: a full pipe would stall the writer
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=stderr, cwd=REPO, env=ENV)
    deadline = time.monotonic() + timeout
    while not ready(out):
        assert proc.poll() is None, f"ended before it could be signalled: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the first shard"
        time.sleep(0.005)
    proc.send_signal(sig)
    return proc


def _kill_mid_write(args: list[str], out: Path, log: Path, total: int, ready=_shard_files) -> None:
    """SIGKILL the command once ``ready`` (by default: its first shard file is on disk); assert that the kill landed
    inside the write phase."""
    proc = _start_until(args, out, log, signal.SIGKILL, ready)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (out / MANIFEST).exists(), "the kill must land before the manifest"
    assert 1 <= len(_shard_files(out)) < total, "the kill must land while shards are being written"


def _contents(out: Path) -> dict[str, str]:
    """sha256 of every file of an output folder but its lock file (whose holder record every claimant rewrites) and
    temporary files (a killed writer's, which any next writer removes under the lock)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != LOCK and not p.name.endswith(".tmp")}


def _same_store(reference: Path, resumed: Path) -> None:
    """The resumed store equals the uninterrupted one: shard files, checksums and counts, and the options."""
    a, b = Store(reference).manifest, Store(resumed).manifest
    assert a.to_json()["splits"] == b.to_json()["splits"]
    assert a.provenance["options"] == b.provenance["options"]
    assert verify(Store(resumed)) == []
    assert not list(resumed.rglob(".*.tmp")) and not (resumed / OPTIONS).exists()


# --- generate masks ---------------------------------------------------------------------------------------------------
def _masks(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["generate", "masks", str(inputs["pgan"]), "--out", str(out), *MASKS, *extra]


@pytest.fixture(scope="module")
def reference_masks(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference-masks") / "store"
    _ok(_masks(inputs, out))
    return out


def test_generate_masks_killed_mid_write_refuses_other_seed_or_n_and_resumes_to_the_uninterrupted_store(
        inputs, reference_masks, tmp_path):
    out = tmp_path / "masks"
    # killed once a shard is logged as finished (a shard renamed into place but not yet logged is redone)
    _kill_mid_write(_masks(inputs, out), out, tmp_path / "stderr", total=12, ready=_logged)
    finished = {out / name: (out / name).stat().st_ino for name in _logged(out)}
    before = _contents(out)
    line = _error_line(_run([*_masks(inputs, out), "--seed", "1"]))
    assert "seed: 0 then, 1 now" in line and str(out) in line, line
    assert _contents(out) == before, "a refused resume (--seed) changed the partial store"
    with pytest.raises(OptionsChanged, match="n: 96 then, 100 now"):  # the library call the command makes
        generate_masks(inputs["pgan"], 100, out, snapshot="tick-0000", shard_size=8, batch=8)
    assert _contents(out) == before, "a refused resume (--n) changed the partial store"
    _ok(_masks(inputs, out))
    assert {path: path.stat().st_ino for path in finished} == finished  # shards logged before the kill: kept
    _same_store(reference_masks, out)


def test_a_complete_mask_store_is_refused_with_other_options_and_a_moved_best_pointer(inputs, reference_masks,
                                                                                       tmp_path):
    before = _contents(reference_masks)
    line = _error_line(_run([*_masks(inputs, reference_masks), "--seed", "1"]))
    assert "seed: 0 then, 1 now" in line and "complete" not in line, line
    run = tmp_path / "pgan"  # a copy of the PGAN run, so that its best pointer can move
    shutil.copytree(inputs["pgan"], run)
    (run / "snapshots" / "best").write_text("tick-0001\n")  # as `evaluate swd` rewrites it
    with pytest.raises(OptionsChanged, match=re.escape("snapshot: 'tick-0000.pt' then, 'tick-0001.pt' now")):
        generate_masks(run, 96, reference_masks, snapshot="best", shard_size=8, batch=8)
    (run / "snapshots" / "best").write_text("tick-0000\n")  # the snapshot the store was made from: complete
    manifest = generate_masks(run, 96, reference_masks, snapshot="best", shard_size=8, batch=8)
    assert manifest.to_json() == Store(reference_masks).manifest.to_json()
    assert _contents(reference_masks) == before


def test_a_second_mask_writer_stops_at_once_naming_the_first_and_touches_nothing(inputs, reference_masks, tmp_path):
    out = tmp_path / "masks"
    first = _start_until(_masks(inputs, out), out, tmp_path / "stderr", signal.SIGSTOP)
    try:
        # the first writer is stopped, holding the store: a second one that waited for the lock would time out
        line = _error_line(_run(_masks(inputs, out), timeout=120))
        assert f"pid {first.pid}" in line and "being written by" in line, line
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "stderr").read_text()[-3000:]
    _same_store(reference_masks, out)


# --- generate images --------------------------------------------------------------------------------------------------
def _images(spade: Path, masks: Path, out: Path) -> list[str]:
    return ["generate", "images", str(spade), "--masks", str(masks), "--out", str(out), "--batch", "4"]


@pytest.fixture(scope="module")
def reference_images(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference-images") / "store"
    _ok(_images(inputs["spade"], inputs["masks"], out))
    return out


def test_generate_images_killed_mid_write_refuses_a_retrained_generator_and_resumes_to_the_uninterrupted_store(
        inputs, reference_images, tmp_path):
    spade, out = tmp_path / "spade", tmp_path / "images"
    shutil.copytree(inputs["spade"], spade)
    _kill_mid_write(_images(spade, inputs["masks"], out), out, tmp_path / "stderr", total=6)
    before = _contents(out)
    original = (spade / GENERATOR).read_bytes()
    _spade_generator(spade / GENERATOR, 1, 1)  # one more SPADE epoch rewrote the generator
    line = _error_line(_run(_images(spade, inputs["masks"], out)))
    assert "generator: 'sha256:" in line and "epoch: 0 then, 1 now" in line, line
    assert _contents(out) == before, "a refused resume changed the partial store"
    (spade / GENERATOR).write_bytes(original)
    _ok(_images(spade, inputs["masks"], out))
    _same_store(reference_images, out)
    _spade_generator(spade / GENERATOR, 1, 1)
    with pytest.raises(OptionsChanged, match="epoch: 0 then, 1 now"):  # complete, but from the other generator
        generate_images(spade, inputs["masks"], out, batch=4)


def test_generate_images_from_a_spade_run_still_training_is_refused_naming_the_trainer(inputs, tmp_path):
    spade = tmp_path / "spade"
    shutil.copytree(inputs["spade"], spade)
    with WriterLock(spade, "run directory"):  # this test process plays the trainer
        line = _error_line(_run(_images(spade, inputs["masks"], tmp_path / "images")))
    assert f"pid {os.getpid()}" in line and "still being trained" in line, line
    assert not (tmp_path / "images").exists()


# --- filter zscore ----------------------------------------------------------------------------------------------------
def _filter(inputs: dict[str, Path], out: Path, threshold: str = "12") -> list[str]:
    return ["filter", "zscore", "--real", str(inputs["real16"]), "--synthetic", str(inputs["synthetic16"]), "--out",
            str(out), "--threshold", threshold, "--min-std", "0.5", "--json"]


@pytest.fixture(scope="module")
def reference_filtered(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference-filtered") / "store"
    doc = json.loads(_ok(_filter(inputs, out)).stdout)
    assert 0 < doc["kept"] < 240, doc  # drops some, keeps some: both paths of the filter are exercised
    return out


def test_filter_killed_mid_write_refuses_another_threshold_and_resumes_to_the_uninterrupted_store(
        inputs, reference_filtered, tmp_path):
    out = tmp_path / "kept"
    _kill_mid_write(_filter(inputs, out), out, tmp_path / "stderr", total=len(_shard_files(reference_filtered)))
    before = _contents(out)
    line = _error_line(_run(_filter(inputs, out, threshold="20")))
    assert "threshold: 12.0 then, 20.0 now" in line, line
    assert _contents(out) == before, "a refused resume changed the partial store"
    _ok(_filter(inputs, out))
    _same_store(reference_filtered, out)
    assert (out / "zscore.csv").read_bytes() == (reference_filtered / "zscore.csv").read_bytes()


def test_a_complete_filtered_store_is_kept_with_the_same_options_and_refused_with_others(inputs, reference_filtered):
    before = _contents(reference_filtered)
    doc = filter_store(inputs["real16"], inputs["synthetic16"], reference_filtered, threshold=12.0, min_std=0.5)
    assert doc["already_complete"] and doc["kept"] == Store(reference_filtered).manifest.splits["train"].n
    line = _error_line(_run(_filter(inputs, reference_filtered, threshold="20")))
    assert "threshold: 12.0 then, 20.0 now" in line and "complete" not in line, line
    assert _contents(reference_filtered) == before


def test_a_second_filter_on_a_store_being_written_stops_naming_the_holder_and_writes_no_shard(inputs, tmp_path):
    out = tmp_path / "kept"
    with WriterLock(out, "store"):  # this test process plays the first writer
        line = _error_line(_run(_filter(inputs, out)))
    assert f"pid {os.getpid()}" in line and "being written by" in line, line
    assert not _shard_files(out)  # refused before scoring: the ranks write kept shards only under rank 0's lock


def test_a_calibration_folder_refuses_other_options_and_keeps_its_curve(inputs, tmp_path):
    out = tmp_path / "calibration"
    (out / ".calibration.csv.x1.tmp").parent.mkdir()
    (out / ".calibration.csv.x1.tmp").write_bytes(b"partial")  # a killed calibration's
    calibrate(inputs["real16"], inputs["synthetic16"], out, min_std=0.5)
    assert not (out / ".calibration.csv.x1.tmp").exists()
    before = _contents(out)
    with pytest.raises(OptionsChanged, match="reduced: False then, True now"):
        calibrate(inputs["real16"], inputs["synthetic16"], out, reduced=True, min_std=0.5)
    assert _contents(out) == before
    assert calibrate(inputs["real16"], inputs["synthetic16"], out, min_std=0.5)["suggested_threshold"] is not None


# --- evaluate swd -----------------------------------------------------------------------------------------------------
def _swd(run: Path, *extra: str) -> list[str]:
    return ["evaluate", "swd", str(run), "--images", "16", "--json", *extra]


def test_evaluate_swd_refuses_rows_of_other_images_or_seed_and_leaves_the_table_untouched(inputs, tmp_path):
    run = tmp_path / "pgan"
    shutil.copytree(inputs["pgan"], run)
    stale = [run / ".swd.csv.x1.tmp", run / "snapshots" / ".best.x2.tmp"]  # a killed evaluation's
    theirs = run / "checkpoints" / ".ckpt-000000010.pt.x3.tmp"  # the trainer's: not the evaluation's to remove
    for path in (*stale, theirs):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    assert json.loads(_ok(_swd(run)).stdout)["scored_now"] == 2
    assert not any(p.exists() for p in stale) and theirs.exists()
    _snapshot(run / "snapshots" / "tick-0002.pt", 2, inputs["real"])  # new work for a resume
    outputs = [run / "swd.csv", run / "swd.png", run / "snapshots" / "best", run / "swd" / "options.json"]
    before = [p.read_bytes() for p in outputs]
    line = _error_line(_run([*_swd(run), "--images", "8"]))
    assert "images: 16 then, 8 now" in line, line
    assert [p.read_bytes() for p in outputs] == before, "a refused evaluation (--images) changed its outputs"
    with pytest.raises(OptionsChanged, match="seed: 0 then, 1 now"):  # the library call the command makes
        evaluate_snapshots(run, images=16, seed=1)
    assert [p.read_bytes() for p in outputs] == before, "a refused evaluation (--seed) changed its outputs"
    rows = (run / "swd.csv").read_text().splitlines()
    doc = json.loads(_ok(_swd(run)).stdout)
    assert doc["scored_now"] == 1 and doc["snapshots"] == 3
    assert (run / "swd.csv").read_text().splitlines()[:3] == rows  # the earlier rows kept as they were
    legacy = tmp_path / "legacy"  # a table from before options were recorded: its rows' options are unknown
    shutil.copytree(inputs["pgan"], legacy)
    (legacy / "swd.csv").write_text(rows[0] + "\n")
    with pytest.raises(OptionsChanged, match="rows of unknown options"):
        evaluate_snapshots(legacy, images=16)


def test_evaluate_swd_refuses_a_second_evaluator_and_a_run_still_training(inputs, tmp_path):
    run = tmp_path / "pgan"
    shutil.copytree(inputs["pgan"], run)
    for folder, shown in ((run / "swd", "being written by"), (run, "still being trained")):
        with WriterLock(folder, "folder"):  # this test process plays the other evaluator, then the trainer
            line = _error_line(_run(_swd(run)))
        assert f"pid {os.getpid()}" in line and shown in line, line
        assert not (run / "swd.csv").exists() and not (run / "snapshots" / "best").exists()


# --- under mpirun -----------------------------------------------------------------------------------------------------
@pytest.mark.mpi
@pytest.mark.parametrize("command", ["generate masks", "filter", "evaluate swd"])
def test_a_held_lock_stops_both_mpi_ranks_at_once(command, inputs, tmp_path):
    """Rank 0 cannot take the lock; rank 1 learns it from rank 0 (a broadcast) and stops too, instead of waiting in a
    collective for a rank that gave up: both print the holder and the job ends promptly (a hang hits the timeout)."""
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    if command == "evaluate swd":
        run = tmp_path / "pgan"
        shutil.copytree(inputs["pgan"], run)
        args, locked = _swd(run), run / "swd"
    else:
        locked = tmp_path / "out"
        args = _masks(inputs, locked) if command == "generate masks" else _filter(inputs, locked)
    with WriterLock(locked, "folder"):
        done = subprocess.run(mpirun_command(2, *args), capture_output=True, text=True, timeout=180, cwd=REPO,
                              env=ENV)
    assert done.returncode != 0
    # counted in the whole stream: mpirun forwards each rank's writes as they come, so two lines can interleave
    holder = f"being written by host {socket.gethostname()} pid {os.getpid()} "
    assert done.stderr.count("tumorsynth: error:") == 2 and done.stderr.count(holder) == 2, done.stderr[-3000:]
    assert not _shard_files(locked)
