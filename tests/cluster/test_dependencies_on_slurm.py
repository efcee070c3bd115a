"""Pipeline plumbing on the local SLURM cluster: a failed parent cancels its afterok dependents (they never run), and a
re-run pipeline keeps the jobs an earlier run still has queued instead of submitting them again."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from toolkit.cluster import slurmctl
from toolkit.cluster.executors import executor, load_profile
from toolkit.cluster.pipeline import _still_queued
from toolkit.mpi import clean_environment


def _env() -> dict[str, str]:
    return {k: v for k, v in clean_environment().items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def _sbatch(tmp_path, command: str) -> str:
    done = subprocess.run(["sbatch", "--parsable", "--chdir", str(tmp_path), "--wrap", command], env=_env(),
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_a_failed_parent_cancels_its_dependents(slurm_cluster, tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_")) and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    profile = load_profile("local")
    parent = executor("slurm", profile, tmp_path / "parent").submit(sys.exit, 3)
    marker = tmp_path / "child-ran"
    child = executor("slurm", profile, tmp_path / "child", after=[parent.job_id]).submit(pathlib.Path.touch, marker)
    assert slurmctl.wait_for(parent.job_id, slurmctl.FINISHED, timeout=120)["JobState"] == "FAILED"
    info = slurmctl.wait_for(child.job_id, slurmctl.FINISHED, timeout=120)
    assert info["JobState"] == "CANCELLED" and not marker.exists()


@pytest.mark.slurm
def test_a_rerun_keeps_the_jobs_still_queued(slurm_cluster, tmp_path):
    running = _sbatch(tmp_path, "sleep 120")
    finished = _sbatch(tmp_path, "true")
    try:
        slurmctl.wait_for(finished, slurmctl.FINISHED, timeout=60)
        state = tmp_path / ".pipeline"
        state.mkdir()
        (state / "jobs.json").write_text(json.dumps({"prepare": "done", "pgan-full": running, "spade-full": finished,
                                                     "masks-full": "ran", "sweep": "12_0"}))
        assert _still_queued(state) == {"pgan-full": running}
    finally:
        slurmctl.cancel(running)
