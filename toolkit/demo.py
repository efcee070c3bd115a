"""`tumorsynth demo`: the whole pipeline on the embedded demo cohort, ending in ``OUT/report.md``.

Steps so far: phantom cohort → prepare (store + PNGs) → store summary → a small U-Net trained on the real store and
evaluated on its test split → a small PGAN → SWD of every tick on 2 MPI ranks → synthetic masks from the best tick.
The demo runs the repository's configs/demo.yaml and configs/demo-pgan.yaml with the demo store filled in. Each step
skips work that is already done, so a re-run of the demo resumes. Later stages (filter, SPADE, the Table-1 sweep)
append their sections.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.atomic import write_bytes
from toolkit.data.phantom import write_cohort
from toolkit.data.prepare import PrepareConfig, prepare
from toolkit.data.store import Manifest, Store, summary
from toolkit.mpi import clean_environment, mpirun_command
from toolkit.train.generate import generate_masks
from toolkit.train.pgan_eval import evaluate_snapshots
from toolkit.train.run import train
from toolkit.train.unet_eval import evaluate_run

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # the repository's configs/ (make demo runs from it)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the CPU demo: small enough for minutes on 2 cores, large enough to be a real task."""

    out: Path
    subjects: int = 8
    seed: int = 0
    size: int = 64
    workers: int = 2
    unet_epochs: int = 3
    swd_images: int = 512
    masks: int = 1000


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
    store = str(store_dir.resolve())
    unet_dir, pgan_dir = out / "runs" / "unet-7class", out / "runs" / "pgan"
    _timed(timings, "train unet", lambda: train("unet", CONFIGS / "demo.yaml", (
        f"data.real={store}", f"loop.epochs={config.unet_epochs}", f"runtime.threads={config.workers}"), unet_dir))
    evaluation = _timed(timings, "evaluate unet", lambda: evaluate_run(unet_dir))
    _timed(timings, "train pgan", lambda: train("pgan", CONFIGS / "demo-pgan.yaml", (
        f"data.store={store}", f"runtime.threads={config.workers}"), pgan_dir))
    swd = _timed(timings, "evaluate swd", lambda: _evaluate_swd(pgan_dir, config))
    masks = _timed(timings, "generate masks", lambda: generate_masks(pgan_dir, config.masks, out / "synthetic-masks"))
    report = out / "report.md"
    write_bytes(report, _report(config, info, evaluation, swd, masks, timings).encode())
    return report


def _evaluate_swd(run_dir: Path, config: DemoConfig) -> dict[str, Any]:
    """SWD of every PGAN snapshot, on 2 MPI ranks when OpenMPI's mpirun is there (as on a cluster), else in-process."""
    args = ["evaluate", "swd", str(run_dir), "--images", str(config.swd_images), "--json"]
    if shutil.which("mpirun") is None:
        log.warning("demo: mpirun not found; scoring the snapshots in this process")
        return evaluate_snapshots(run_dir, images=config.swd_images)
    done = subprocess.run(mpirun_command(2, *args), env=clean_environment(), capture_output=True, text=True,
                          check=False)
    if done.returncode:
        raise RuntimeError(f"evaluate swd under mpirun failed:\n{done.stderr}")
    return json.loads(done.stdout)


def _report(config: DemoConfig, info: dict[str, Any], evaluation: dict[str, Any], swd: dict[str, Any],
            masks: Manifest, timings: dict[str, float]) -> str:
    lines = [
        "# tumorsynth demo report", "",
        f"Cohort: {config.subjects} phantom subjects (seed {config.seed}); store at {config.size}², "
        f"{info['classes']} classes, modality {info['modality']}, intensity max {info['intensity_max']}.", "",
        "## Store", "", "| split | slices | empty masks |", "|---|---:|---:|",
        *(f"| {k} | {v} | {info['empty'][k]} |" for k, v in info["splits"].items()),
        f"| reduced (train prefix) | {info['reduced']} | |", "",
        "Class frequencies (train): "
        + ", ".join(f"{k} {v:.3f}" for k, v in info["class_frequencies"]["train"].items()),
        "", "## Segmentation (7 classes, real data only)", "",
        f"U-Net (widths 8–64, {config.unet_epochs} epochs) on {evaluation['slices']} test slices: "
        f"**Dice error {evaluation['dice_error_percent']:.2f} %** (100 × weighted soft Dice loss, Table 1's measure).",
        "", "Per-class Dice: " + ", ".join(f"{v:.3f}" for v in evaluation["per_class_dice"]),
        "", "Regions: " + ", ".join(f"{k} {v:.3f}" for k, v in evaluation["regions"].items()),
        "", "Figure: runs/unet-7class/figures/eval-test.png", "",
        "## Mask generator (PGAN, 32², configs/demo-pgan.yaml)", "",
        f"{swd['snapshots']} tick snapshots scored by SWD on {swd['ranks']} MPI rank(s) ({config.swd_images} images); "
        f"best: **{swd['best']}** (SWD ×1e3 avg {swd['best_swd_avg']:.2f}), see runs/pgan/swd.png and "
        f"runs/pgan/samples/{swd['best']}.png.", "",
        f"Generated {masks.splits['train'].n} synthetic masks into synthetic-masks/ (from "
        f"{masks.provenance['snapshot']}).", "", "## Timings", "", "| step | seconds |", "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in timings.items()), "",
    ]
    return "\n".join(lines)
