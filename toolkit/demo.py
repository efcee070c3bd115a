"""`tumorsynth demo [--cluster local|slurm]`: the whole pipeline on the embedded demo cohort, ending in
``OUT/report.md`` (:mod:`toolkit.report.demo`): every model's figures and the numbers that show it learned.

Phantom cohort → :func:`toolkit.cluster.pipeline.run_pipeline` with the repository's demo configs (prepare at 64²;
PGAN and SPADE side by side, one core each; SWD of every tick on 2 MPI ranks, synthetic masks from the best tick, the
z-score filter, then the discriminator-score filter, each on 2 MPI ranks, a synthetic MR for every kept mask; then the
Table-1-shaped sweep of configs/sweeps/demo.yaml, 3 class sets × 3 real/synthetic mixes, two members at a time) →
report. On ``slurm`` the
demo queues the same jobs on a cluster (the local one of slurm/local/start.sh, or a real one with ``--profile``) and
waits for them. Every step skips finished work, so a re-run of the demo resumes.

Budget (2 cores, ≤ 15 minutes with the venv): each step's length is set where it teaches something (see the configs'
comments); ``ESTIMATES`` are the steps' wall seconds on the reference 2-core machine, from which the progress lines
estimate what remains.

The filter threshold is the paper's 500 scaled to the demo's size: the norm sums over pixels, so for masks that
deviate alike it grows with the square root of the pixel count (500 × 64/256 = 125 at 64²). A demo-length PGAN can
leave stray pixels on the image border, where every real mask is background (σ = 0), and the strict σ = 0 rule drops
any such mask; the demo floors σ at 0.1 (``--min-std``) and its report gives both drop rates, with the strict rule's
calibration curve.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.atomic import write_bytes, write_json
from toolkit.cluster import slurmctl
from toolkit.cluster.pipeline import PipelineConfig, TrainStep, run_pipeline
from toolkit.cluster.sweep import Sweep
from toolkit.data.phantom import write_cohort
from toolkit.report.demo import render

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the repository's configs/ (make demo runs from it)
PAPER_SIZE, PAPER_THRESHOLD = 256, 500.0
# Wall seconds of each step on the reference 2-core machine (PGAN and SPADE overlap): the progress lines' estimates.
ESTIMATES = {"prepare": 22.0, "pgan-full": 184.0, "spade-full": 230.0, "swd-full": 44.0, "masks-full": 5.0,
             "filter-zscore-full": 2.0, "filter-full": 4.0, "images-full": 9.0, "sweep": 360.0,
             "total": 696.0}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the CPU demo: small enough for minutes on 2 cores, large enough to be a real task."""

    out: Path
    subjects: int = 6  # 744 training slices: each U-Net epoch ~12 s on one core
    # T1ce shows the tumour core, FLAIR the oedema (in T1ce alone it is GM-like: WT Dice stayed ≤ 0.69 however the
    # U-Net was set up; with both, 0.84–0.88); configs/demo-spade.yaml generates both (model.out_channels: 2)
    modality: str = "t1ce,flair"
    # Each volume scaled to a brain median of 1000: the phantom's institutions, like BraTS', differ in gain (here
    # FLAIR brain means 775…4322), which SPADE cannot know from a mask; on raw values its FLAIR lost to the class-mean
    # baseline (L1 271 vs 257), on standardised ones it beats it on every metric and modality
    intensity: str = "volume"
    seed: int = 0
    size: int = 64
    workers: int = 2
    swd_images: int = 512
    masks: int = 1050  # ≈ the real training slices after the filters' ~23 % + ~10 % drops: the mixes stay balanced
    min_std: float = 0.1
    filters: tuple[str, ...] = ("zscore", "dscore")
    dscore_quantile: float = 0.01
    sweep_with: tuple[str, ...] = ("augmentation",)  # the demo sweep's extras: a "real + augmentation" row
    cluster: str = "local"
    profile: str = "local"
    timeout_s: float = 3600.0

    @property
    def threshold(self) -> float:
        return PAPER_THRESHOLD * self.size / PAPER_SIZE


def pipeline_config(config: DemoConfig) -> PipelineConfig:
    """The demo as a pipeline: one (full) branch, the repository's demo configs."""
    return PipelineConfig(out=Path(config.out), cohort=Path(config.out) / "cohort", size=config.size,
                          workers=config.workers, branches=("full",), swd_images=config.swd_images,
                          modality=config.modality, intensity=config.intensity, masks=config.masks,
                          filter=config.filters, threshold=config.threshold, min_std=config.min_std,
                          dscore_quantile=config.dscore_quantile, ranks=2,
                          seed=config.seed, parallel=config.workers, estimates=tuple(ESTIMATES.items()),
                          pgan=TrainStep(CONFIGS / "demo-pgan.yaml"),
                          spade=TrainStep(CONFIGS / "demo-spade.yaml"),
                          sweep=CONFIGS / "sweeps" / "demo.yaml", sweep_with=config.sweep_with,
                          profile=config.profile)


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = fn()
    timings[name] = time.perf_counter() - start
    log.info("demo: %s done in %.1f s", name, timings[name])
    return result


