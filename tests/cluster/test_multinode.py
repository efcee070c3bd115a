"""Past one node, on the 2-node local cluster (``start.sh --nodes 2``: slurmds in network namespaces ts-n1, ts-n2):
srun spans both hostnames; U-Net DDP (gloo over the bridge) and Horovod (``srun --mpi=pmix``) on 2 nodes × 1 task
equal DDP on 1 node × 2 tasks bit for bit; ``evaluate swd`` over ranks on both nodes equals one rank; a 2-node training
preempted with USR2, or losing a node mid-run, resumes to that same result; steps sharing nodes get distinct
MASTER_PORTs.

Every wait is bounded (``slurmctl.wait_for``); jobs are cancelled at the end of a test that fails.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from jobs.base import ATTEMPTS
from jobs.train import TrainJob
from toolkit.cluster import slurmctl
from toolkit.cluster.executors import Profile, executor, load_profile
from toolkit.mpi import clean_environment
from toolkit.train.distributed import slurm_master_port

pytestmark = pytest.mark.slurm
SCRIPTS = Path(__file__).resolve().parents[2] / "slurm" / "local"
CLI = [sys.executable, "-m", "toolkit.cli"]
PERIODIC = 6  # the node-loss run's checkpoint cadence (steps)
COLLECTIVE_TIMEOUT_S = 15


def _profile(nodes: int, tasks: int, dist: str = "ddp") -> Profile:
    return replace(load_profile("local"), nodes=nodes, tasks_per_node=tasks, dist=dist)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _checkpoints(run_dir: Path) -> dict[int, float]:
    """step → modification time of each checkpoint file present now."""
    folder = Path(run_dir) / "checkpoints"
    return {int(p.stem.removeprefix("ckpt-")): p.stat().st_mtime for p in folder.glob("ckpt-*.pt")}


def _logs(run_dir: Path) -> str:
    parts = [f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(Path(run_dir).glob("logs/*.*"))
             if p.suffix in (".out", ".err")]
    return "\n".join(parts) or "(no logs)"


def _done(job_id: str, run_dir: Path, timeout: float = 240) -> dict[str, str]:
    """Wait (bounded) until the job has ended; assert it COMPLETED, showing its logs if not."""
    try:
        info = slurmctl.wait_for(job_id, slurmctl.FINISHED, timeout=timeout)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{_logs(run_dir)}")
    assert info["JobState"] == "COMPLETED", (info, _logs(run_dir))
    return info


def _until(job_id: str, run_dir: Path, condition, what: str, timeout: float = 120) -> None:
    """Wait (bounded) until ``condition()`` holds while the job runs; fail if the job ends first."""
    def reached(info: dict[str, str]) -> bool:
        return condition() or info.get("JobState") in slurmctl.FINISHED

    try:
        slurmctl.wait_for(job_id, reached, timeout=timeout, poll=0.2)
    except TimeoutError as e:
        pytest.fail(f"{what}: {e}\n{_logs(run_dir)}")
    assert condition(), f"{what}: job {job_id} ended first\n{_logs(run_dir)}"


def _submit(tmp_path: Path, name: str, config: Path, profile: Profile, jobs: list[str], **kw) -> tuple[str, Path]:
    run_dir = tmp_path / name
    mpi = profile.dist == "horovod"
    job = executor("slurm", profile, run_dir / "logs", mpi=mpi).submit(
        TrainJob("unet", config, run_dir, backend=profile.training_backend("slurm"), **kw))
    jobs.append(job.job_id)
    return job.job_id, run_dir


def _hosts(run_dir: Path, ranks: int = 2) -> list[set[str]]:
    """The hostnames of each start of a ``ranks``-rank run (attempts.jsonl: one line per rank and start)."""
    lines = sorted(_lines(run_dir / ATTEMPTS), key=lambda a: a["time"])
    return [{a["host"] for a in lines[i:i + ranks]} for i in range(0, len(lines), ranks)]


@pytest.fixture
def jobs():
    """Job ids to cancel when the test ends, so that a failed test leaves no job holding the nodes."""
    ids: list[str] = []
    yield ids
    for job_id in ids:
        with contextlib.suppress(RuntimeError):
            slurmctl.cancel(job_id)


@pytest.fixture(scope="module")
def unet_config(store_64, tmp_path_factory) -> Path:
    """A tiny U-Net run of 2 epochs (96 steps at 2 ranks), checkpoints never pruned."""
    path = tmp_path_factory.mktemp("multinode") / "unet.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"real": str(store_64), "real_n": 192, "classes": 7},
        "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"lr": 1e-3, "batch": 4},
        "loop": {"epochs": 2, "checkpoint_every_steps": 1000, "checkpoint_every_minutes": 0.0,
                 "keep_checkpoints": 100, "log_every_steps": 2},
        "runtime": {"threads": 1, "collective_timeout_s": COLLECTIVE_TIMEOUT_S},
        "seed": 5}))
    return path


@pytest.fixture(scope="module")
def one_node_two_tasks(unet_config, tmp_path_factory, _two_nodes):
    """The reference: DDP over 2 tasks on one node of the 2-node cluster; its final task state."""
    root = tmp_path_factory.mktemp("one-node")
    with pytest.MonkeyPatch.context() as patch:  # set up before any test's slurm_nodes, which sets the same
        patch.setenv("SLURM_CONF", str(_two_nodes / "slurm.conf"))
        ids: list[str] = []
        job_id, run_dir = _submit(root, "run", unet_config, _profile(1, 2), ids)
        _done(job_id, run_dir)
    assert [len(h) for h in _hosts(run_dir)] == [1], _lines(run_dir / ATTEMPTS)
    return _task_state(run_dir)


def _task_state(run_dir: Path) -> dict:
    folder = Path(run_dir) / "checkpoints"
    return torch.load(folder / (folder / "latest").read_text().strip(), weights_only=True)["task"]


# --- the cluster itself -----------------------------------------------------------------------------------------------
def test_srun_across_two_nodes_sees_two_hostnames_and_sinfo_two_idle_nodes(slurm_nodes):
    env = {**clean_environment(), "SLURM_CONF": os.environ["SLURM_CONF"]}
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30,
                           check=True, env=env).stdout.split("\n")
    assert sorted(line for line in nodes if line) == ["ts-n1 idle", "ts-n2 idle"], nodes
    out = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "hostname"], capture_output=True, text=True,
                         timeout=60, check=True, env=env).stdout.split()
    assert sorted(out) == ["ts-n1", "ts-n2"], out


def test_concurrent_steps_sharing_nodes_get_distinct_reserved_master_ports(slurm_nodes, tmp_path, jobs):
    """Two 2-node jobs at once, each task printing the MASTER_PORT the DDP rendezvous would use, then waiting (bounded)
    until both jobs have printed: within a step every task agrees; the two steps differ (SLURM's reserved ports)."""
    code = ("import os, pathlib, time; from toolkit.train.distributed import slurm_master_port; "
            f"d = pathlib.Path({str(tmp_path)!r}); "
            "name = os.environ['SLURM_JOB_ID'] + '.' + os.environ['SLURM_PROCID']; "
            "(d / name).write_text(str(slurm_master_port())); "
            "deadline = time.monotonic() + 60\n"
            "while len(list(d.glob('*.*'))) < 4 and time.monotonic() < deadline: time.sleep(0.1)\n"
            "assert len(list(d.glob('*.*'))) == 4")
    script = tmp_path.parent / f"{tmp_path.name}-port.py"
    script.write_text(code)
    for _ in range(2):
        out = subprocess.run(["sbatch", "--parsable", "-N2", "--ntasks-per-node=1", "-o",
                              str(tmp_path.parent / "%j.out"), "--wrap", f"srun {sys.executable} {script}"],
                             capture_output=True, text=True, timeout=30, check=True,
                             env={**clean_environment(), "PYTHONPATH": str(SCRIPTS.parents[1])})
        jobs.append(out.stdout.strip().split(";")[0])
    for job_id in jobs:
        info = slurmctl.wait_for(job_id, slurmctl.FINISHED, timeout=90)
        assert info["JobState"] == "COMPLETED", (info, (tmp_path.parent / f"{job_id}.out").read_text())
    ports = {job_id: {(tmp_path / f"{job_id}.{rank}").read_text() for rank in (0, 1)} for job_id in jobs}
    assert all(len(p) == 1 for p in ports.values()), ports  # every task of a step computes the same port
    assert ports[jobs[0]] != ports[jobs[1]], ports
    # where SLURM reserves no ports, the port is derived from the job and step ids
    assert slurm_master_port({"SLURM_STEP_RESV_PORTS": "19004-19005", "SLURM_JOB_ID": "9"}) == 19004
    assert slurm_master_port({"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0"}) == 20009


# --- training across nodes --------------------------------------------------------------------------------------------
def test_ddp_on_two_nodes_equals_ddp_on_one_node_bit_for_bit(slurm_nodes, one_node_two_tasks, unet_config, tmp_path,
                                                             jobs, assert_same_state):
    job_id, run_dir = _submit(tmp_path, "run", unet_config, _profile(2, 1), jobs)
    _done(job_id, run_dir)
    assert _hosts(run_dir) == [{"ts-n1", "ts-n2"}], _lines(run_dir / ATTEMPTS)
    assert_same_state(_task_state(run_dir), one_node_two_tasks)


@pytest.mark.horovod
def test_horovod_under_srun_pmix_on_two_nodes_equals_ddp_on_one_node(horovod, slurm_nodes, one_node_two_tasks,
                                                                     unet_config, tmp_path, jobs, assert_same_state):
    job_id, run_dir = _submit(tmp_path, "run", unet_config, _profile(2, 1, "horovod"), jobs)
    _done(job_id, run_dir)
    assert _hosts(run_dir) == [{"ts-n1", "ts-n2"}], _lines(run_dir / ATTEMPTS)
    assert_same_state(_task_state(run_dir), one_node_two_tasks)


def test_two_node_training_preempted_with_usr2_requeues_and_resumes_to_the_same_result(
        slurm_nodes, one_node_two_tasks, unet_config, tmp_path, jobs, assert_same_state):
    job_id, run_dir = _submit(tmp_path, "run", unet_config, _profile(2, 1), jobs)
    _until(job_id, run_dir, lambda: any(m["step"] >= 60 for m in _lines(run_dir / "metrics.jsonl")),
           "step 60 logged")
    slurmctl.signal(job_id, "USR2")
    info = _done(job_id, run_dir)
    assert int(info["Restarts"]) >= 1, info
    assert _hosts(run_dir) == [{"ts-n1", "ts-n2"}] * 2, _lines(run_dir / ATTEMPTS)
    second = max(a["time"] for a in _lines(run_dir / ATTEMPTS) if a["rank"] == "0")
    before = sorted(s for s, t in _checkpoints(run_dir).items() if t < second)
    assert before and before[-1] > 48, before  # the preemption checkpoint, in the second epoch, survived the restart
    assert_same_state(_task_state(run_dir), one_node_two_tasks)


def _job_processes(node: str, job_id: str) -> list[int]:
    """The pids in ``node``'s namespace that belong to SLURM job ``job_id``."""
    pids = subprocess.run(["ip", "netns", "pids", node], capture_output=True, text=True, timeout=10).stdout.split()
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if f"SLURM_JOB_ID={job_id}\0".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(int(pid))
    return found


def test_a_node_lost_mid_run_ends_the_survivor_within_the_timeout_and_the_rerun_resumes_without_loss(
        slurm_nodes, one_node_two_tasks, unet_config, tmp_path, jobs, assert_same_state):
    job_id, run_dir = _submit(tmp_path, "run", unet_config, _profile(2, 1), jobs,
                              overrides=(f"loop.checkpoint_every_steps={PERIODIC}",))
    _until(job_id, run_dir, lambda: any(s >= 5 * PERIODIC for s in _checkpoints(run_dir)), "a periodic checkpoint")
    assert _job_processes("ts-n1", job_id) and _job_processes("ts-n2", job_id)
    # ts-n2 vanishes: its link goes down first (no FIN or RST reaches ts-n1), then everything in it is killed
    subprocess.run(["ip", "link", "set", "ts-v2", "down"], check=True, timeout=10)
    lost = time.monotonic()
    subprocess.run(["bash", "-c", f'DIR={slurm_nodes}; source {SCRIPTS / "nodes.sh"}; node_kill 2'], check=True,
                   timeout=30)
    slurmctl.wait_for(job_id, lambda info: not _job_processes("ts-n1", job_id), timeout=COLLECTIVE_TIMEOUT_S + 30)
    survivor_s = time.monotonic() - lost  # rank 0 gave up (collective timeout) or SLURM ended it (node down)
    kept = _checkpoints(run_dir)  # what the lost attempt left: the last complete one is what `latest` names
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    info = slurmctl.wait_for(job_id, lambda info: info["JobState"] != "RUNNING", timeout=60)
    restart = subprocess.run([SCRIPTS / "start.sh", "--nodes", "2", slurm_nodes], capture_output=True, text=True,
                             timeout=120)
    assert restart.returncode == 0, restart.stderr
    if info["JobState"] in slurmctl.FINISHED:  # SLURM ended it (NODE_FAIL): the user submits it again
        job_id, _ = _submit(tmp_path, "run", unet_config, _profile(2, 1), jobs,
                            overrides=(f"loop.checkpoint_every_steps={PERIODIC}",))
    _done(job_id, run_dir)

    assert survivor_s < COLLECTIVE_TIMEOUT_S + 20, survivor_s
    after = _checkpoints(run_dir)
    resumed = int(latest.removeprefix("ckpt-").removesuffix(".pt"))
    assert all(after[s] == t for s, t in kept.items() if s <= resumed), (kept, after)  # none rewritten
    assert min(s for s, t in after.items() if t > max(kept.values())) == resumed + PERIODIC, (resumed, after)
    assert _hosts(run_dir)[-1] == {"ts-n1", "ts-n2"}, _lines(run_dir / ATTEMPTS)
    assert_same_state(_task_state(run_dir), one_node_two_tasks)


# --- evaluate swd across nodes ----------------------------------------------------------------------------------------
def _pgan_run(root: Path) -> Path:
    """A real 32² mask store and a PGAN run folder of three tick snapshots of fresh generators (as the trainer writes
    them), to score."""
    from toolkit.bench.zscore import phantom_masks
    from toolkit.config import to_dict
    from toolkit.data.store import StoreWriter
    from toolkit.models.pgan import Generator, PGANConfig

    labels = phantom_masks(np.random.default_rng(0), 40, 32)
    writer = StoreWriter(root / "real", classes=7)
    writer.write("train", 0, label=labels, subject=[f"s{i}" for i in range(40)], slice_index=np.arange(40))
    writer.finish(kind="real", image_size=32, has_image=False, shard_counts={"train": 1})
    config = PGANConfig(resolution=32, latent=16, fmap_base=64, fmap_max=16)
    (root / "pgan" / "snapshots").mkdir(parents=True)
    for tick in range(3):
        torch.manual_seed(tick)
        torch.save({"G_ema": Generator(config).state_dict(), "model": to_dict(config), "lod": 0.0, "kimg": 1.0 + tick,
                    "tick": tick, "store": str(root / "real")}, root / "pgan" / "snapshots" / f"tick-{tick:04d}.pt")
    return root / "pgan"


def test_evaluate_swd_with_ranks_on_two_nodes_equals_one_rank(slurm_nodes, tmp_path):
    one = _pgan_run(tmp_path / "one")
    two = _pgan_run(tmp_path / "two")
    env = {**clean_environment(), "OMP_NUM_THREADS": "1"}
    args = ["evaluate", "swd", "--images", "16", "--json"]
    single = subprocess.run([*CLI, *args[:2], str(one), *args[2:]], capture_output=True, text=True, env=env,
                            timeout=300)
    assert single.returncode == 0, single.stderr
    spread = subprocess.run(["srun", "-N2", "--ntasks-per-node=1", "--mpi=pmix", *CLI, *args[:2], str(two), *args[2:]],
                            capture_output=True, text=True, env=env, timeout=300)
    assert spread.returncode == 0, spread.stderr
    assert json.loads(spread.stdout)["ranks"] == 2
    assert (one / "swd.csv").read_text() == (two / "swd.csv").read_text()
