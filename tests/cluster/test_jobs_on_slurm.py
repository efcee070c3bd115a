"""tumorsynth's own jobs on the local SLURM cluster: a sweep as one job array (status, Table 1, resume), a training
job preempted gracefully (USR2) or hard (``scontrol requeue``) that resumes bit-identically, the z-score filter over
two MPI ranks under ``srun --mpi=pmix``, and a Horovod training over two tasks, also under ``srun --mpi=pmix``.

Jobs are submitted the way users submit them (the ``tumorsynth sweep`` CLI, ``executor(...)`` with a profile). Every
wait has a deadline and stops early when the job ends without reaching what it waits for; its failure message holds
the tails of the jobs' submitit logs.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.base import ATTEMPTS, store_log_dir
from jobs.filter import FilterJob
from jobs.train import TrainJob
from toolkit.cluster import slurmctl
from toolkit.cluster.executors import executor, load_profile
from toolkit.cluster.sweep import Sweep
from toolkit.mpi import clean_environment

CLI = [sys.executable, "-m", "toolkit.cli"]
REAL_N, BATCH, EPOCHS = 320, 8, 4  # 40 steps per epoch, 160 steps: ~10 s on one CPU thread
STEPS_PER_EPOCH, TOTAL_STEPS = REAL_N // BATCH, EPOCHS * REAL_N // BATCH
SIGNAL_AT = 50  # preempt once metrics.jsonl shows this step: 10 steps into the second epoch
PERIODIC = 7  # the hard-requeue run's checkpoint cadence (steps), prime to the epoch length: mid-epoch checkpoints
CHECKPOINT = re.compile(r"ckpt-(\d{9})\.pt")


# --- helpers ----------------------------------------------------------------------------------------------------------
def _client_env() -> dict[str, str]:
    """This environment without MPI variables and without the variables of any SLURM job it runs in."""
    return {k: v for k, v in clean_environment().items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def _strip_job_env(monkeypatch) -> None:
    """submitit calls sbatch with os.environ, which the job inherits: no MPI singleton or outer SLURM job variables."""
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_")) and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)


def _logs(folder: Path, tail: int = 3000) -> str:
    """The tail of every submitit log (*.out, *.err) in ``folder`` and of any ERROR file beside it."""
    folder = Path(folder)
    parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
             for p in sorted([*folder.glob("*.err"), *folder.glob("*.out")]) if p.is_file()]
    parts += [f"--- {p}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(folder.parent.rglob("ERROR"))]
    return "\n".join(parts) or f"(no submitit logs in {folder})"


def _wait(condition, timeout: float, what: str, logs: Path, job_id: str | None = None, poll: float = 0.2) -> None:
    """Poll ``condition`` until it holds; fail with the logs at the deadline, or at once when ``job_id`` has ended
    (a state in slurmctl.FINISHED) without it."""
    deadline = time.monotonic() + timeout
    while not condition():
        state = slurmctl.job_states([job_id]).get(job_id) if job_id else None
        if state in slurmctl.FINISHED and not condition():
            pytest.fail(f"{what}: job {job_id} ended ({state}) before that\n{_logs(logs)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s (job {job_id}: {state})\n{_logs(logs)}")
        time.sleep(poll)


def _finished(job_id: str, logs: Path, timeout: float = 60) -> dict[str, str]:
    """The job's scontrol record once it has ended (it stays known to the controller for MinJobAge = 300 s)."""
    try:
        return slurmctl.wait_for(job_id, slurmctl.FINISHED, timeout=timeout)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{_logs(logs)}")


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=_client_env())
    assert proc.returncode == 0, f"tumorsynth {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr}"
    return proc


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _logged_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl (0 before any); a line torn by a concurrent append is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    steps = [0]
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return steps[-1]


def _checkpoints(run_dir: Path) -> dict[int, Path]:
    """step → checkpoint file, of the files present now."""
    folder = Path(run_dir) / "checkpoints"
    found = {}
    for path in folder.glob("ckpt-*.pt") if folder.exists() else []:
        if match := CHECKPOINT.fullmatch(path.name):
            found[int(match[1])] = path
    return found


