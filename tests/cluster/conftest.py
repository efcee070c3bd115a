"""The local single-node SLURM cluster (slurm/local/start.sh), started once per test session and stopped after it."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "slurm" / "local"


@pytest.fixture(scope="session")
def slurm_cluster():
    """Start (or reuse) the local cluster, point ``SLURM_CONF`` at it for the session, yield its state folder.

    The folder is ``$TUMORSYNTH_SLURM_DIR`` or start.sh's default. A cluster that does not come up fails the test:
    only a missing root account skips it. The cluster is stopped at the end of the session.
    """
    if os.geteuid() != 0:
        pytest.skip("needs root to start the local SLURM cluster (slurm/local/start.sh)")
    state = Path(os.environ.get("TUMORSYNTH_SLURM_DIR", "/tmp/tumorsynth-slurm"))
    try:  # up to 300 s: the first start may install slurm-wlm and munge with apt-get
        proc = subprocess.run([SCRIPTS / "start.sh", state], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"slurm/local/start.sh did not finish within 300 s:\n{e.stdout}\n{e.stderr}")
    if proc.returncode != 0:
        pytest.fail(f"slurm/local/start.sh failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        subprocess.run([SCRIPTS / "stop.sh", state], capture_output=True, text=True, timeout=120, check=False)
