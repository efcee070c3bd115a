"""Prepare job: a NIfTI cohort → a sharded store (resumable by subject and shard, see toolkit.data.prepare)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jobs.base import Job, store_log_dir
from toolkit.data.prepare import PrepareConfig, prepare, result_json


@dataclasses.dataclass(frozen=True)
class PrepareJob(Job):
    """``tumorsynth prepare SRC OUT`` with the given options."""

    config: PrepareConfig

    def log_dir(self) -> Path:
        return store_log_dir(self.config.out)

    def run(self) -> dict[str, Any]:
        return result_json(prepare(self.config))
