"""Querying and steering SLURM jobs through its command-line tools (scontrol, squeue, scancel), with timeouts.

Only the controller's in-memory view is used, never accounting (``sacct``): a finished job stays visible to
``scontrol show job`` for ``MinJobAge`` seconds (300 on the local cluster of ``slurm/local/start.sh``). Every command
that exits non-zero (or does not answer in time) raises a :class:`RuntimeError` naming the command and its stderr.
"""

from __future__ import annotations

import logging
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

#: Job states after which a job does not run again by itself (a requeued job passes through PENDING instead).
FINISHED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                      "BOOT_FAIL", "DEADLINE"})
_KEY = re.compile(r"^[A-Za-z][\w:/]*$")  # scontrol keys: JobId, ReqB:S:C:T, CPUs/Task, ...
_UNKNOWN_JOB = "Invalid job id specified"


def _run(cmd: list[str], timeout: float = 30.0) -> str:
    """Run ``cmd`` and return its stdout; RuntimeError when it fails, cannot start or times out."""
    text = shlex.join(cmd)
    log.debug("running %s", text)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{text} did not finish within {timeout:g} s") from e
    except OSError as e:
        raise RuntimeError(f"{text} could not be started: {e}") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{text} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def available(timeout: float = 5.0) -> bool:
    """Whether the SLURM clients are installed and a controller answers (``scontrol ping``) within ``timeout``."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        return " is UP" in _run(["scontrol", "ping"], timeout=timeout)
    except RuntimeError as e:
        log.debug("SLURM not available: %s", e)
        return False


def parse_record(line: str) -> dict[str, str]:
    """One line of ``scontrol show -o`` output as a dict; a value with spaces (``JobName=a b``) is kept whole."""
    record: dict[str, str] = {}
    key = None
    for token in line.strip().split(" "):
        name, sep, value = token.partition("=")
        if sep and _KEY.match(name):
            key = name
            record[key] = value
        elif key is not None:
            record[key] += " " + token
    return record


def job_info(job_id: str) -> dict[str, str] | None:
    """``scontrol show job`` of one job (``123`` or an array task ``123_4``); None when SLURM does not know it."""
    try:
        out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    except RuntimeError as e:
        if _UNKNOWN_JOB in str(e):
            return None
        raise
    lines = [line for line in out.splitlines() if line.strip()]
    return parse_record(lines[0]) if lines else None


def job_states(job_ids: Iterable[str]) -> dict[str, str]:
    """The state (``RUNNING``, ``COMPLETED``, ...) of each job SLURM knows, keyed by the id asked for.

    ``squeue`` answers for all jobs at once; a job it does not list is looked up with ``scontrol show job``; ids
    unknown to both are left out.
    """
    ids = [str(j) for j in job_ids]
    if not ids:
        return {}
    listed: dict[str, str] = {}
    try:
        out = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%A|%T", "-j", ",".join(ids)])
    except RuntimeError as e:
        if _UNKNOWN_JOB not in str(e):
            raise
        out = ""
    for line in out.splitlines():
        if line.count("|") == 2:
            name, numeric, state = line.split("|")
            listed[name] = state
            listed.setdefault(numeric, state)
    states = {}
    for jid in ids:
        if jid in listed:
            states[jid] = listed[jid]
        elif (info := job_info(jid)) is not None:
            states[jid] = info.get("JobState", "UNKNOWN")
    return states


def wait_for(job_id: str, until: Iterable[str] | Callable[[dict[str, str]], bool] = FINISHED, *, timeout: float,
             poll: float = 0.5) -> dict[str, str]:
    """Poll ``scontrol show job`` until the job is in one of the states ``until`` (or ``until(info)`` is true).

    Returns the job's record at that moment; TimeoutError, naming the last state seen, when ``timeout`` seconds pass.
    """
    if callable(until):
        predicate, wanted = until, getattr(until, "__name__", "predicate")
    else:
        states = frozenset(until)
        predicate, wanted = (lambda info: info.get("JobState") in states), "/".join(sorted(states))
    deadline = time.monotonic() + timeout
    last = "unknown to SLURM"
    while True:
        info = job_info(job_id)
        if info is not None:
            last = info.get("JobState", "?")
            if predicate(info):
                return info
        if time.monotonic() >= deadline:
            raise TimeoutError(f"job {job_id} not {wanted} after {timeout:g} s (last state: {last})")
        time.sleep(poll)


def requeue(job_id: str) -> None:
    """``scontrol requeue``: stop the job and put it back in the queue (its batch script starts again)."""
    _run(["scontrol", "requeue", str(job_id)])
    log.info("requeued job %s", job_id)


def signal(job_id: str, sig: str = "USR2", full: bool = False) -> None:
    """``scancel --signal=SIG``: signal the job's steps, i.e. the srun-started processes of a submitit job.

    This is what submitit's preemption handler expects (its own ``_interrupt`` does the same). ``full=True`` adds
    ``--full`` and also signals the batch shell, which dies of an untrapped USR1/USR2 and so ends the whole job.
    """
    _run(["scancel", f"--signal={sig}", *(["--full"] if full else []), str(job_id)])
    log.info("sent SIG%s to job %s", sig.removeprefix("SIG"), job_id)


def cancel(job_id: str) -> None:
    """``scancel``: end the job (pending or running)."""
    _run(["scancel", str(job_id)])
    log.info("cancelled job %s", job_id)
