"""Faults of training, with real processes, real files and real signals: a second launcher on a running run, a main
rank that cannot claim its run directory under DDP, a torn newest checkpoint with a pointer that leads out of the run,
a diverging loss (one process, two DDP ranks, and in the loop with a real task: the good checkpoints and best.pt stay
byte for byte), and a resume against a store modified since the run started.

The runs are tiny: the phantom store at 64², a 4-level U-Net 4…32 channels wide, a 16² PGAN.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from toolkit.lock import WriterLock, holder
from toolkit.mpi import clean_environment
from toolkit.train.distributed import Dist
from toolkit.train.errors import DivergedError
from toolkit.train.loop import LoopConfig, run

CLI = [sys.executable, "-m", "toolkit.cli"]
PREEMPTED = 75
ERROR = 2  # the CLI's exit status for an error it prints as one line


# --- helpers ----------------------------------------------------------------------------------------------------------
def unet_config(path, store, **loop):
    """40 steps: 2 epochs of 20 batches of 8, a checkpoint every 7 steps and at each epoch's end, the last 3 kept."""
    config = {
        "data": {"real": str(store), "real_n": 160, "classes": 7},
        "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"lr": 1e-3, "batch": 8},
        "loop": {"epochs": 2, "checkpoint_every_steps": 7, "checkpoint_every_minutes": 0.0, "log_every_steps": 5,
                 **loop},
        "runtime": {"threads": 1},
        "seed": 3,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def pgan_config(path, store):
    """A 16² PGAN, 3 ticks of 16 steps; lr 1e30 makes its losses non-finite at the first step."""
    config = {
        "data": {"store": str(store)},
        "model": {"resolution": 16, "latent": 16, "fmap_base": 64, "fmap_max": 16},
        "schedule": {"total_kimg": 3, "lod_training_kimg": 1, "lod_transition_kimg": 1,
                     "minibatch": {4: 16, 8: 16, 16: 16}, "tick_kimg": {4: 1, 8: 1, 16: 1}},
        "optim": {"lr": 1e30},
        "loop": {"checkpoint_every_steps": 5, "checkpoint_every_minutes": 0.0, "log_every_steps": 10,
                 "agree_every_steps": 3},
        "runtime": {"threads": 1},
        "samples": 4,
        "seed": 5,
    }
    path.write_text(yaml.safe_dump(config))
    return path


def train_cmd(model, config, run_dir, *extra):
    return [*CLI, "train", model, "-c", str(config), "--run-dir", str(run_dir), *extra]


def files(folder):
    """Every file under ``folder`` (relative path → bytes): what a test compares before and after a fault."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("tumorsynth: error:")]


def wait_for(condition, proc, timeout, what):
    """Poll ``condition`` until it holds; fail if ``proc`` ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def task_state(path):
    return torch.load(path, weights_only=True)["task"]


def assert_same_training_state(a, b):
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.fixture(scope="module")
def finished_unet(store_64, tmp_path_factory):
    """An uninterrupted U-Net run: the reference a resumed run must reproduce."""
    root = tmp_path_factory.mktemp("finished")
    config = unet_config(root / "unet.yaml", store_64)
    done = subprocess.run(train_cmd("unet", config, root / "run"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return config, root / "run"


# --- one writer per run directory -------------------------------------------------------------------------------------
def test_second_launcher_on_a_running_run_exits_at_once_naming_the_holder_and_touches_nothing(store_64, tmp_path):
    config = unet_config(tmp_path / "unet.yaml", store_64, epochs=3)
    run_dir = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(train_cmd("unet", config, run_dir), stdout=log, stderr=log, env=clean_environment())
    try:
        wait_for(lambda: (holder(run_dir) or {}).get("pid") == first.pid
                 and any((run_dir / "checkpoints").glob("ckpt-*.pt")), first, 300, "a held lock and a checkpoint")
        first.send_signal(signal.SIGSTOP)  # holds still (and holds the lock): any change now is the second's
        # a temporary file as the first writer's atomic writes leave them while in flight: not the second's to remove
        (run_dir / "checkpoints" / ".ckpt-000000999.pt.inflight.tmp").write_bytes(b"being written")
        before = files(run_dir)
        second = subprocess.run(train_cmd("unet", config, run_dir), capture_output=True, text=True, timeout=300,
                                env=clean_environment())
        after = files(run_dir)
        first.send_signal(signal.SIGCONT)
        assert second.returncode == ERROR, second.stderr
        assert error_lines(second.stderr) == [second.stderr.strip().splitlines()[-1]]
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        assert after == before  # metrics.jsonl, checkpoints, latest, the temp file, config.yaml, inputs.json
        # at once: the refusal comes before any data is read or any model built (the run itself takes far longer)
        assert "training on" not in second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
            first.wait()
    newest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    assert task_state(newest)["model"]  # the first run's own save on SIGTERM is complete and loads


def test_rank0_that_cannot_claim_the_run_directory_stops_every_ddp_rank_promptly(store_64, tmp_path, launch_ranks):
    config = unet_config(tmp_path / "unet.yaml", store_64)
    run_dir = tmp_path / "run"
    with WriterLock(run_dir, "run directory"):  # held by this test process, as by another live trainer
        (rank0, err0), (rank1, err1) = launch_ranks(train_cmd("unet", config, run_dir, "--dist", "ddp"), timeout=180)
    # a rank left waiting for rank 0 would have been killed at the timeout (-9) instead of exiting with an error
    assert (rank0, rank1) == (ERROR, ERROR), (err0, err1)
    assert f"pid {os.getpid()}" in error_lines(err0)[0]
    assert "rank 0 could not claim the run directory" in error_lines(err1)[0] and "Traceback" not in err1
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # no config.yaml, inputs.json or anything else


# --- torn checkpoints -------------------------------------------------------------------------------------------------
def test_a_torn_newest_checkpoint_and_a_pointer_out_of_the_run_resume_from_the_older_one(finished_unet, tmp_path):
    config, reference = finished_unet
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / "DONE").unlink()  # as a run killed after its last save
    folder = run_dir / "checkpoints"
    names = sorted(p.name for p in folder.glob("ckpt-*.pt"))
    assert names == ["ckpt-000000028.pt", "ckpt-000000035.pt", "ckpt-000000040.pt"]
    newest = folder / names[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn: half the file
    # a loadable checkpoint outside the checkpoint folder, where the pointer now leads: it must never be read
    shutil.copy(folder / names[0], run_dir / "evil.pt")
    (folder / "latest").write_text("../evil.pt\n")
    resumed = subprocess.run(train_cmd("unet", config, run_dir), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "'../evil.pt', not a ckpt-<step>.pt file" in resumed.stderr
    assert re.search(r"ckpt-000000040\.pt: cannot load \(RuntimeError: .+\); trying an older", resumed.stderr)
    assert "resumed from ckpt-000000035.pt" in resumed.stderr
    assert (folder / "ckpt-000000040.pt.unloadable").exists()  # kept for inspection, out of pruning's way
    # the continued run reaches the uninterrupted run's final state bit for bit, and logs each step once
    assert_same_training_state(task_state(folder / "ckpt-000000040.pt"),
                               task_state(reference / "checkpoints" / "ckpt-000000040.pt"))
    assert (folder / "latest").read_text().strip() == "ckpt-000000040.pt"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]


# --- a diverging loss -------------------------------------------------------------------------------------------------
def test_a_diverging_loss_stops_the_run_before_any_save_with_one_line_naming_the_metric(store_64, tmp_path):
    config = pgan_config(tmp_path / "pgan.yaml", store_64)
    run_dir = tmp_path / "run"
    done = subprocess.run(train_cmd("pgan", config, run_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == ERROR, done.stderr
    (line,) = error_lines(done.stderr)
    assert "Traceback" not in done.stderr
    found = re.search(r"training diverged: (loss_\w+) was not finite at step (\d+) \(found at step (\d+)\)", line)
    assert found, line
    first, noticed = int(found[2]), int(found[3])
    assert first <= noticed <= first + 4  # noticed at the next save (every 5 steps) or vote (every 3), not later
    saved = sorted(int(p.name[5:14]) for p in (run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert all(step < first for step in saved), saved  # nothing saved from the diverged state on
    assert not (run_dir / "DONE").exists() and not list(run_dir.glob("snapshots/tick-*.pt"))


def test_a_diverging_loss_stops_both_ddp_ranks_promptly(store_64, tmp_path, launch_ranks):
    config = pgan_config(tmp_path / "pgan.yaml", store_64)
    (rank0, err0), (rank1, err1) = launch_ranks(train_cmd("pgan", config, tmp_path / "run", "--dist", "ddp"),
                                                timeout=300)
    assert (rank0, rank1) == (ERROR, ERROR), (err0, err1)  # killed at the timeout (-9) had a rank waited
    for err in (err0, err1):
        assert "training diverged" in error_lines(err)[0]
    assert not list((tmp_path / "run").glob("checkpoints/ckpt-*.pt"))


class Regression:
    """A real task, as small as one: least squares fitted with SGD, 4 batches per epoch, validated each epoch (so
    ``best.pt`` is written), whose inputs hold an infinity at ``poison_step``: the loss of that step is not finite and
    every weight is NaN after it. At that step it records the run directory's checkpoints and best.pt as they are."""

    def __init__(self, run_dir, poison_step, epochs=3, every=3):
        torch.manual_seed(0)
        self.run_dir, self.poison_step, self.epochs, self.every = Path(run_dir), poison_step, epochs, every
        self.model = nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.x, self.val_x = torch.randn(4, 8, 3), torch.randn(16, 3)
        w = torch.tensor([[1.0], [-2.0], [0.5]])
        self.y, self.val_y = self.x @ w, self.val_x @ w
        self.step, self.evaluated, self.at_poison = 0, [], None

    def loop_config(self):
        return LoopConfig(epochs=self.epochs, checkpoint_every_steps=self.every, checkpoint_every_minutes=0.0,
                          log_every_steps=1000)

    def batches_per_epoch(self, epoch):
        return 4

    def batches(self, epoch, start):
        return iter(range(start, 4))

    def train_step(self, batch):
        self.step += 1
        x = self.x[batch]
        if self.step == self.poison_step:
            self.at_poison = {k: v for k, v in files(self.run_dir).items()
                              if k.startswith("checkpoints/") or k == "best.pt"}
            x = x * float("inf")
        loss = (self.model(x) - self.y[batch]).square().mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    def evaluate(self, epoch):
        self.evaluated.append(epoch)
        with torch.no_grad():
            return {"val_loss": float((self.model(self.val_x) - self.val_y).square().mean())}

    def state_dict(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def save_best(self, path):
        torch.save(self.model.state_dict(), path)


@pytest.mark.parametrize(("poison", "every", "noticed", "evaluated"), [
    (5, 3, 6, [0]),  # mid-epoch: noticed at the save due at step 6, which is not written
    (8, 0, 8, [0]),  # an epoch's last step: noticed before its evaluation, best.pt and end-of-epoch save
], ids=["mid-epoch", "epoch-end"])
def test_divergence_leaves_the_good_checkpoints_and_best_pt_byte_identical(tmp_path, poison, every, noticed,
                                                                              evaluated):
    task = Regression(tmp_path, poison_step=poison, every=every)
    with pytest.raises(DivergedError, match=rf"loss was not finite at step {poison} \(found at step {noticed}\)"):
        run(task, task.loop_config(), tmp_path, Dist(), config={})
    assert "best.pt" in task.at_poison and any("ckpt-" in k for k in task.at_poison)
    after = {k: v for k, v in files(tmp_path).items() if k.startswith("checkpoints/") or k == "best.pt"}
    assert after == task.at_poison  # no save, no pruning, no pointer flip, best.pt untouched
    assert task.evaluated == evaluated and not (tmp_path / "DONE").exists()


# --- inputs changed under a run ---------------------------------------------------------------------------------------
def reshuffle(store):
    """Modify ``store`` consistently, as a rebuild with another shuffle would: swap its first two training shards and
    their manifest entries. Every checksum still holds; only the store's fingerprint tells."""
    manifest = json.loads((store / "manifest.json").read_text())
    first, second = manifest["splits"]["train"]["shards"][:2]
    assert first["n"] == second["n"]
    a, b, tmp = store / first["file"], store / second["file"], store / "swap.tmp"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    for key in set(first) - {"file"}:
        first[key], second[key] = second[key], first[key]
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_a_resume_against_a_modified_store_is_refused_naming_it_and_the_run_stays_as_it_was(store_64, tmp_path,
                                                                                             interrupt):
    store = tmp_path / "real64"
    shutil.copytree(store_64, store)
    config = unet_config(tmp_path / "unet.yaml", store)
    run_dir = tmp_path / "run"
    assert interrupt(train_cmd("unet", config, run_dir), run_dir, signal.SIGUSR2).returncode == PREEMPTED
    recorded = json.loads((run_dir / "inputs.json").read_text())
    assert recorded["data.real"]["store"] == str(store)
    reshuffle(store)
    before = files(run_dir)
    resumed = subprocess.run(train_cmd("unet", config, run_dir), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == ERROR, resumed.stderr
    (line,) = error_lines(resumed.stderr)
    assert "data.real" in line and str(store) in line and "rebuilt or modified" in line
    after = files(run_dir)
    assert after.pop(".lock") != before.pop(".lock")  # the refused run did hold the lock (its record is its own)
    assert after == before