def _unet_config(path: Path, store: Path, **loop) -> Path:
    """A tiny U-Net run (as tests/train/test_unet_training.py); checkpoints are never pruned (keep 100)."""
    config = {"data": {"real": str(store), "real_n": REAL_N, "classes": 7},
              "model": {"widths": [4, 8, 16, 32], "bridge": 32},
              "optim": {"lr": 1e-3, "batch": BATCH},
              "loop": {"epochs": EPOCHS, "checkpoint_every_steps": 1000, "checkpoint_every_minutes": 0.0,
                       "keep_checkpoints": 100, "log_every_steps": 2, **loop},
              "runtime": {"threads": 1},
              "seed": 3}
    path.write_text(yaml.safe_dump(config))
    return path


def _assert_identical(a: dict, b: dict) -> None:
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, sa in a["optimizer"]["state"].items():
        sb = b["optimizer"]["state"][index]
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.as_tensor(sa[name]), torch.as_tensor(sb[name])), (index, name)


def _assert_resumed_from_disk(run_dir: Path, starts: list[dict], logs: Path) -> int:
    """The second start resumed, rather than started over: every checkpoint up to some mid-run step r predates it and
    every later one follows it (a fresh start would have rewritten them all). Returns r."""
    second = starts[1]["time"]
    when = {step: path.stat().st_mtime for step, path in _checkpoints(run_dir).items()}
    before = sorted(s for s, t in when.items() if t < second)
    after = sorted(s for s, t in when.items() if t >= second)
    assert before and after and before[-1] < after[0], (before, after, _logs(logs))
    assert STEPS_PER_EPOCH < before[-1] < TOTAL_STEPS and after[-1] == TOTAL_STEPS, (before, after)
    return before[-1]


class Background:
    """A command run in the background (the uninterrupted reference run), awaited with a deadline."""

    def __init__(self, cmd: list[str], log: Path) -> None:
        self.log = log
        with open(log, "w") as handle:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=handle, env=clean_environment())

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.proc.args} did not finish within {timeout:g} s:\n{self.log.read_text()[-3000:]}")
        assert self.proc.returncode == 0, f"{self.proc.args} failed:\n{self.log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def reference(store_64, tmp_path_factory):
    """The uninterrupted run every preempted run must reproduce bit for bit, trained with `tumorsynth train unet` in
    the background (on the second CPU) while the first test using it runs its SLURM job; ``finish()`` awaits it."""
    root = tmp_path_factory.mktemp("reference")
    config = _unet_config(root / "unet.yaml", store_64)
    run = Background([*CLI, "train", "unet", "-c", str(config), "--run-dir", str(root / "run")], root / "train.log")

    class Reference:
        def __init__(self) -> None:
            self.config, self.run_dir = config, root / "run"

        def finish(self) -> Path:
            run.wait(timeout=300)
            return self.run_dir

    yield Reference()
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


@pytest.fixture
def cancel_at_end():
    """``cancel_at_end(job_id)``: cancel that job (or array) when the test ends, so that no failed test leaves a job
    holding the node's two CPUs."""
    ids: list[str] = []
    yield ids.append
    for job_id in ids:
        with contextlib.suppress(RuntimeError):  # long finished
            slurmctl.cancel(job_id)


