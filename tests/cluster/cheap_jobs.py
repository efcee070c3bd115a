"""Cheap picklable jobs for the local scheduler's tests (tests/cluster/test_pipeline_local.py).

A subprocess (``python -m jobs FILE.pkl``) unpickles them by this module's name, so the tests put this folder on
``sys.path`` and on ``PYTHONPATH``. Each job appends ``start NAME PID`` and ``end NAME PID`` to ``folder/journal``
and touches ``folder/NAME.started`` / ``NAME.ended`` (``NAME.failed`` when asked to fail); with ``wait_for`` it waits,
after starting, until that file of ``folder`` exists (failing after ``timeout`` seconds), which is how the tests
prove that two steps ran at the same time without sleeping a guessed while.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from jobs.base import Job


@dataclasses.dataclass(frozen=True)
class Mark(Job):
    """Journal its start and end; optionally wait for a file, and fail instead of ending."""

    name: str
    folder: Path
    wait_for: str | None = None
    fail: bool = False
    timeout: float = 20.0

    def log_dir(self) -> Path:
        return self.folder / "logs" / self.name

    def run(self) -> None:
        self._note("start", "started")
        if self.wait_for is not None:
            deadline = time.monotonic() + self.timeout
            while not (self.folder / self.wait_for).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name}: {self.wait_for} did not appear within {self.timeout:g} s")
                time.sleep(0.01)
        if self.fail:
            (self.folder / f"{self.name}.failed").touch()
            raise RuntimeError(f"{self.name}: failing as asked")
        self._note("end", "ended")

    def _note(self, event: str, flag: str) -> None:
        with open(self.folder / "journal", "a") as handle:  # one short append per line: whole lines, any order
            handle.write(f"{event} {self.name} {os.getpid()}\n")
        (self.folder / f"{self.name}.{flag}").touch()
