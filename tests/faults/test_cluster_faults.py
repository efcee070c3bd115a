"""Faults of the cluster layer, with real processes and real files: a second writer on a sweep or a pipeline folder,
a sweep submitted again (unchanged or changed), a member that a live process holds while the files say "preempted",
a controller that does not answer, a pipeline that fails half-way through its submissions, job folders that others
could write, MASTER_PORT clashes between jobs and steps, and a state folder of the local SLURM cluster prepared by
someone else (start.sh, stop.sh run as root)."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from toolkit.cluster import slurmctl
from toolkit.cluster.executors import executor, load_profile
from toolkit.cluster.pipeline import PipelineConfig, TrainStep, run_pipeline
from toolkit.cluster.private import UnsafeFolder, private_dir
from toolkit.cluster.sweep import Sweep
from toolkit.config import ConfigError
from toolkit.lock import LockedError, holder
from toolkit.mpi import clean_environment
from toolkit.provenance import OptionsChanged
from toolkit.train.distributed import PORT_BASE, PORT_RANGE, _rendezvous, slurm_master_port

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "slurm" / "local"
CLI = [sys.executable, "-m", "toolkit.cli"]
ROOT = os.geteuid() == 0
NEEDS_ROOT = pytest.mark.skipif(not ROOT, reason="needs root: start.sh/stop.sh run as root, and the test makes "
                                "folders of another user (chown)")


# --- helpers ----------------------------------------------------------------------------------------------------------
class LockHolder:
    """A real child process that holds ``folder``'s writer lock (as a live trainer or launcher does) until closed."""

    CODE = ("import sys; from toolkit.lock import WriterLock; WriterLock(sys.argv[1], 'test').acquire(); "
            "print('held', flush=True); sys.stdin.read()")

    def __init__(self, folder: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE, str(folder)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # returns once the lock is held, or at the child's exit
        assert line.strip() == "held", self.proc.communicate(timeout=30)[1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # the child's read ends, it exits, the kernel releases the lock
            self.proc.wait(timeout=30)

    def __enter__(self) -> "LockHolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _wait(condition, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``condition`` (files) until it holds; fail at the deadline, or at once when ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what}: {proc.args} exited ({proc.returncode}) first:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s")
        time.sleep(0.05)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=clean_environment())


def _base(folder: Path, store: Path, epochs: int = 1) -> Path:
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"real": str(store), "classes": 7}, "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"batch": 8}, "loop": {"epochs": epochs, "checkpoint_every_minutes": 0.0, "log_every_steps": 1},
        "runtime": {"threads": 1}}))
    return path


def _spec(path: Path, base: Path, mixes: dict | None = None) -> Path:
    """A sweep of one member per mix (default: two)."""
    path.write_text(yaml.safe_dump({
        "name": "faults", "model": "unet", "base": str(base), "evaluate": "test",
        "grid": {"classes": {"data.classes": [7]}, "mix": mixes or {"a": {"data.real_n": 16}, "b": {"data.real_n": 8}}},
        "report": {"columns": "classes", "rows": "mix"}}))
    return path


def _members(out: Path) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())["members"]


def _states(out: Path) -> list[str]:
    return [row["state"] for row in Sweep(out).status()]


# --- 1. sweeps: one writer, an unchanged definition resumes, a changed one is refused --------------------------------
@pytest.fixture(scope="module")
def local_sweep(store_64, tmp_path_factory):
    """`tumorsynth sweep submit --cluster local` of two members, started in the background; ``finish()`` awaits it."""
    root = tmp_path_factory.mktemp("sweep")
    spec = _spec(root / "sweep.yaml", _base(root, store_64, epochs=2))
    out = root / "out"
    args = ("sweep", "submit", str(spec), "--cluster", "local", "--out", str(out))
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_environment())
    done: list[str] = []

    def finish() -> str:
        if not done:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-3000:]
            done.append(stdout)
        return done[0]

    yield SimpleNamespace(spec=spec, out=out, args=args, proc=proc, finish=finish)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_sweep_submit_while_the_first_runs_its_members_is_refused_naming_it(local_sweep):
    out, proc = local_sweep.out, local_sweep.proc

    def member_started() -> bool:
        return (out / "sweep.json").exists() and any((Path(m["run_dir"]) / "attempts.jsonl").exists()
                                                     for m in _members(out))

    _wait(member_started, 120, "a member's first start", proc)
    assert holder(out)["pid"] == proc.pid  # the launcher holds the sweep while its members run
    with pytest.raises(LockedError, match=rf"pid {proc.pid}\b"):
        Sweep.create(local_sweep.spec, out, "local", "local")
    assert "2 members ran" in local_sweep.finish()
    assert [len(m["jobs"]) for m in _members(out)] == [1, 1]  # nothing was submitted twice
    assert _states(out) == ["done", "done"]


