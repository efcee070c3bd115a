"""``python -m jobs JOB.pkl``: run a pickled job here, e.g. on every rank of ``mpirun -n K`` (MPI steps of a local
pipeline, where no SLURM ``srun`` starts the ranks). Unpickling runs code, so the file and its folder must be this
user's and writable by no one else (:func:`toolkit.cluster.private.check_private`)."""

from __future__ import annotations

import logging
import pickle
import sys
from pathlib import Path

from toolkit.cluster.private import UnsafeFolder, check_private


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m jobs JOB.pkl", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    path = Path(argv[0])
    try:
        check_private(path.parent)
        check_private(path)
    except (UnsafeFolder, FileNotFoundError) as err:
        print(f"python -m jobs: {err}", file=sys.stderr)
        return 2
    with open(path, "rb") as handle:
        job = pickle.load(handle)
    job()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