# --- 1. a sweep as one job array --------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_sweep_array_status_report_and_resume_on_slurm(slurm_cluster, store_64, tmp_path, cancel_at_end):
    missing = tmp_path / "no-such-store"
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "data": {"real": str(store_64), "real_n": 64, "classes": 7},
        "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"lr": 1e-3, "batch": 8},
        "loop": {"epochs": 1, "checkpoint_every_steps": 4, "checkpoint_every_minutes": 0.0, "log_every_steps": 2},
        "runtime": {"threads": 1}, "seed": 0}))
    spec = tmp_path / "sweep.yaml"  # the schema of every member is valid: the missing store fails at run time
    spec.write_text(yaml.safe_dump({
        "name": "tiny", "model": "unet", "base": "base.yaml", "evaluate": "test",
        "grid": {"classes": {"data.classes": [7, 2]},
                 "mix": {"64": {"data.real_n": 64}, "32": {"data.real_n": 32}, "missing": {"data.real": str(missing)}}},
        "report": {"columns": "classes", "rows": "mix"}}, sort_keys=False))
    root, logs = tmp_path / "sweep", tmp_path / "sweep" / "logs"

    out = _run_cli("sweep", "submit", str(spec), "--cluster", "slurm", "--profile", "local", "--out", str(root)).stdout
    doc = json.loads((root / "sweep.json").read_text())
    names = [m["name"] for m in doc["members"]]
    ids = [m["jobs"] for m in doc["members"]]
    assert len(names) == 6 and all(len(j) == 1 for j in ids), doc["members"]
    array = ids[0][0].split("_")[0]
    cancel_at_end(array)
    assert [j[0] for j in ids] == [f"{array}_{i}" for i in range(6)]  # one array, one task per member
    assert f"6 members submitted ({array})" in out
    assert (slurmctl.job_info(f"{array}_0") or {}).get("ArrayJobId") == array

    def settled() -> bool:  # Sweep.status is what `sweep status` prints; in-process, a poll costs no torch import
        return all(r["state"] in ("done", "failed") for r in Sweep(root).status())

    _wait(settled, 240, "every member done or failed", logs, poll=0.5)
    rows = {r["name"]: r for r in json.loads(_run_cli("sweep", "status", str(root), "--json").stdout)["members"]}
    assert len(rows) == 6, rows
    failing = [n for n in names if "missing" in n]
    assert len(failing) == 2
    for name, row in rows.items():
        assert row["job_id"] == ids[names.index(name)][0]
        if name in failing:
            assert row["state"] == "failed", row
            assert str(missing) in (row["error"] or ""), row
        else:
            assert row["state"] == "done" and row["epoch"] >= 1 and row["restarts"] == 0, row
            assert isinstance(row["best_val"], float), row

    _run_cli("sweep", "report", str(root), "--json")
    table = {}
    for line in (root / "table1.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ("64", "32", "missing"):
            table[cells[0]] = cells[1:]
    assert set(table) == {"64", "32", "missing"}, (root / "table1.md").read_text()
    for mix in ("64", "32"):
        assert all(re.fullmatch(r"(\*\*)?\d+\.\d\d(\*\*)?", c) for c in table[mix]), table
    assert table["missing"] == ["–", "–"], table
    assert (root / "table1.csv").stat().st_size > 0 and (root / "table1.png").stat().st_size > 0

    assert "resubmitted 2 members" in _run_cli("sweep", "resume", str(root)).stdout
    after = {m["name"]: m["jobs"] for m in json.loads((root / "sweep.json").read_text())["members"]}
    for name, jobs in after.items():
        assert jobs[0] == ids[names.index(name)][0]
        assert len(jobs) == (2 if name in failing else 1), after
    again = [after[n][1] for n in failing]
    second = again[0].split("_")[0]
    cancel_at_end(second)
    assert second != array and all(j.startswith(f"{second}_") for j in again), again  # a new array of their own
    slurmctl.cancel(second)  # they would only fail again: free the node for the next tests
    for job_id in again:
        _finished(job_id, logs)


# --- 2. graceful preemption -------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_graceful_preemption_requeues_and_matches_an_uninterrupted_run(slurm_cluster, reference, tmp_path,
                                                                        monkeypatch, cancel_at_end, latest_task_state):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    _strip_job_env(monkeypatch)
    job = executor("slurm", load_profile("local"), logs).submit(TrainJob("unet", reference.config, run_dir))
    cancel_at_end(job.job_id)

    _wait(lambda: _logged_step(run_dir) >= SIGNAL_AT, 120, f"step {SIGNAL_AT} logged", logs, job.job_id, poll=0.1)
    slurmctl.signal(job.job_id, "USR2")  # what SLURM's time-limit warning sends (scancel --signal=USR2)
    # The loop saves at the next step; the checkpoint survives (keep 100) and is the only one not at an epoch's end.
    _wait(lambda: any(s % STEPS_PER_EPOCH for s in _checkpoints(run_dir)), 60, "the preemption checkpoint", logs,
          job.job_id, poll=0.1)
    (at_signal,) = [s for s in _checkpoints(run_dir) if s % STEPS_PER_EPOCH]
    assert SIGNAL_AT < at_signal < 2 * STEPS_PER_EPOCH, at_signal
    _wait(lambda: (run_dir / "DONE").exists(), 180, "DONE after the requeue", logs, job.job_id)
    info = _finished(job.job_id, logs)

    assert info["JobState"] == "COMPLETED", (info, _logs(logs))
    assert int(info["Restarts"]) >= 1, info
    starts = _lines(run_dir / ATTEMPTS)
    assert len(starts) == 2 and {a["job_id"] for a in starts} == {job.job_id}, starts
    assert _assert_resumed_from_disk(run_dir, starts, logs) == at_signal
    assert not (run_dir / "ERROR").exists()
    text = _logs(logs)
    assert "Requeued job" in text and "checkpoint requested" in text, text
    assert "Traceback" not in text, text
    reference_dir = reference.finish()
    _assert_identical(latest_task_state(run_dir), latest_task_state(reference_dir))
    assert json.loads((run_dir / "DONE").read_text()) == json.loads((reference_dir / "DONE").read_text())
    steps = [m["step"] for m in _lines(run_dir / "metrics.jsonl")]
    assert steps == [m["step"] for m in _lines(reference_dir / "metrics.jsonl")]  # replayed steps logged once


