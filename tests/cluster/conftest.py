"""The local SLURM clusters of slurm/local/start.sh, each started once per test session and stopped after it: the
single-node one (``slurm_cluster``) and a 2-node one in network namespaces (``slurm_nodes``), side by side (their own
state folders and controller ports)."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "slurm" / "local"
NODES_DIR = Path(os.environ.get("TUMORSYNTH_SLURM_NODES_DIR", "/tmp/tumorsynth-slurm-nodes"))


def _started(state: Path, *options: str):
    """Start (or reuse) the cluster of ``state`` (start.sh OPTIONS STATE), yield, stop it. A cluster that does not
    come up fails the test: only a missing root account skips it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start the local SLURM cluster (slurm/local/start.sh)")
    try:  # up to 300 s: the first start may install slurm-wlm and munge with apt-get
        proc = subprocess.run([SCRIPTS / "start.sh", *options, state], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"slurm/local/start.sh did not finish within 300 s:\n{e.stdout}\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"slurm/local/start.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    try:
        yield state
    finally:
        subprocess.run([SCRIPTS / "stop.sh", state], capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or reuse) the single-node cluster, point ``SLURM_CONF`` at it for the session, yield its state folder.

    The folder is ``$TUMORSYNTH_SLURM_DIR`` or start.sh's default. The cluster is stopped at the end of the session.
    """
    state = Path(os.environ.get("TUMORSYNTH_SLURM_DIR", "/tmp/tumorsynth-slurm"))
    previous = os.environ.get("SLURM_CONF")
    for folder in _started(state):
        os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
        try:
            yield folder
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous


@pytest.fixture(scope="session")
def _two_nodes():
    yield from _started(NODES_DIR, "--nodes", "2")


@pytest.fixture
def slurm_nodes(_two_nodes, monkeypatch):
    """The 2-node cluster (nodes ts-n1, ts-n2; ``$TUMORSYNTH_SLURM_NODES_DIR`` or /tmp/tumorsynth-slurm-nodes), with
    ``SLURM_CONF`` pointing at it for this test, and no variables of an outer SLURM or MPI job for jobs to inherit
    (submitit calls sbatch with os.environ). Started once per session; yields its state folder."""
    monkeypatch.setenv("SLURM_CONF", str(_two_nodes / "slurm.conf"))
    for key in [k for k in os.environ if k.startswith(("SLURM_", "OMPI_", "PMIX_", "PRTE_")) and k != "SLURM_CONF"]:
        monkeypatch.delenv(key)
    return _two_nodes
