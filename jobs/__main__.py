"""``python -m jobs JOB.pkl``: run a pickled job here, e.g. on every rank of ``mpirun -n K`` (MPI steps of a local
pipeline, where no SLURM ``srun`` starts the ranks)."""

from __future__ import annotations

import logging
import pickle
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m jobs JOB.pkl", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    with open(argv[0], "rb") as handle:
        job = pickle.load(handle)
    job()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
