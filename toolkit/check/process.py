"""The checks' subprocesses: the ``tumorsynth`` CLI run with a hard timeout, failures turned into one-line reasons.

Each command starts in its own session, so a timeout kills the whole process group (torchrun's ranks, DataLoader
workers), not just the direct child, and nothing is left holding the GPU for the next path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from toolkit.mpi import clean_environment

PREEMPTED_EXIT = 75  # what `tumorsynth train` returns after checkpointing on a signal


class CheckFailed(Exception):
    """A path failed; the message is the one line the table shows."""


def cli(*args: str) -> list[str]:
    """The command line of ``tumorsynth ARGS`` in this interpreter (the venv the check itself runs from)."""
    return [sys.executable, "-m", "toolkit.cli", *args]


def last_line(text: str) -> str:
    """The last non-empty line of a command's output: where a traceback puts the error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def start(cmd: Sequence[str], stderr: IO[str] | int = subprocess.PIPE) -> subprocess.Popen:
    """``cmd`` running in its own process group, stdout captured, stderr captured or into ``stderr``."""
    return subprocess.Popen(list(cmd), env=clean_environment(), stdout=subprocess.PIPE, stderr=stderr, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for ``proc`` up to ``timeout`` s; past it, kill its process group and fail naming the limit."""
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CheckFailed(f"timed out after {timeout:.0f} s") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: Sequence[str], timeout: float, *, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; an exit status outside ``ok`` fails with the last line of its output."""
    done = finish(start(cmd), timeout)
    if done.returncode not in ok:
        raise CheckFailed(f"exit {done.returncode}: {last_line(done.stderr or done.stdout)}")
    return done


def run_json(cmd: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run a ``--json`` command and return the object it printed."""
    done = run(cmd, timeout)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise CheckFailed(f"no JSON on stdout: {last_line(done.stdout)}") from None


def interrupted_run(cmd: Sequence[str], run_dir: Path, timeout: float, *, checkpoints: int = 2) -> None:
    """Start a training, send SIGUSR2 once it has written ``checkpoints`` periodic checkpoints, and require the
    graceful exit (checkpointed, status 75). Its log goes to a file beside ``run_dir``: a pipe nobody reads while we
    poll could fill and stall the run."""
    folder = Path(run_dir) / "checkpoints"
    log_path = Path(run_dir).with_name(Path(run_dir).name + "-interrupted.log")
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log:
        proc = start(cmd, stderr=log)
        while len(list(folder.glob("ckpt-*.pt"))) < checkpoints:
            if proc.poll() is not None:
                raise CheckFailed(f"ended (exit {proc.returncode}) before it could be interrupted: "
                                  f"{last_line(log_path.read_text())}")
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise CheckFailed(f"no {checkpoints} checkpoints within {timeout:.0f} s")
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR2)
        code = finish(proc, deadline - time.monotonic()).returncode
    if code != PREEMPTED_EXIT:
        raise CheckFailed(f"SIGUSR2 gave exit {code}, not {PREEMPTED_EXIT}: {last_line(log_path.read_text())}")
