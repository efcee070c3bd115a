"""Checkpoints: full training state as state_dicts, saved atomically with a ``latest`` pointer, keeping the last K.

``RUN/checkpoints/ckpt-<step>.pt`` files are written with :func:`toolkit.atomic.atomic_path` (temp + fsync + rename),
so every file present is complete; the pointer ``RUN/checkpoints/latest`` is written after the file. GPU runs save in
the background: the state is copied to host memory at once (so training may go on changing the originals) and a
thread writes it while the next steps run; the next save, and the end of the run, wait for it. Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors and plain Python values only, never pickled objects, so
RNG states of numpy and Python are converted to tensors and lists here.

Resuming takes the newest checkpoint that loads (:meth:`Checkpoints.load_newest`): a file torn by a failing disk or a
partial copy is skipped with a warning, and only ``ckpt-<step>.pt`` files of the folder itself are ever read, whatever
the pointer says.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.atomic import atomic_path, write_bytes
from toolkit.train.errors import CheckpointError

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, numpy, torch (and CUDA when present), as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved, visible = list(state["cuda"]), torch.cuda.device_count()
        if len(saved) != visible:
            # a run saved on a node with another GPU count (SLURM binds one GPU per task on some clusters): restore
            # the GPUs both have; a GPU without a saved state keeps its seed
            log.warning("checkpoint holds CUDA RNG states of %d GPUs, this process sees %d: restoring %d",
                        len(saved), visible, min(len(saved), visible))
        for index, gpu_state in enumerate(saved[:visible]):
            torch.cuda.set_rng_state(gpu_state, index)


class Checkpoints:
    """The checkpoint folder of one run."""

    def __init__(self, run_dir: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.folder = Path(run_dir) / "checkpoints"
        self.keep = keep
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def _existing(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m[1]), p) for p in self.folder.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def save(self, state: dict[str, Any], step: int, *, background: bool = False) -> Path:
        """Write ``state`` as the checkpoint of ``step``, point ``latest`` at it and prune beyond the last K; with
        ``background``, from a copy in host memory on a writer thread (see :meth:`wait`)."""
        self.wait()
        path = self.folder / f"ckpt-{step:09d}.pt"
        if not background:
            self._write(state, path)
            return path
        host = _to_host(state)
        self._writer = threading.Thread(target=self._write_catching, args=(host, path), name="checkpoint-writer")
        self._writer.start()
        return path

    def wait(self) -> None:
        """Block until a background save has finished; raise what it raised."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _write_catching(self, state: dict[str, Any], path: Path) -> None:
        try:
            self._write(state, path)
        except BaseException as exc:  # re-raised by wait(), on the training thread
            self._error = exc

    def _write(self, state: dict[str, Any], path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        write_bytes(self.folder / "latest", f"{path.name}\n".encode())
        for _, old in self._existing()[:-self.keep]:
            old.unlink(missing_ok=True)

    def _pointed(self) -> Path | None:
        """The file the ``latest`` pointer names, when it names a ``ckpt-<step>.pt`` of this folder: a pointer holding
        a path (``../x.pt``, ``/abs/x.pt``), another name or unreadable bytes is ignored with a warning."""
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        try:
            name = pointer.read_text().strip()
        except (OSError, UnicodeDecodeError) as err:
            log.warning("%s: unreadable (%s); ignoring the pointer", pointer, err)
            return None
        if not _NAME.match(name):
            log.warning("%s: names %r, not a ckpt-<step>.pt file of %s; ignoring the pointer", pointer, name[:200],
                        self.folder)
            return None
        return self.folder / name

    def candidates(self) -> list[Path]:
        """The checkpoints to resume from, in the order to try them: the pointer's target, then the others by step,
        newest first. Symbolic links are left out: every checkpoint is a file written here, and a link may lead out of
        the run directory."""
        pointed = self._pointed()
        found = [path for _, path in reversed(self._existing())]
        if pointed in found:
            found.remove(pointed)
            found.insert(0, pointed)
        links = [path for path in found if path.is_symlink()]
        for link in links:
            log.warning("%s: a symbolic link, not a checkpoint written here; ignoring it", link)
        return [path for path in found if path not in links]

    def latest(self) -> Path | None:
        """The newest checkpoint present (the first of :meth:`candidates`), loadable or not."""
        found = self.candidates()
        return found[0] if found else None

    def load_newest(self, *, set_aside: bool = False) -> tuple[Path, dict[str, Any]] | None:
        """The first of :meth:`candidates` that loads, with its state; None when there is no checkpoint.

        Each file that does not load is skipped with a warning naming it and the error. With ``set_aside`` (the
        run's writer), the skipped files are renamed ``<name>.unloadable`` once one has loaded: kept for inspection,
        but out of the way of pruning, which keeps the K highest steps and would otherwise delete the run's new
        checkpoints in favour of a torn one of a higher step. Checkpoints that exist but none of which loads raise
        :class:`CheckpointError` naming each; they are left as they are (the error may be the file system's, and
        starting over would silently throw the run's progress away).
        """
        failed: list[tuple[Path, str]] = []
        for path in self.candidates():
            try:
                state = self.load(path)
                if not isinstance(state, dict):
                    raise TypeError(f"holds a {type(state).__name__}, not a training state")
            except Exception as err:  # anything a torn, truncated or foreign file makes torch.load raise
                reason = _first_line(err)
                log.warning("%s: cannot load (%s); trying an older checkpoint", path, reason)
                failed.append((path, reason))
                continue
            if set_aside:
                for bad, _ in failed:
                    bad.rename(bad.with_name(bad.name + ".unloadable"))
                    log.warning("%s: set aside as %s.unloadable", bad, bad.name)
            return path, state
        if failed:
            tried = "; ".join(f"{path.name}: {reason}" for path, reason in failed)
            raise CheckpointError(f"{self.folder}: no checkpoint loads ({tried}); move the folder away to start "
                                  "the run over")
        return None

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        """Load a checkpoint onto the CPU, tensors and plain values only."""
        return torch.load(path, map_location="cpu", weights_only=True)


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message``: torch's load errors run over many lines."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _to_host(value: Any) -> Any:
    """``value`` with every tensor copied to host memory (nested dicts, lists and tuples, as state_dicts are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value
