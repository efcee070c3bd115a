"""`tumorsynth demo`: the whole pipeline on the embedded demo cohort, ending in ``OUT/report.md``.

Steps so far: phantom cohort → prepare (store + PNGs) → store summary. Each step skips work that is already done, so a
re-run of the demo resumes. Later pipeline stages (PGAN, filter, SPADE, segmentation sweep) append their sections.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.atomic import write_bytes
from toolkit.data.phantom import write_cohort
from toolkit.data.prepare import PrepareConfig, prepare
from toolkit.data.store import Store, summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the CPU demo: small enough for minutes on 2 cores, large enough to be a real task."""

    out: Path
    subjects: int = 8
    seed: int = 0
    size: int = 64
    workers: int = 2


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - start
    log.info("demo: %s done in %.1f s", name, timings[name])
    return result


def run_demo(config: DemoConfig) -> Path:
    """Run every step and write the report; returns its path."""
    out = Path(config.out)
    cohort, store_dir = out / "cohort", out / "store"
    timings: dict[str, float] = {}
    if not any(cohort.glob("*/*_seg.nii.gz")):
        _timed(timings, "phantom", lambda: write_cohort(cohort, config.subjects, seed=config.seed,
                                                        workers=config.workers))
    _timed(timings, "prepare", lambda: prepare(PrepareConfig(src=cohort, out=store_dir, size=config.size,
                                                             seed=config.seed, workers=config.workers)))
    info = summary(Store(store_dir))
    report = out / "report.md"
    write_bytes(report, _report(config, info, timings).encode())
    return report


def _report(config: DemoConfig, info: dict[str, Any], timings: dict[str, float]) -> str:
    lines = [
        "# tumorsynth demo report", "",
        f"Cohort: {config.subjects} phantom subjects (seed {config.seed}); store at {config.size}², "
        f"{info['classes']} classes, modality {info['modality']}, intensity max {info['intensity_max']}.", "",
        "## Store", "", "| split | slices | empty masks |", "|---|---:|---:|",
        *(f"| {k} | {v} | {info['empty'][k]} |" for k, v in info["splits"].items()),
        f"| reduced (train prefix) | {info['reduced']} | |", "",
        "Class frequencies (train): "
        + ", ".join(f"{k} {v:.3f}" for k, v in info["class_frequencies"]["train"].items()),
        "", "## Timings", "", "| step | seconds |", "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in timings.items()), "",
    ]
    return "\n".join(lines)