# --- 3. hard requeue --------------------------------------------------------------------------------------------------
@pytest.mark.slurm
def test_hard_requeue_resumes_from_the_last_periodic_checkpoint(slurm_cluster, reference, tmp_path, monkeypatch,
                                                                cancel_at_end, latest_task_state):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    _strip_job_env(monkeypatch)
    job = executor("slurm", load_profile("local"), logs).submit(
        TrainJob("unet", reference.config, run_dir, overrides=(f"loop.checkpoint_every_steps={PERIODIC}",)))
    cancel_at_end(job.job_id)

    def mid_run_periodic() -> bool:
        return any(s > STEPS_PER_EPOCH and s % PERIODIC == 0 for s in _checkpoints(run_dir))

    _wait(mid_run_periodic, 120, "a periodic checkpoint in the second epoch", logs, job.job_id, poll=0.1)
    slurmctl.requeue(job.job_id)  # SIGTERM, then SIGKILL after KillWait: the loop may or may not save first
    _wait(lambda: (run_dir / "DONE").exists(), 180, "DONE after the requeue", logs, job.job_id)
    info = _finished(job.job_id, logs)

    assert info["JobState"] == "COMPLETED", (info, _logs(logs))
    assert int(info["Restarts"]) >= 1, info
    starts = _lines(run_dir / ATTEMPTS)
    assert len(starts) == 2 and {a["job_id"] for a in starts} == {job.job_id}, (starts, _logs(logs))
    resumed_from = _assert_resumed_from_disk(run_dir, starts, logs)
    assert resumed_from > STEPS_PER_EPOCH  # at least the periodic checkpoint that was waited for
    checkpoints = _checkpoints(run_dir)
    for step, path in checkpoints.items():  # none torn: every file present loads
        assert torch.load(path, weights_only=True)["progress"]["step"] == step, path
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == checkpoints[TOTAL_STEPS].name
    assert not (run_dir / "ERROR").exists(), (run_dir / "ERROR").read_text()
    _assert_identical(latest_task_state(run_dir), latest_task_state(reference.finish()))


@pytest.mark.slurm
def test_scancel_ends_a_training_job_for_good(slurm_cluster, reference, tmp_path, monkeypatch, cancel_at_end):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    _strip_job_env(monkeypatch)
    job = executor("slurm", load_profile("local"), logs).submit(TrainJob("unet", reference.config, run_dir))
    cancel_at_end(job.job_id)
    _wait(lambda: _logged_step(run_dir) >= 10, 120, "step 10 logged", logs, job.job_id, poll=0.1)
    slurmctl.cancel(job.job_id)  # SIGTERM to every process of the job, SIGKILL after KillWait

    def ended_or_restarted(info: dict[str, str]) -> bool:
        return info.get("JobState") in slurmctl.FINISHED or int(info.get("Restarts", "0")) > 0

    info = slurmctl.wait_for(job.job_id, ended_or_restarted, timeout=60)
    assert info["Restarts"] == "0", f"the cancelled job requeued itself: {info}\n{_logs(logs)}"
    assert info["JobState"] == "CANCELLED", (info, _logs(logs))
    assert len(_lines(run_dir / ATTEMPTS)) == 1


# --- 4. the filter over two MPI ranks ---------------------------------------------------------------------------------
def _mask_store(root: Path, splits: dict[str, np.ndarray], kind: str, shard: int = 40) -> Path:
    """A label-only store from {split: masks}, in shards of ``shard`` rows."""
    from toolkit.data.store import StoreWriter

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


