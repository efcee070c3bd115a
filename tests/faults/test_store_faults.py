"""Faults of the data side, with real processes, real files and real signals: ``prepare`` killed in each write phase,
a second ``prepare`` on a store being written, a bad or missing cohort on resume, changed options, a bit flip under
the training loader, a full disk, labels beyond the class count and a symlinked cohort."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pytest
import torch

from toolkit.data.dataset import SliceDataset, Source
from toolkit.data.nifti import discover
from toolkit.data.png import png_name
from toolkit.data.prepare import WORK, PrepareConfig, prepare
from toolkit.data.store import (
    MANIFEST,
    OPTIONS,
    PROGRESS,
    CorruptShardError,
    Store,
    StoreError,
    StoreWriter,
    sha256_file,
)
from toolkit.lock import LOCK, holder
from toolkit.train.loader import EpochBatches, EpochLoader

REPO = Path(__file__).resolve().parents[2]
OPTIONS_32 = ["--size", "32", "--shard-size", "16", "--tissue", "none"]


# --- fixtures and helpers ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_cohort(cohort, tmp_path_factory) -> Path:
    """Two subjects of the session's phantom cohort."""
    out = tmp_path_factory.mktemp("cohort2")
    for folder in sorted(cohort.iterdir())[:2]:
        shutil.copytree(folder, out / folder.name)
    return out


@pytest.fixture(scope="module")
def baseline(small_cohort, tmp_path_factory) -> Path:
    """The small cohort prepared in one uninterrupted run with the options of every test here."""
    out = tmp_path_factory.mktemp("baseline") / "store"
    prepare(PrepareConfig(src=small_cohort, out=out, size=32, shard_size=16, tissue="none"))
    return out


def _cmd(src: Path, out: Path, *extra: str) -> list[str]:
    """The prepare command line; tests that are not about the PNG export pass ``--no-png`` (it takes most of a run:
    every PNG is fsynced)."""
    return [sys.executable, "-m", "toolkit.cli", "prepare", str(src), str(out), *OPTIONS_32, *extra]