def test_submitting_an_unchanged_sweep_again_resumes_it_and_leaves_a_member_a_live_process_holds(local_sweep):
    local_sweep.finish()
    out = local_sweep.out
    held, lost = (Path(m["run_dir"]) for m in _members(out))
    for name in ("DONE", "eval-test.json"):  # held looks preempted on disk: checkpoints, no DONE
        (held / name).unlink()
    shutil.rmtree(lost)  # lost was never run, as far as its files tell
    assert _states(out) == ["preempted", "not started"]
    with LockHolder(held):  # a live trainer in held's run directory
        assert _states(out) == ["running", "not started"]
        again = _cli(*local_sweep.args)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "1 members ran" in again.stdout
        assert [len(m["jobs"]) for m in _members(out)] == [1, 2]  # only the lost member was submitted again
        assert _states(out) == ["running", "done"]
    assert _states(out) == ["preempted", "done"]  # the lock, not the files, made it "running"


def test_submitting_a_changed_sweep_is_refused_naming_what_changed(tmp_path):
    base = _base(tmp_path, tmp_path / "store")  # never read: nothing is submitted
    spec = _spec(tmp_path / "sweep.yaml", base)
    out = tmp_path / "out"
    with Sweep.create(spec, out, "local", "local"):
        pass  # written, nothing submitted
    recorded = (out / "sweep.json").read_bytes()
    with pytest.raises(OptionsChanged, match=r"000-7-a-s0 optim\.lr: None then, '0\.01' now"):
        Sweep.create(spec, out, "local", "local", sets=("optim.lr=0.01",))
    with pytest.raises(OptionsChanged, match=r"\bprofile: 'local' then, 'v100' now"):
        Sweep.create(spec, out, "local", "v100")
    _spec(spec, base, {"a": {"data.real_n": 16}})  # the same file, one member less
    with pytest.raises(OptionsChanged, match=r"001-7-b-s0 data\.real_n: '8' then, None now"):
        Sweep.create(spec, out, "local", "local")
    _spec(spec, base)
    base.write_text(base.read_text().replace("batch: 8", "batch: 4"))  # same path, other content
    done = _cli("sweep", "submit", str(spec), "--cluster", "local", "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert "base_fingerprint: 'sha256:" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert (out / "sweep.json").read_bytes() == recorded
    assert not (out / "runs").exists() and not (out / "logs").exists()


def test_a_member_whose_controller_cannot_be_asked_is_unknown_and_never_resubmitted(tmp_path, monkeypatch):
    spec = _spec(tmp_path / "sweep.yaml", _base(tmp_path, tmp_path / "store"), {"a": {"data.real_n": 16}})
    out = tmp_path / "out"
    with Sweep.create(spec, out, "local", "local"):
        pass
    doc = json.loads((out / "sweep.json").read_text())
    doc["cluster"] = "slurm"  # a sweep on SLURM whose member's job 4242 was preempted once (its checkpoints remain)
    doc["members"][0]["jobs"] = ["4242"]
    (out / "sweep.json").write_text(json.dumps(doc))
    (Path(doc["members"][0]["run_dir"]) / "checkpoints").mkdir(parents=True)
    # squeue cannot start, as on a login node without the clients; a controller that does not answer within the
    # timeout fails the same way (slurmctl raises), only slower
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))

    assert Sweep(out).status()[0]["state"] == "unknown"
    assert Sweep(out).resume() == [] and _members(out)[0]["jobs"] == ["4242"]
    with LockHolder(Path(doc["members"][0]["run_dir"])):
        assert Sweep(out).status()[0]["state"] == "running"
    doc["cluster"] = "local"  # the same files without a controller to ask: the files decide
    (out / "sweep.json").write_text(json.dumps(doc))
    assert Sweep(out).status()[0]["state"] == "preempted"


