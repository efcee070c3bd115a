"""Shared fixtures: a small phantom cohort and its prepared store, built once per test session."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toolkit.data.phantom import write_cohort
from toolkit.data.prepare import PrepareConfig, prepare
from toolkit.mpi import clean_environment


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Four phantom subjects in BraTS 2018 layout."""
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, 4, seed=0, workers=2)
    return out


@pytest.fixture(scope="session")
def store_64(cohort, tmp_path_factory) -> Path:
    """The cohort prepared at 64² with the built-in tissue segmentation, slice split, PNGs."""
    out = tmp_path_factory.mktemp("stores") / "real64"
    prepare(PrepareConfig(src=cohort, out=out, size=64, shard_size=128, workers=2))
    return out


def _latest_task_state(run_dir: Path) -> dict:
    folder = Path(run_dir) / "checkpoints"
    return torch.load(folder / (folder / "latest").read_text().strip(), weights_only=True)["task"]


def _launch_ddp(cmd: list[str], ranks: int = 2, timeout: float = 300) -> None:
    """Run ``cmd`` as ``ranks`` real processes of one gloo group on localhost (torchrun's variables), to completion.

    A rank that dies leaves the others waiting in collectives, so on a timeout every rank is killed and all their
    error output is reported.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = clean_environment()  # an MPI singleton of this test process must not leak into the ranks
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(ranks)]
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
    errors = [proc.communicate()[1] for proc in procs]
    failed = [(r, proc.returncode) for r, proc in enumerate(procs) if proc.returncode != 0]
    assert not failed, f"ranks failed {failed}:\n" + "\n".join(f"--- rank {r}\n{e}" for r, e in enumerate(errors))


def _horovod_missing() -> str | None:
    """Why Horovod for PyTorch cannot be used here (None when it can): checked in a child process, which also proves
    its library loads. `make horovod` leaves the reason a build failed in the venv (``.horovod-unavailable``)."""
    check = subprocess.run([sys.executable, "-c", "import horovod.torch as h; assert h.mpi_built() and h.gloo_built()"],
                           env=clean_environment(), capture_output=True, text=True, timeout=120)
    if check.returncode == 0:
        return None
    status = Path(sys.prefix) / ".horovod-unavailable"
    why = status.read_text().strip() if status.exists() else check.stderr.strip().splitlines()[-1]
    return f"Horovod for PyTorch is not usable ({why}); `make horovod` builds it (make test runs it)"


@pytest.fixture(scope="session")
def horovod() -> Path:
    """The ``horovodrun`` launcher of this Python; skips, saying why, where Horovod could not be built."""
    missing = _horovod_missing()
    if missing:
        pytest.skip(missing)
    return Path(sys.executable).parent / "horovodrun"


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on TensorFlow; skips, naming the install command, where TensorFlow is not installed."""
    import importlib.util

    from toolkit.models.unet_keras import INSTALL_HINT, keras_module

    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip(f"TensorFlow is not installed: {INSTALL_HINT} (make test installs it)")
    module = keras_module()
    # absl (TensorFlow's logging) binds its handler to the sys.stderr of import time, here pytest's capture file, and
    # closes that stream whenever a later logging.config.dictConfig (submitit's import does one) shuts handlers down,
    # which breaks pytest's capture for the rest of the session. absl never closes the real stderr.
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__
    return module


def _interrupt(cmd: list[str], run_dir: Path, sig: int, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start a run, wait until it has written two periodic checkpoints, send ``sig``, and wait for it to end."""
    proc = subprocess.Popen(cmd, env=clean_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = Path(run_dir) / "checkpoints"
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("ckpt-*.pt"))) < 2:
        assert proc.poll() is None, f"run ended before it could be interrupted: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for checkpoints"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def interrupt():
    """``interrupt(cmd, run_dir, sig)``: run ``cmd``, signal it once two checkpoints exist, return the finished run."""
    return _interrupt


@pytest.fixture
def latest_task_state():
    """``latest_task_state(run_dir)``: the task state of a run's newest checkpoint."""
    return _latest_task_state


@pytest.fixture
def launch_ddp():
    """``launch_ddp(cmd)``: run a command as 2 DDP ranks and wait for both."""
    return _launch_ddp
