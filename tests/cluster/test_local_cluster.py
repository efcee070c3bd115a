"""The local SLURM cluster end to end: a batch job, an MPI step under PMIx, a submitit job preempted and requeued."""

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from toolkit.cluster import slurmctl
from toolkit.mpi import clean_environment

N_STEPS = 40


class Counter:
    """Appends 0, 1, ... N-1 to a file, one line every ``interval`` s, resuming after the last line written.

    Checkpointable for submitit: on preemption it resubmits a fresh instance, which continues from the file.
    """

    def __init__(self, path: str, n: int, interval: float = 0.2) -> None:
        self.path, self.n, self.interval = path, n, interval

    def __call__(self) -> int:
        done = len(Path(self.path).read_text().split()) if os.path.exists(self.path) else 0
        for i in range(done, self.n):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, f"{i}\n".encode())
            finally:
                os.close(fd)
            time.sleep(self.interval)
        return self.n

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        return submitit.helpers.DelayedSubmission(type(self)(self.path, self.n, self.interval))


def _client_env() -> dict[str, str]:
    """This environment without MPI variables and without the variables of any SLURM job it runs in."""
    return {k: v for k, v in clean_environment().items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def _poll(condition, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(poll)


def test_parse_record_keeps_values_with_spaces():
    record = slurmctl.parse_record("JobId=7 JobName=my job JobState=RUNNING ReqB:S:C:T=0:0:*:* CPUs/Task=1 Power=")
    assert record == {"JobId": "7", "JobName": "my job", "JobState": "RUNNING", "ReqB:S:C:T": "0:0:*:*",
                      "CPUs/Task": "1", "Power": ""}


@pytest.mark.slurm
def test_batch_job_runs_and_is_tracked(slurm_cluster, tmp_path):
    assert slurmctl.available()
    out = subprocess.run(["sbatch", "--parsable", "--chdir", str(tmp_path), "--job-name", "ts-wrap",
                          "--wrap", 'echo "job $SLURM_JOB_ID on $SLURM_JOB_PARTITION" > out.txt'],
                         capture_output=True, text=True, timeout=30, check=True, env=_client_env()).stdout
    job_id = out.strip().split(";")[0]
    info = slurmctl.wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=30)
    assert info["JobState"] == "COMPLETED", info
    assert info["JobName"] == "ts-wrap"
    assert (tmp_path / "out.txt").read_text().strip() == f"job {job_id} on debug"
    assert slurmctl.job_states([job_id, "999999999"]) == {job_id: "COMPLETED"}
    assert slurmctl.job_info("999999999") is None


@pytest.mark.slurm
def test_mpi_allreduce_under_srun_pmix(slurm_cluster, tmp_path):
    code = ("from mpi4py import MPI; c = MPI.COMM_WORLD; "
            "print('rank', c.Get_rank(), 'size', c.Get_size(), 'sum', c.allreduce(c.Get_rank() + 1), flush=True)")
    env = {**_client_env(), "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    proc = subprocess.run(["srun", "--mpi=pmix", "-n", "2", "--chdir", str(tmp_path), "--time", "2",
                           sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(proc.stdout.split("\n")[:2]) == ["rank 0 size 2 sum 3", "rank 1 size 2 sum 3"], proc.stdout


@pytest.mark.slurm
def test_submitit_job_is_checkpointed_requeued_and_resumed(slurm_cluster, tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_")) and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    counts = tmp_path / "counts.txt"
    executor = submitit.AutoExecutor(folder=tmp_path / "logs", cluster="slurm")
    executor.update_parameters(slurm_partition="debug", timeout_min=5, cpus_per_task=1, mem_gb=0.5,
                               slurm_signal_delay_s=30, name="ts-requeue")
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the job imports nothing from tests/
    try:
        job = executor.submit(Counter(str(counts), N_STEPS))
    finally:
        cloudpickle.unregister_pickle_by_value(module)

    _poll(lambda: counts.exists() and len(counts.read_text().split()) >= 3, 60, "first counts")
    slurmctl.signal(job.job_id, "USR2")
    at_signal = len(counts.read_text().split())
    assert at_signal < N_STEPS, "the job finished before it could be preempted"

    info = slurmctl.wait_for(job.job_id, slurmctl.FINISHED, timeout=60)
    assert info["JobState"] == "COMPLETED", info
    assert int(info["Restarts"]) >= 1, info
    assert counts.read_text().split() == [str(i) for i in range(N_STEPS)]
    _poll(job.paths.result_pickle.exists, 10, "submitit's result pickle")
    assert job.result() == N_STEPS  # reads the result pickle only: no sacct
    assert "Requeued" in job.paths.stdout.read_text() + job.paths.stderr.read_text()
