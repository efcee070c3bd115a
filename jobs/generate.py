"""Generation jobs: PGAN masks into a mask store, SPADE images for a mask store (both resumable by shard, refusing
a resume or a complete store made with other options or inputs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jobs.base import Job, store_log_dir
from toolkit.train.generate import generate_masks
from toolkit.train.synthesis import generate_images


@dataclasses.dataclass(frozen=True)
class GenerateMasksJob(Job):
    """``tumorsynth generate masks RUN --n N --out OUT`` (from the snapshot `evaluate swd` picked by default)."""

    run_dir: Path
    n: int
    out: Path
    snapshot: str = "best"
    seed: int = 0

    def log_dir(self) -> Path:
        return store_log_dir(self.out)

    def run(self) -> dict[str, Any]:
        manifest = generate_masks(Path(self.run_dir), self.n, Path(self.out), snapshot=self.snapshot, seed=self.seed)
        return {} if manifest is None else {"store": str(self.out), "n": manifest.splits["train"].n}  # None: rank > 0


@dataclasses.dataclass(frozen=True)
class GenerateImagesJob(Job):
    """``tumorsynth generate images SPADE_RUN --masks MASKS --out OUT``."""

    run_dir: Path
    masks: Path
    out: Path

    def log_dir(self) -> Path:
        return store_log_dir(self.out)

    def run(self) -> dict[str, Any]:
        manifest = generate_images(Path(self.run_dir), Path(self.masks), Path(self.out))
        return {} if manifest is None else {"store": str(self.out), "n": {k: v.n for k, v in manifest.splits.items()}}