def run_demo(config: DemoConfig) -> Path:
    """Run every step and write the report; returns its path."""
    out = Path(config.out)
    cohort = out / "cohort"
    timings: dict[str, float] = {}
    begin = time.perf_counter()
    if not any(cohort.glob("*/*_seg.nii.gz")):
        _timed(timings, "phantom", lambda: write_cohort(cohort, config.subjects, seed=config.seed,
                                                        workers=config.workers))
    pipeline = pipeline_config(config)
    result = run_pipeline(pipeline, config.cluster)
    timings.update(result["seconds"])
    if config.cluster == "slurm":
        _timed(timings, "queued jobs (slurm)", lambda: _wait(result["jobs"], out / "sweep", config.timeout_s))
    calibration = _timed(timings, "filter calibration", lambda: _calibrate(out, config.threshold,
                                                                                config.dscore_quantile))
    table = Sweep(out / "sweep").report()
    timings["total"] = time.perf_counter() - begin
    timings = _remembered(out / "timings.json", timings)
    report = out / "report.md"
    text = render(out, header=_header(config), table=table, calibration=calibration, threshold=config.threshold,
                  min_std=config.min_std, timings=timings)
    write_bytes(report, text.encode())
    return report


def _remembered(path: Path, timings: dict[str, float]) -> dict[str, float]:
    """This run's step seconds over those of the earlier runs that did the other steps (``OUT/timings.json``): a
    resumed demo reports what each step took when it ran. The total is then the sum of the runs' totals."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    merged = {**earlier, **timings, "total": earlier.get("total", 0.0) + timings["total"]}
    write_json(path, merged)
    return merged


def _header(config: DemoConfig) -> list[str]:
    where = f"SLURM (profile {config.profile})" if config.cluster == "slurm" else "this machine"
    return ["# tumorsynth demo report", "",
            f"The paper's pipeline, end to end, on {config.subjects} phantom subjects (seed {config.seed}) at "
            f"{config.size}², on {where}: prepare → PGAN masks → SWD → Z-score and D-score filters → SPADE images → "
            "the U-Net sweep of Table 1. Networks and schedules are demo-sized (minutes on 2 CPU cores, not the "
            "paper's GPU days); §6 lists what each model had to reach. Numbers are deterministic on one machine; "
            "another CPU gives slightly different floats (see the README).", ""]


def _wait(jobs: dict[str, str], sweep_dir: Path, timeout: float) -> None:
    """Poll the queued jobs until the sweep is finished; fail as soon as a pipeline job fails."""
    deadline = time.monotonic() + timeout
    ids = [j for name, j in jobs.items() if name != "sweep" and j not in ("done", "ran")]
    while True:
        states = slurmctl.job_states(ids) if ids else {}
        failed = {j: s for j, s in states.items() if s in slurmctl.FINISHED and s != "COMPLETED"}
        if failed:
            raise RuntimeError(f"demo: pipeline jobs failed: {failed} (logs under {sweep_dir.parent / '.pipeline'})")
        rows = Sweep(sweep_dir).status()
        if all(r["state"] in ("done", "failed") for r in rows):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"demo: jobs not finished after {timeout:g} s: {[r['state'] for r in rows]}")
        time.sleep(2.0)  # polling the controller and the run directories


def _calibrate(out: Path, threshold: float, dscore_quantile: float | None = None) -> dict[str, Any]:
    """The strict z-score rule's calibration curve (0 … 4 × threshold) and its drop rate at ``threshold``; when the
    pipeline ran the D-score filter (``stores/kept-full`` is its output), its calibration under ``dscore``."""
    import numpy as np
    from mpi4py import MPI

    from toolkit.data.store import Store
    from toolkit.filter import dscore, zscore

    grid = np.linspace(0.0, 4 * threshold, 401)
    doc = zscore.calibrate(out / "store", out / "stores" / "masks-full", out / "calibration", thresholds=grid,
                           comm=MPI.COMM_SELF)
    with open(out / "calibration" / "calibration.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    at_threshold = int(np.argmin(np.abs(grid - threshold)))  # the grid point that is the threshold
    doc = {**doc, "strict_dropped": float(rows[at_threshold]["synthetic_dropped"])}
    kept = Store(out / "stores" / "kept-full").manifest.provenance
    if kept.get("filter") == "dscore" and dscore_quantile is not None:
        doc["dscore"] = dscore.calibrate(out / "store", Path(kept["synthetic"]), out / "calibration-dscore",
                                         real_quantile=dscore_quantile, comm=MPI.COMM_SELF)
    return doc
