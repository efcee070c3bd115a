"""Checkpoints: full training state as state_dicts, saved atomically with a ``latest`` pointer, keeping the last K.

``RUN/checkpoints/ckpt-<step>.pt`` files are written with :func:`toolkit.atomic.atomic_path` (temp + fsync + rename),
so every file present is complete; the pointer ``RUN/checkpoints/latest`` is written after the file. GPU runs save in
the background: the state is copied to host memory at once (so training may go on changing the originals) and a
thread writes it while the next steps run; the next save, and the end of the run, wait for it. Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors and plain Python values only, never pickled objects, so
RNG states of numpy and Python are converted to tensors and lists here.
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

    def latest(self) -> Path | None:
        """The newest complete checkpoint: the pointer's target, else the highest-step file present."""
        pointer = self.folder / "latest"
        if pointer.exists():
            target = self.folder / pointer.read_text().strip()
            if target.exists():
                return target
        existing = self._existing()
        return existing[-1][1] if existing else None

    @staticmethod
    def load(path: Path) -> dict[str, Any]:
        """Load a checkpoint onto the CPU, tensors and plain values only."""
        return torch.load(path, map_location="cpu", weights_only=True)


def _to_host(value: Any) -> Any:
    """``value`` with every tensor copied to host memory (nested dicts, lists and tuples, as state_dicts are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_host(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v) for v in value)
    return value