@pytest.mark.slurm
def test_filter_job_runs_two_mpi_ranks_under_srun_pmix(slurm_cluster, tmp_path, monkeypatch, cancel_at_end):
    from mpi4py import MPI

    from toolkit.bench.zscore import phantom_masks
    from toolkit.data.store import Store
    from toolkit.filter.zscore import filter_store, norms, real_moments

    rng = np.random.default_rng(0)
    real = _mask_store(tmp_path / "real", {s: phantom_masks(rng, n, 32) for s, n in
                                           (("train", 240), ("val", 40), ("test", 20))}, "real")
    synthetic = _mask_store(tmp_path / "synthetic", {"train": phantom_masks(rng, 200, 32),
                                                     "val": phantom_masks(rng, 80, 32)}, "synthetic")
    scores = norms(Store(synthetic).read("train")["label"], real_moments(real, reduced=False, comm=MPI.COMM_SELF))
    threshold = float(np.median(scores))  # drops about half
    out, logs = tmp_path / "filtered", tmp_path / "logs"

    _strip_job_env(monkeypatch)  # this process has just initialised MPI (a singleton)
    job = executor("slurm", load_profile("local"), logs, tasks=2, mpi=True).submit(
        FilterJob(real, synthetic, out, threshold=threshold))
    cancel_at_end(job.job_id)
    expected = filter_store(real, synthetic, tmp_path / "one-rank", threshold=threshold, comm=MPI.COMM_SELF)
    assert 0 < expected["kept"] < expected["kept"] + expected["dropped"], expected

    _wait(lambda: (out / "manifest.json").exists(), 120, "the filtered store's manifest", logs, job.job_id)
    _wait(lambda: all(job.task(k).paths.result_pickle.exists() for k in range(2)), 60, "both ranks' results", logs,
          job.job_id)
    info = _finished(job.job_id, logs)
    assert info["JobState"] == "COMPLETED", (info, _logs(logs))
    summary, other = job.results()  # reads the result pickles only (no sacct); rank 0 writes, rank 1 returns {}
    assert summary["ranks"] == 2 and other == {}, (summary, other)
    assert {k: summary[k] for k in ("kept", "dropped", "threshold")} == \
        {k: expected[k] for k in ("kept", "dropped", "threshold")}
    starts = _lines(store_log_dir(out) / ATTEMPTS)
    assert sorted(a["rank"] for a in starts) == ["0", "1"] and {a["job_id"] for a in starts} == {job.job_id}, starts

    def shards(store: Path) -> dict[str, list[str]]:
        return {split: [sh.sha256 for sh in info.shards] for split, info in Store(store).manifest.splits.items()}

    assert shards(out) == shards(tmp_path / "one-rank")
    assert (out / "zscore.csv").read_bytes() == (tmp_path / "one-rank" / "zscore.csv").read_bytes()


# --- 6. Horovod training under srun --mpi=pmix ------------------------------------------------------------------------
@pytest.mark.slurm
@pytest.mark.horovod
def test_horovod_training_job_runs_two_ranks_under_srun_pmix(horovod, slurm_cluster, store_64, tmp_path, monkeypatch,
                                                            cancel_at_end, latest_task_state):
    """A profile with ``dist: horovod`` and two tasks: the training job's ranks find each other through PMIx, and the
    weights equal a 2-rank Horovod run under mpirun bit for bit (two independent 1-rank runs would not)."""
    from toolkit.mpi import mpirun_prefix

    config = _unet_config(tmp_path / "unet.yaml", store_64, epochs=1)
    profile = replace(load_profile("local"), tasks_per_node=2, dist="horovod")
    backend = profile.training_backend("slurm")
    assert backend == "horovod" and replace(profile, tasks_per_node=1).training_backend("slurm") == "none"
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    _strip_job_env(monkeypatch)
    job = executor("slurm", profile, logs, mpi=True).submit(TrainJob("unet", config, run_dir, backend=backend))
    cancel_at_end(job.job_id)
    mpirun = subprocess.run([*mpirun_prefix(2), *CLI, "train", "unet", "-c", str(config), "--run-dir",
                             str(tmp_path / "mpirun"), "--dist", "horovod"], env=_client_env(), capture_output=True,
                            text=True, timeout=600)
    assert mpirun.returncode == 0, mpirun.stderr[-3000:]

    _wait(lambda: (run_dir / "DONE").exists(), 300, "DONE", logs, job.job_id)
    info = _finished(job.job_id, logs)
    assert info["JobState"] == "COMPLETED", (info, _logs(logs))
    assert sorted(a["rank"] for a in _lines(run_dir / ATTEMPTS)) == ["0", "1"]
    _assert_identical(latest_task_state(run_dir), latest_task_state(tmp_path / "mpirun"))