# --- 2. pipelines: one writer, jobs.json after every step ------------------------------------------------------------
def _pipeline(tmp_path: Path, out: Path, **overrides) -> PipelineConfig:
    missing = tmp_path / "no-such-config.yaml"  # a training step that fails as soon as it runs
    # SPADE's config must be readable: the pipeline checks its out_channels against the store before anything runs
    spade = tmp_path / "spade.yaml"
    spade.write_text("data: {store: set-by-pipeline}\nmodel: {resolution: 64}\n")
    cfg = PipelineConfig(out=out, cohort=tmp_path / "cohort", pgan=TrainStep(missing), spade=TrainStep(spade),
                         sweep=tmp_path / "no-such-sweep.yaml", size=64, branches=("full",), workers=2)
    return replace(cfg, **overrides)


def test_a_second_pipeline_run_on_the_same_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "exp"
    with LockHolder(out / ".pipeline") as first, pytest.raises(LockedError, match=rf"pid {first.proc.pid}\b"):
        run_pipeline(_pipeline(tmp_path, out), "local")
    assert sorted(p.name for p in (out / ".pipeline").iterdir()) == [".lock"]  # no jobs.json, nothing run


def test_a_local_pipeline_that_fails_half_way_has_recorded_the_steps_before(store_64, tmp_path):
    out = tmp_path / "exp"
    shutil.copytree(store_64, out / "store")  # prepare is complete: skipped
    with pytest.raises(ConfigError, match=r"no-such-config\.yaml"):
        run_pipeline(_pipeline(tmp_path, out), "local")  # pgan-full fails
    assert json.loads((out / ".pipeline" / "jobs.json").read_text()) == {"prepare": "done"}
    assert (out / ".pipeline").stat().st_mode & 0o777 == 0o700


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The local SLURM cluster of slurm/local/start.sh (as tests/cluster/conftest.py's session fixture, whose folder
    it shares: start.sh reuses a running cluster); stopped at the end only if this fixture started it."""
    if not ROOT:
        pytest.skip("needs root to start the local SLURM cluster (slurm/local/start.sh)")
    state = Path(os.environ.get("TUMORSYNTH_SLURM_DIR", "/tmp/tumorsynth-slurm"))
    proc = subprocess.run([SCRIPTS / "start.sh", state], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"slurm/local/start.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    if "already running" not in proc.stdout:
        subprocess.run([SCRIPTS / "stop.sh", state], capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slurm
def test_a_slurm_pipeline_whose_second_submission_fails_has_recorded_the_first(slurm, store_64, tmp_path,
                                                                               monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_")) and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    out = tmp_path / "exp"
    shutil.copytree(store_64, out / "store")  # prepare is complete: skipped
    unsafe = private_dir(out / ".pipeline") / "logs" / "swd-full"
    unsafe.mkdir(parents=True)
    unsafe.chmod(0o777)  # the SWD step's submitit folder may be written by anyone: its submission is refused
    with pytest.raises(UnsafeFolder, match="swd-full: may be written"):
        run_pipeline(_pipeline(tmp_path, out), "slurm")  # prepare skipped, pgan-full queued, swd-full refused
    jobs = json.loads((out / ".pipeline" / "jobs.json").read_text())
    try:
        assert list(jobs) == ["prepare", "pgan-full"] and jobs["prepare"] == "done", jobs
        assert slurmctl.job_info(jobs["pgan-full"]) is not None  # a real job, tracked before the failure
    finally:
        if "pgan-full" in jobs:
            slurmctl.cancel(jobs["pgan-full"])


@pytest.mark.slurm
def test_submitting_a_queued_slurm_sweep_again_submits_none_of_its_members_twice(slurm, tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_")) and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    spec = _spec(tmp_path / "sweep.yaml", _base(tmp_path, tmp_path / "store"))  # members fail when they run
    out = tmp_path / "out"
    args = ("sweep", "submit", str(spec), "--cluster", "slurm", "--profile", "local", "--out", str(out))
    env = {k: v for k, v in clean_environment().items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    blocker = subprocess.run(["sbatch", "--parsable", "--exclusive", "--chdir", str(tmp_path), "--wrap", "sleep 300"],
                             env=env, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    try:
        slurmctl.wait_for(blocker, {"RUNNING"}, timeout=60)  # the whole node: the members stay pending
        first = _cli(*args)
        assert first.returncode == 0 and "2 members submitted" in first.stdout, first.stderr
        assert _states(out) == ["pending", "pending"]
        again = _cli(*args)
        assert again.returncode == 0 and "0 members submitted" in again.stdout, again.stderr
        assert [len(m["jobs"]) for m in _members(out)] == [1, 1]
    finally:
        queued = _members(out) if (out / "sweep.json").exists() else []
        for job in {blocker, *(j.split("_")[0] for m in queued for j in m["jobs"])}:
            slurmctl.cancel(job)


# --- 3. folders of pickled jobs --------------------------------------------------------------------------------------
class Touch:
    """Unpickling it creates ``path``: what a planted pickle could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_fresh_job_folder_is_0700_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        folder = private_dir(tmp_path / "a" / "logs")
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert private_dir(folder) == folder  # an existing private folder of ours is fine


