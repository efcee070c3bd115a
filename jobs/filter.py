"""Filter job: one MPI-parallel filter stage (z-score or discriminator score) across the job's tasks
(``srun --mpi=pmix``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jobs.base import Job, store_log_dir


@dataclasses.dataclass(frozen=True)
class FilterJob(Job):
    """``tumorsynth filter zscore|dscore --real REAL --synthetic SYNTHETIC --out OUT``; a complete output made with the
    same options is kept (with other ones the job fails, naming them). ``threshold``, ``reduced`` and ``min_std`` are
    the z-score filter's; the D-score filter takes ``threshold`` if given, else the ``real_quantile`` rule. A stage
    that keeps no mask fails (the steps after it would have nothing to work on); its CSV holds every score."""

    real: Path
    synthetic: Path
    out: Path
    method: str = "zscore"
    threshold: float | None = 500.0
    reduced: bool = False
    min_std: float = 0.0
    real_quantile: float = 0.01

    def log_dir(self) -> Path:
        return store_log_dir(self.out)

    def run(self) -> dict[str, Any]:
        summary = self._filter(Path(self.real), Path(self.synthetic), Path(self.out))
        if summary and not summary["kept"]:  # rank 0 holds the summary
            raise RuntimeError(f"{self.out}: the {self.method} filter kept none of {summary['dropped']} masks "
                               f"(threshold {summary['threshold']}); every score is in {summary['csv']}. Move "
                               f"{self.out} away and rerun with a threshold that keeps some")
        return summary

    def _filter(self, real: Path, synthetic: Path, out: Path) -> dict[str, Any]:
        if self.method == "dscore":
            from toolkit.filter.dscore import filter_store

            return filter_store(real, synthetic, out, threshold=self.threshold, real_quantile=self.real_quantile)
        from toolkit.filter.zscore import filter_store

        return filter_store(real, synthetic, out, threshold=self.threshold, reduced=self.reduced,
                            min_std=self.min_std)