def _run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``tumorsynth: error:`` line of a failed command (and no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("tumorsynth: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def _kill_when(cmd: list[str], condition: Callable[[], bool], what: str, log: Path, timeout: float = 120) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``condition()`` holds (polled, with a deadline)."""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if proc.poll() is not None:
                pytest.fail(f"prepare ended (rc {proc.returncode}) before {what}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}")
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _interrupt(cmd: list[str], out: Path, condition: Callable[[], bool], caught: Callable[[], bool], what: str,
               attempts: int = 3) -> None:
    """Kill a fresh run of ``cmd`` when ``condition()`` holds, until the kill landed in the state ``caught()``
    describes: the windows right before and after the manifest last milliseconds, so a late kill is tried again."""
    for _ in range(attempts):
        shutil.rmtree(out, ignore_errors=True)
        _kill_when(cmd, condition, what, out.parent / "prepare.log")
        if caught():
            return
    pytest.fail(f"no kill of {attempts} landed {what}")


def _png(store: Path, split: str, shard: int, row: int, field: str) -> Path:
    """The PNG path of one row of a shard of ``store`` (the same in every store of the same rows)."""
    with h5py.File(store / split / f"shard-{shard:05d}.h5", "r") as f:
        name = png_name(f["subject"].asstr()[row], int(f["slice"][row]))
    return Path("png") / split / field / name


def _last_png(store: Path) -> Path:
    """The PNG that prepare writes last (single worker: shards in manifest order, rows in order, labels last)."""
    manifest = Store(store).manifest
    split = [name for name, info in manifest.splits.items() if info.shards][-1]
    last = manifest.splits[split].shards[-1]
    return _png(store, split, len(manifest.splits[split].shards) - 1, last.n - 1, "label")


def _snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the lock file, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


def _assert_same_store(out: Path, baseline: Path) -> None:
    """``out`` holds the uninterrupted run's shards (and PNGs, if it has them), byte for byte, and nothing of a writer
    at work."""
    mine, theirs = Store(out).manifest, Store(baseline).manifest
    assert {k: [s.sha256 for s in v.shards] for k, v in mine.splits.items()} == {
        k: [s.sha256 for s in v.shards] for k, v in theirs.splits.items()}
    if mine.provenance["options"]["png"]:
        assert _snapshot(out / "png") == _snapshot(baseline / "png")
    else:
        assert not (out / "png").exists()
    assert not [name for name in (WORK, PROGRESS, OPTIONS) if (out / name).exists()]
    assert not list(out.rglob("*.tmp"))


def _flip_chunk_bit(path: Path, row: int, dataset: str = "image") -> None:
    """Flip one bit in the stored (compressed) bytes of one row's chunk: the data region, not HDF5's metadata."""
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(row)
    data = bytearray(path.read_bytes())
    data[info.byte_offset + info.size // 2] ^= 0x04
    path.write_bytes(bytes(data))


def _without_fletcher32(store: Path) -> None:
    """Rewrite every shard of ``store`` as stores were written before fletcher32 (Blosc only), manifest updated."""
    doc = json.loads((store / MANIFEST).read_text())
    for split in doc["splits"].values():
        for shard in split["shards"]:
            path = store / shard["file"]
            with h5py.File(path, "r") as f:
                rows = {name: f[name][:] for name in f}
            with h5py.File(path, "w") as f:
                for name, array in rows.items():
                    chunks = (1, *array.shape[1:]) if name in ("image", "label") else None
                    blosc = hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)
                    f.create_dataset(name, data=array, **({"chunks": chunks, **blosc} if chunks else {}))
            shard["sha256"] = sha256_file(path)
    (store / MANIFEST).write_text(json.dumps(doc))


def _epoch(epochs: EpochLoader, epoch: int) -> int:
    return sum(len(batch["label"]) for batch in epochs.epoch(epoch))


# --- kills ------------------------------------------------------------------------------------------------------------
def _no_manifest(out: Path) -> bool:
    return not (out / MANIFEST).exists()


PHASES = {
    # phase → (when to kill, the state the kill must have left, prepare's PNG option)
    "in phase 1 (a subject's slices saved)":
        (lambda out, base: any((out / WORK).glob("*.label.npy")), _no_manifest, "--no-png"),
    "in phase 2 (the first shard written)":
        (lambda out, base: (out / "train" / "shard-00000.h5").exists(), _no_manifest, "--no-png"),
    "in the PNG export (its first file written)":
        (lambda out, base: (out / _png(base, "train", 0, 0, "image")).exists(), _no_manifest, "--png"),
    "right before the manifest (the last PNG written)":
        (lambda out, base: (out / _last_png(base)).exists(), _no_manifest, "--png"),
    "right after the manifest (before the work folder is removed)":
        (lambda out, base: (out / MANIFEST).exists(), lambda out: (out / WORK).exists(), "--no-png"),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_prepare_killed_in_each_write_phase_resumes_to_the_uninterrupted_store(small_cohort, baseline, tmp_path,
                                                                               phase):
    out = tmp_path / "store"
    when, left, png = PHASES[phase]
    _interrupt(_cmd(small_cohort, out, png), out, lambda: when(out, baseline), lambda: left(out), phase)
    done = _run(_cmd(small_cohort, out, png, "--json"))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert doc["already_complete" if left is not _no_manifest else "resumed"] is True
    _assert_same_store(out, baseline)


# --- a second writer --------------------------------------------------------------------------------------------------
def test_second_prepare_on_a_store_being_written_exits_at_once_naming_the_holder(small_cohort, baseline, tmp_path):
    out = tmp_path / "store"
    cmd = _cmd(small_cohort, out, "--no-png")
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while holder(out) is None:  # the kernel says the first run holds the store's lock
            assert first.poll() is None and time.monotonic() < deadline, "the first prepare never took the lock"
            time.sleep(0.001)
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the lock, so it cannot finish before the second
        try:
            before = _snapshot(out)
            second = _run(cmd, timeout=120)
            after = _snapshot(out)
        finally:
            first.send_signal(signal.SIGCONT)
        line = _error_line(second)
        assert f"pid {first.pid}" in line and "being written by" in line and str(out) in line
        assert after == before  # the second touched nothing
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()
        first.wait(timeout=30)
    _assert_same_store(out, baseline)


# --- errors on resume and changed options -----------------------------------------------------------------------------
def _partial_phase1(src: Path, out: Path) -> tuple[str, str]:
    """Kill a run once the first subject is saved and before the second is; returns (finished, unfinished)."""
    first, second = (s.name for s in discover(src))
    work = out / WORK
    _interrupt(_cmd(src, out, "--no-png"), out, lambda: (work / f"{first}.label.npy").exists(),
               lambda: not (work / f"{second}.label.npy").exists(), "after the first subject, before the second")
    return first, second


def test_unreadable_file_on_resume_keeps_the_finished_subjects_and_stays_resumable(small_cohort, baseline, tmp_path):
    src, out = tmp_path / "cohort", tmp_path / "store"
    shutil.copytree(small_cohort, src)
    _, unfinished = _partial_phase1(src, out)
    kept = _snapshot(out)
    assert any(name.endswith(".label.npy") for name in kept)
    victim = src / unfinished / f"{unfinished}_t1ce.nii.gz"
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])  # a truncated gzip stream, as an interrupted copy leaves
    line = _error_line(_run(_cmd(src, out, "--no-png")))
    assert str(victim) in line and "unreadable image data" in line
    assert _snapshot(out) == kept  # finished subjects, options record: all there, byte for byte
    victim.write_bytes(original)
    done = _run(_cmd(src, out, "--no-png", "--json"))
    assert done.returncode == 0 and json.loads(done.stdout)["resumed"] is True, done.stderr[-3000:]
    _assert_same_store(out, baseline)


def test_missing_cohort_on_resume_keeps_the_finished_shards(small_cohort, tmp_path):
    """The cohort folder gone (an unmounted share) when a store with finished shards is resumed."""
    src, out = tmp_path / "cohort", tmp_path / "store"
    shutil.copytree(small_cohort, src)
    progress = out / PROGRESS
    _interrupt(_cmd(src, out, "--no-png"), out,
               lambda: progress.exists() and len(progress.read_text().splitlines()) >= 3, lambda: _no_manifest(out),
               "after three shards")
    kept = _snapshot(out)
    assert sum(name.endswith(".h5") for name in kept) >= 3
    src.rename(tmp_path / "unmounted")
    line = _error_line(_run(_cmd(src, out, "--no-png")))
    assert f"{src}: no such directory" in line
    assert _snapshot(out) == kept


def test_resume_with_a_changed_option_is_refused_naming_it(small_cohort, tmp_path):
    out = tmp_path / "store"
    _partial_phase1(small_cohort, out)
    kept = _snapshot(out)
    line = _error_line(_run(_cmd(small_cohort, out, "--no-png", "--seed", "1")))
    assert "seed: 0 then, 1 now" in line and str(out) in line
    assert _snapshot(out) == kept


def test_complete_store_asked_for_with_another_option_is_refused_naming_it(small_cohort, baseline):
    kept = _snapshot(baseline)
    line = _error_line(_run(_cmd(small_cohort, baseline, "--split", "subject")))
    assert "split: 'slice' then, 'subject' now" in line
    again = _run(_cmd(small_cohort, baseline, "--json"))
    assert again.returncode == 0 and json.loads(again.stdout)["already_complete"] is True, again.stderr[-3000:]
    assert _snapshot(baseline) == kept


# --- corruption under the training loader -----------------------------------------------------------------------------
def test_bit_flip_during_training_stops_the_loader_naming_the_shard(baseline, tmp_path):
    """fletcher32: a flip between two epochs of one loader (its worker already holds the shard open) is caught."""
    store = tmp_path / "store"
    shutil.copytree(baseline, store, ignore=shutil.ignore_patterns("png"))
    dataset = SliceDataset([Source(store)], classes=4)
    epochs = EpochLoader(dataset, EpochBatches(len(dataset), 8, seed=0), workers=1, device=torch.device("cpu"))
    assert _epoch(epochs, 0) == len(dataset)
    victim = store / Store(store).manifest.splits["train"].shards[1].file
    _flip_chunk_bit(victim, row=5)
    with pytest.raises(CorruptShardError, match=re.escape(f"{victim}: cannot read the shard")):
        _epoch(epochs, 1)


def test_bit_flip_in_a_store_without_fletcher32_stops_the_next_loader_naming_the_shard(baseline, tmp_path):
    """A store written before fletcher32: the flip is caught by the shard's checksum when a run (a new loader, as a
    resumed run has) first opens it."""
    store = tmp_path / "store"
    shutil.copytree(baseline, store, ignore=shutil.ignore_patterns("png"))
    _without_fletcher32(store)

    def loader() -> EpochLoader:
        dataset = SliceDataset([Source(store)], classes=4)
        return EpochLoader(dataset, EpochBatches(len(dataset), 8, seed=0), workers=1, device=torch.device("cpu"))

    assert _epoch(loader(), 0) == Store(store).manifest.splits["train"].n  # an intact old store reads as before
    victim = store / Store(store).manifest.splits["train"].shards[1].file
    _flip_chunk_bit(victim, row=5)
    with pytest.raises(CorruptShardError, match=re.escape(f"{victim}: checksum mismatch")):
        _epoch(loader(), 0)


# --- a full disk ------------------------------------------------------------------------------------------------------
def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _pages(n: int) -> int:
    return -(-n // 4096) * 4096


def _disk_sizes(baseline: Path) -> dict[str, int]:
    """tmpfs sizes (bytes) at which prepare runs out of space in each write phase, from the uninterrupted store."""
    manifest = Store(baseline).manifest
    subjects = sum(split.n for split in manifest.splits.values()) // 155
    image, label = (_pages(128 + 155 * 32 * 32 * width) for width in (2, 1))  # one subject's .npy files
    shards = sum(_pages((baseline / s.file).stat().st_size) for split in manifest.splits.values() for s in split.shards)
    bookkeeping = 4 * 4096  # the lock file, the options record, the progress log
    return {"subject slices (.npy)": bookkeeping + image // 2,
            "shards": bookkeeping + subjects * (image + label) + 4096,
            "PNGs": bookkeeping + subjects * (image + label) + shards + 8 * 4096}


FULL = {"subject slices (.npy)": (r"\.work/\S+\.image\.npy", "--no-png"), "shards": (r"\S*shard-\d+\.h5", "--no-png"),
        "PNGs": (r"png/\S+\.png", "--png")}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")
@pytest.mark.parametrize("phase", list(FULL))
def test_full_disk_is_one_error_naming_the_file_and_the_run_resumes(small_cohort, baseline, tmp_path, phase):
    file, png = FULL[phase]
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", f"size={_disk_sizes(baseline)[phase]}", "tmpfs", str(disk))
    try:
        out = disk / "store"
        failed = _run(_cmd(small_cohort, out, png))
        assert failed.returncode != -signal.SIGSEGV
        line = _error_line(failed)
        assert "No space left on device" in line and re.search(rf"{re.escape(str(out))}/{file}:", line), line
        assert not list(out.rglob("*.tmp")) and not (out / MANIFEST).exists()
        _mount("-o", "remount,size=64m", str(disk))
        done = _run(_cmd(small_cohort, out, png, "--json"))
        assert done.returncode == 0 and json.loads(done.stdout)["resumed"] is True, done.stderr[-3000:]
        _assert_same_store(out, baseline)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=60)


# --- bad values -------------------------------------------------------------------------------------------------------
def test_labels_beyond_the_class_count_are_refused_naming_the_shard_before_writing(tmp_path):
    root = tmp_path / "store"
    label = np.zeros((3, 16, 16), dtype=np.uint8)
    label[1, 2, 3] = 6
    with (StoreWriter(root, classes=4) as writer,
          pytest.raises(StoreError, match=r"train/shard-00000\.h5: label 6 in a store of 4 classes")):
        writer.write("train", 0, label=label, subject=["s"] * 3, slice_index=np.arange(3))
    assert [p.name for p in root.rglob("*")] == [LOCK]  # no shard, no temporary file, no progress line


def test_symlinked_subject_folders_and_a_symlink_loop_give_each_subject_once(small_cohort, baseline, tmp_path):
    first, second = sorted(small_cohort.iterdir())
    src, elsewhere = tmp_path / "cohort", tmp_path / "elsewhere"
    shutil.copytree(first, src / first.name)
    shutil.copytree(second, elsewhere / second.name)
    (src / second.name).symlink_to(elsewhere / second.name, target_is_directory=True)  # a linked subject
    (src / "more").symlink_to(elsewhere, target_is_directory=True)  # a second way to the same subject
    (src / first.name / "loop").symlink_to(src, target_is_directory=True)  # a cycle back to the cohort
    assert [s.name for s in discover(src)] == [first.name, second.name]
    out = tmp_path / "store"
    done = _run(_cmd(src, out, "--no-png"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    mine, theirs = Store(out).manifest, Store(baseline).manifest
    assert mine.provenance["subjects"] == 2
    assert {k: [s.sha256 for s in v.shards] for k, v in mine.splits.items()} == {
        k: [s.sha256 for s in v.shards] for k, v in theirs.splits.items()}