def test_a_job_folder_others_may_write_or_a_symlink_is_refused_naming_it(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UnsafeFolder, match=rf"{shared}: may be written by its group or by others \(mode 0777\)"):
        private_dir(shared)
    with pytest.raises(UnsafeFolder, match=str(shared)):
        executor("local", load_profile("local"), shared)
    (tmp_path / "link").symlink_to(private_dir(tmp_path / "mine"))
    with pytest.raises(UnsafeFolder, match="link: is a symbolic link"):
        private_dir(tmp_path / "link")
    out = tmp_path / "exp"
    (out / ".pipeline").mkdir(parents=True)
    (out / ".pipeline").chmod(0o775)
    with pytest.raises(UnsafeFolder, match=r"\.pipeline: may be written by its group"):
        run_pipeline(_pipeline(tmp_path, out), "local")
    assert not (out / ".pipeline" / ".lock").exists()


@NEEDS_ROOT
def test_a_job_folder_of_another_user_is_refused_naming_it(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafeFolder, match=rf"{theirs}: belongs to uid 65534"):
        private_dir(theirs)


def test_python_m_jobs_unpickles_nothing_from_a_folder_others_may_write(tmp_path):
    marker = tmp_path / "unpickled"
    for folder, code in ((tmp_path / "shared", 2), (private_dir(tmp_path / "private"), 1)):
        folder.mkdir(exist_ok=True)
        (folder / "job.pkl").write_bytes(pickle.dumps(Touch(marker)))
        (folder / "job.pkl").chmod(0o600)
        if folder.name == "shared":
            folder.chmod(0o777)
        done = subprocess.run([sys.executable, "-m", "jobs", str(folder / "job.pkl")], capture_output=True,
                              text=True, timeout=120, env=clean_environment())
        assert done.returncode == code, done.stderr
        if code == 2:
            assert f"{folder}: may be written" in done.stderr and not marker.exists()
    assert marker.exists()  # from the private folder it was unpickled (then failed: None is no job)


