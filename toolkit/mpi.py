"""MPI from Python: the communicator of the MPI tools, the ``mpirun`` command line and an environment it can start from.

A process that has initialised MPI itself (mpi4py as a singleton) carries OMPI_/PMIX_/PRTE_ variables; a child
``mpirun`` inheriting them believes it already runs inside a job and exits without a word, so they are removed.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def mpirun_prefix(ranks: int) -> list[str]:
    """``mpirun -n RANKS`` (root-safe, oversubscribed for small nodes), to put before a program and its arguments."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun not found: install OpenMPI (make test/demo install openmpi-bin as root)")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, *root, "--oversubscribe", "-n", str(ranks)]


def mpirun_command(ranks: int, *args: str) -> list[str]:
    """``mpirun -n RANKS python -m toolkit.cli ARGS``."""
    return [*mpirun_prefix(ranks), sys.executable, "-m", "toolkit.cli", *args]


def clean_environment() -> dict[str, str]:
    """This process's environment without the variables of an MPI job it may be part of."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PRTE_"))}


def world(comm: Any = None) -> Any:
    """``comm``, or ``MPI.COMM_WORLD`` (a one-rank singleton outside a launcher). mpi4py is imported here, lazily:
    importing a module of the MPI tools must not initialise MPI."""
    if comm is None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
    return comm


def from_root(comm: Any, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 only and let every rank know how it went: rank 0 gets its result, the others None.

    If ``fn`` raised (a held lock, changed options), every rank raises: rank 0 the exception itself, the others a
    copy, broadcast. Without this a rank that gave up would leave the others waiting in their next collective (and
    its own ``MPI_Finalize`` waiting for them): a hang instead of an error.
    """
    result, error, shared = None, None, None
    if comm.Get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # raised below, once the other ranks know
            error = shared = exc
            try:
                pickle.dumps(exc)
            except Exception:  # an unpicklable exception travels as its type name and message
                shared = RuntimeError(f"{type(exc).__name__}: {exc}")
    shared = comm.bcast(shared, root=0)
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result
