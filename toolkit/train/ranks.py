"""Writing one store's shards from several MPI ranks: shard i on rank i % size, rank 0 finishes the store.

Used by `generate masks` and `generate images` (run plainly, or under ``mpirun -n K`` / ``srun --mpi=pmix``). Every
shard is a pure function of its index (seeded latents, or the input shard of the same number), so the shard files —
and their checksums — do not depend on which rank wrote them nor on the rank count.

Progress logging, so that a killed multi-rank generation still resumes by shard: :class:`StoreWriter`'s
``.progress.jsonl`` has exactly one writer, rank 0 (appends from several processes to one file are not atomic on
every filesystem, NFS and Lustre included). Every other rank r logs the shards it finishes in its own file
``.progress-rank-<r>.jsonl``, in the same line format, so no file has two writers. Rank 0 *adopts* those records —
re-verifies each shard's checksum against the file on disk, records it in its own log, then deletes the rank file —
once before any rank starts (records of a killed run, whatever its rank count) and once after the final barrier.
Between the two adoptions the rank files are written by their ranks only. Shard files themselves are written
atomically (temporary sibling, rename), so a kill never leaves a torn shard behind.

One writer, one set of options: :func:`open_store` has rank 0 take the store's lock (held by its
:class:`StoreWriter` for the whole run, on behalf of every rank) and check the options and input fingerprints the
store records, after checking that every rank computed the same ones (each rank loaded its inputs itself). When rank
0 cannot open the store (another writer holds it, other options), every rank raises that error at once
(:func:`toolkit.mpi.from_root`) instead of waiting in a collective for a rank that has given up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from toolkit.data.store import Manifest, ShardInfo, StoreWriter, complete, sha256_file, shard_name, write_shard
from toolkit.mpi import from_root

log = logging.getLogger(__name__)

RANK_LOG = ".progress-rank-{rank}.jsonl"

Shard = tuple[str, int]  # (split, index)


def open_store(out: Path, classes: int, options: dict[str, Any],
               comm: Any) -> tuple[bool, Manifest | StoreWriter | None]:
    """Open the store ``out`` for writing with ``options``; collective over ``comm``.

    Returns ``(complete, got)`` on every rank: ``complete`` is True when the store is already complete with these
    options (``got`` is then its manifest on rank 0), else ``got`` is rank 0's :class:`StoreWriter` (holding the
    store's lock); other ranks get None. Raises on every rank when the ranks disagree on ``options``, a complete store
    was made with other ones, another writer holds the store, or a partial one was started with other options.
    """
    gathered = comm.allgather(options)  # the same check on every rank, so that all of them stop or none
    first = gathered[0]
    differ = sorted({key for theirs in gathered for key in {*theirs, *first} if theirs.get(key) != first.get(key)})
    if differ:
        raise ValueError(f"{out}: the ranks loaded different inputs ({', '.join(differ)} differ between ranks); did "
                         "one change while they loaded it?")

    def claim() -> Manifest | StoreWriter:
        manifest = complete(out, options)
        return manifest if manifest is not None else StoreWriter(out, classes=classes, options=options)

    got = from_root(comm, claim)
    done = comm.bcast(isinstance(got, Manifest), root=0)
    return done, got


def write_shards(writer: StoreWriter | None, out: Path, classes: int, shards: Sequence[Shard],
                 make: Callable[[str, int], dict[str, Any]], comm: Any) -> StoreWriter | None:
    """Write every shard of ``shards`` not finished earlier; collective over ``comm``.

    ``writer`` is rank 0's, from :func:`open_store` (None on the other ranks). Shard i is computed on rank i % size by
    ``make(split, index)``, which returns :func:`write_shard`'s keyword arguments. Returns, after a barrier, rank 0's
    writer with every shard recorded, ready for :meth:`StoreWriter.finish`; other ranks get None.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if writer:
        _adopt(writer)
    finished = comm.bcast({s for s in shards if writer.done(*s)} if writer else None, root=0)
    mine = [s for i, s in enumerate(shards) if i % size == rank and s not in finished]
    for split, index in tqdm(mine, desc=f"shards (rank {rank}/{size})", disable=None if rank == 0 else True):
        rows = make(split, index)
        if writer:
            writer.write(split, index, **rows)
        else:
            _append(out / RANK_LOG.format(rank=rank), split, index,
                    write_shard(out / shard_name(split, index), classes=classes, **rows))
    comm.Barrier()  # every rank's shards and records are on disk
    if writer:
        _adopt(writer)
    return writer


def _append(log_path: Path, split: str, index: int, info: ShardInfo) -> None:
    """One progress record, in :meth:`StoreWriter.record`'s line format, durably appended to this rank's own log."""
    with open(log_path, "a") as handle:
        handle.write(json.dumps({"split": split, "index": index, "info": dataclasses.asdict(info)}) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _records(log_path: Path) -> Iterator[tuple[str, int, ShardInfo]]:
    for line in log_path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-append: its shard is simply redone
        yield entry["split"], entry["index"], ShardInfo.from_dict(entry["info"])


def _adopt(writer: StoreWriter) -> None:
    """Move the other ranks' records into rank 0's log, each shard's checksum verified first."""
    for log_path in sorted(writer.root.glob(RANK_LOG.format(rank="*"))):
        for split, index, info in _records(log_path):
            path = writer.root / info.file
            if path.exists() and sha256_file(path) == info.sha256:
                writer.record(split, index, info)
            else:
                log.warning("%s: shard %s failed its checksum; it will be rewritten", writer.root, info.file)
        log_path.unlink()  # after recording: a kill in between only makes the next run adopt the file again