# --- 4. MASTER_PORT ---------------------------------------------------------------------------------------------------
def test_master_port_differs_between_the_steps_of_a_job_and_between_jobs():
    ports = {(job, step): slurm_master_port({"SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)})
             for job in range(123_000, 123_797) for step in range(16)}
    # the documented bound: 797 consecutive job ids × 16 steps each, all at once on one node, never share a port
    assert len(set(ports.values())) == len(ports)
    assert all(PORT_BASE <= p < PORT_BASE + PORT_RANGE <= 32768 for p in ports.values())  # below ephemeral ports
    assert slurm_master_port({"SLURM_JOB_ID": "123000"}) == ports[123_000, 0]


def test_ddp_under_srun_takes_the_port_of_its_job_and_step(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "555",
           "SLURM_STEP_ID": "3", "MASTER_ADDR": "127.0.0.1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _rendezvous() == (1, 2, 1)
    assert os.environ["MASTER_PORT"] == str(slurm_master_port(env))
    monkeypatch.delenv("MASTER_PORT")
    monkeypatch.setenv("SLURM_STEP_ID", "4")
    _rendezvous()
    assert os.environ["MASTER_PORT"] != str(slurm_master_port(env))


# --- 5. the local SLURM cluster's state folder ------------------------------------------------------------------------
def _script(name: str, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPTS / name, state], capture_output=True, text=True, timeout=120)


@NEEDS_ROOT
def test_start_sh_refuses_a_state_folder_of_another_user_or_that_others_may_write(tmp_path):
    theirs, shared = tmp_path / "theirs", tmp_path / "shared"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    shared.mkdir()
    shared.chmod(0o775)
    for state in (theirs, shared):
        done = _script("start.sh", state)
        assert done.returncode == 1 and f"{state} (uid" in done.stderr and "not root's alone" in done.stderr, done
        assert list(state.iterdir()) == []  # nothing written into it
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    done = _script("start.sh", tmp_path / "open" / "state")  # someone else could swap the folder below it
    assert done.returncode == 1 and "open (above the state folder)" in done.stderr, done
    assert not (tmp_path / "open" / "state").exists()


@NEEDS_ROOT
def test_start_sh_refuses_a_planted_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for planted in ("slurm.conf", "munge/munge.key", "run/slurmd.pid"):
        state = tmp_path / planted.replace("/", "-")
        (state / planted).parent.mkdir(parents=True, mode=0o755, exist_ok=True)
        state.chmod(0o755)
        (state / planted).symlink_to(victim)
        done = _script("start.sh", state)
        assert done.returncode == 1 and f"{state / planted} is a symbolic link" in done.stderr, done
        assert victim.read_text() == "precious\n" and (state / planted).is_symlink()
    (tmp_path / "elsewhere").mkdir(mode=0o755)
    (tmp_path / "state-link").symlink_to(tmp_path / "elsewhere")
    done = _script("start.sh", tmp_path / "state-link")
    assert done.returncode == 1 and "state-link is a symbolic link" in done.stderr, done
    assert list((tmp_path / "elsewhere").iterdir()) == []


@NEEDS_ROOT
def test_stop_sh_does_not_kill_a_process_that_a_pid_file_names_under_a_daemons_name(tmp_path):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True, mode=0o755)
    state.chmod(0o755)
    victims = []
    try:
        for name in ("slurmd", "slurmctld", "munged"):  # a copy of sleep: its name (comm) is the daemon's
            shutil.copy("/bin/sleep", tmp_path / name)
            victims.append(subprocess.Popen([tmp_path / name, "300"]))
            (state / "run" / f"{name}.pid").write_text(f"{victims[-1].pid}\n")
        assert Path(f"/proc/{victims[0].pid}/comm").read_text().strip() == "slurmd"
        done = _script("stop.sh", state)
        assert done.returncode == 0, done.stderr
        assert [v.poll() for v in victims] == [None, None, None], done.stdout  # all alive
        assert "stopped" not in done.stdout.replace("is stopped", "")
    finally:
        for victim in victims:
            victim.kill()
            victim.wait()


@pytest.mark.slurm
def test_stop_sh_does_not_kill_the_daemons_of_another_state_folder(slurm, tmp_path):
    state = tmp_path / "state"
    (state / "run").mkdir(parents=True, mode=0o755)
    state.chmod(0o755)
    for name in ("slurmd", "slurmctld", "munged"):  # pid files naming the running cluster's real daemons
        shutil.copy(slurm / "run" / f"{name}.pid", state / "run" / f"{name}.pid")
    done = _script("stop.sh", state)
    assert done.returncode == 0, done.stderr
    assert slurmctl.available(), f"stop.sh on another folder stopped the cluster:\n{done.stdout}"
    for name in ("slurmd", "slurmctld", "munged"):
        pid = int((slurm / "run" / f"{name}.pid").read_text())
        assert Path(f"/proc/{pid}").exists(), name
