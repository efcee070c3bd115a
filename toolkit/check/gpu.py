"""``tumorsynth check gpu``: every GPU path of the toolkit run for real in about 8 minutes, reported as one table.

On a throw-away random 256² store (:mod:`toolkit.bench.random_store`) it trains each model through the real CLI in
subprocesses (the U-Net killed with SIGUSR2 and resumed; the PGAN through every fade up to 256² on a tiny schedule;
SPADE a few steps), evaluates, generates masks and images, runs the benchmarks, counts ``torch.compile`` graph breaks,
and trains under DDP on 2 GPUs when there are 2. Every path has a timeout and a share of the overall budget; a failure
is a FAILED row with its error's last line and never stops the paths that do not depend on it. Throughput targets are
for H100/H200; on other GPUs the figures are printed without a verdict.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from toolkit.bench.random_store import write_random_store
from toolkit.check.process import CheckFailed, cli, interrupted_run, last_line, run, run_json

log = logging.getLogger(__name__)

BUDGET_S = 480.0
JUDGED_GPUS = ("H100", "H200")  # the GPUs the throughput targets were set for


@dataclass(frozen=True)
class Target:
    """A figure's goal: at least (``>=``) or at most (``<=``) ``value``; ``any_gpu`` for device-independent goals."""

    op: str
    value: float
    any_gpu: bool = False

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.op == ">=" else figure <= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass
class Row:
    """One line of the table."""

    path: str
    status: str  # OK, FAILED or SKIPPED
    seconds: float = 0.0
    value: float | None = None
    unit: str = ""
    target: str | None = None
    verdict: str | None = None  # "meets" / "misses"; None where no target applies
    detail: str = ""


@dataclass(frozen=True)
class Scale:
    """Sizes of the check's runs; the defaults are the paper's networks at 256² (the PGAN's narrowed, for time)."""

    size: int = 256
    rows: dict[str, int] = field(default_factory=lambda: {"train": 256, "val": 32, "test": 32})
    unet: dict[str, Any] = field(default_factory=lambda: {"widths": [64, 128, 256, 512], "bridge": 1024})
    spade: dict[str, Any] = field(default_factory=lambda: {"ngf": 64, "ndf": 64, "hidden": 128})
    pgan: dict[str, Any] = field(default_factory=lambda: {"latent": 64, "fmap_base": 512, "fmap_max": 64})
    device: str = "cuda"


def cuda_missing() -> str | None:
    """Why this process cannot run the GPU check (None when it can)."""
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch into this venv "
                f"({sys.prefix})")
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (no GPU, no driver, or CUDA_VISIBLE_DEVICES hides them)"
    return None


class GPUCheck:
    """The paths, run in order into ``out``; :meth:`attempt` turns each into a :class:`Row`."""

    def __init__(self, out: Path, *, budget_s: float = BUDGET_S, scale: Scale | None = None) -> None:
        self.out, self.scale = Path(out), scale or Scale()
        self.deadline = time.monotonic() + budget_s
        cuda = self.scale.device == "cuda"
        self.device_name = torch.cuda.get_device_name(0) if cuda else self.scale.device
        self.gpus = torch.cuda.device_count() if cuda else 0
        self.judged = any(name in self.device_name for name in JUDGED_GPUS)
        self.rows: list[Row] = []
        self.passed: set[str] = set()
        self.store, self.masks = self.out / "store", self.out / "masks"
        self.runs = {model: self.out / f"{model}-run" for model in ("unet", "pgan", "spade")}

    # --- bookkeeping ------------------------------------------------------------------------------------------
    def attempt(self, path: str, action: Callable[[float], tuple[float | None, str]], *, timeout: float,
                unit: str = "", target: Target | None = None, needs: tuple[str, ...] = ()) -> Row:
        """Run ``action(seconds allowed)`` → (figure, note) unless a prerequisite failed or the budget is spent."""
        row = Row(path, "FAILED", unit=unit, target=str(target) if target else None)
        missing = [n for n in needs if n not in self.passed]
        left = self.deadline - time.monotonic()
        if missing:
            row.detail = f"needs {', '.join(missing)}, which did not pass"
        elif left < 10:
            row.status, row.detail = "SKIPPED", "the check's time budget is spent"
        else:
            begin = time.monotonic()
            try:
                row.value, row.detail = action(min(timeout, left))
                row.status = "OK"
                self.passed.add(path)
            except CheckFailed as exc:
                row.detail = str(exc)
            except Exception as exc:  # a bug in a path must not stop the others
                row.detail = last_line(f"{type(exc).__name__}: {exc}")
            row.seconds = time.monotonic() - begin
        if row.status == "OK" and target and row.value is not None and (self.judged or target.any_gpu):
            row.verdict = "meets" if target.met(row.value) else "misses"
        log.info("%s: %s %s", path, row.status, row.detail)
        self.rows.append(row)
        return row

    def skip(self, path: str, why: str) -> None:
        self.rows.append(Row(path, "SKIPPED", detail=why))

    def _config(self, name: str, doc: dict[str, Any]) -> Path:
        path = self.out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    # --- the paths --------------------------------------------------------------------------------------------
    def run_all(self) -> list[Row]:
        s, dev = self.scale, self.scale.device
        self.attempt("random store", self.write_store, timeout=120)
        self.attempt("train unet: SIGUSR2 + resume", self.train_unet, timeout=180, needs=("random store",))
        self.attempt("evaluate unet", self.evaluate_unet, timeout=90, unit="% Dice error",
                     needs=("train unet: SIGUSR2 + resume",))
        self.attempt(f"train pgan: fades to {s.size}²", self.train_pgan, timeout=180, needs=("random store",))
        self.attempt("evaluate swd", self.evaluate_swd, timeout=90, unit="SWD×1e3",
                     needs=(f"train pgan: fades to {s.size}²",))
        self.attempt("generate masks", self.generate_masks, timeout=60, needs=("evaluate swd",))
        self.attempt("train spade", self.train_spade, timeout=150, needs=("random store",))
        self.attempt("generate images", self.generate_images, timeout=60, needs=("train spade", "generate masks"))
        for batch, goal in ((8, 900), (64, 1400)):
            self.attempt(f"bench unet --trainer, batch {batch}", lambda t, b=batch: self.bench_unet(t, b),
                         timeout=120, unit="img/s", target=Target(">=", goal))
        self.attempt("bench spade, batch 16", lambda t: self.bench(t, ["spade", "--batch", "16"], "img_per_s"),
                     timeout=120, unit="img/s", target=Target(">=", 180))
        self.attempt("bench pgan", lambda t: self.bench(t, ["pgan"], "projected_hours"), timeout=150,
                     unit="h projected", target=Target("<=", 12))
        self.attempt("bench swd, 16,384 masks", lambda t: self.bench(t, ["swd", "--images", "16384"], "seconds"),
                     timeout=120, unit="s", target=Target("<=", 30))
        self.attempt("torch.compile unet", self.compile_unet, timeout=240, unit="graph breaks",
                     target=Target("<=", 0, any_gpu=True))
        if self.gpus >= 2:
            self.attempt("ddp unet, 2 GPUs", self.ddp_unet, timeout=150, unit="img/s")
        else:
            self.skip("ddp unet, 2 GPUs", f"{self.gpus} GPU visible on {dev}; DDP needs 2")
        return self.rows

    def write_store(self, timeout: float) -> tuple[None, str]:
        # two modalities, as the demo's store: the U-Net's per-slice normalisation and SPADE's per-channel scales run
        write_random_store(self.store, size=self.scale.size, rows=self.scale.rows, modalities=("t1ce", "flair"))
        return None, ", ".join(f"{k} {v}" for k, v in self.scale.rows.items())

    def train_unet(self, timeout: float) -> tuple[None, str]:
        config = self._config("unet", {
            "data": {"real": str(self.store), "classes": 7, "workers": 2, "normalise": "slice"},
            "model": self.scale.unet,
            "optim": {"lr": 1e-4, "batch": 8},
            # 4 epochs of 32 steps with a checkpoint every 8: the signal lands well before the end
            "loop": {"epochs": 4, "checkpoint_every_steps": 8, "checkpoint_every_minutes": 0.0, "log_every_steps": 8},
            "runtime": {"device": self.scale.device}, "seed": 0})
        cmd = cli("train", "unet", "-c", str(config), "--run-dir", str(self.runs["unet"]))
        begin = time.monotonic()
        interrupted_run(cmd, self.runs["unet"], timeout)
        resumed = run(cmd, timeout - (time.monotonic() - begin))
        if "resumed from" not in resumed.stderr:
            raise CheckFailed("the second run did not resume from the SIGUSR2 checkpoint")
        return None, last_line(resumed.stdout)

    def evaluate_unet(self, timeout: float) -> tuple[float, str]:
        doc = run_json(cli("evaluate", "unet", str(self.runs["unet"]), "--device", self.scale.device, "--json"),
                       timeout)
        return doc["dice_error_percent"], f"regions {doc.get('regions')}"

    def train_pgan(self, timeout: float) -> tuple[None, str]:
        size = self.scale.size
        config = self._config("pgan", {"data": {"store": str(self.store)},
                                       "model": {"resolution": size, **self.scale.pgan},
                                       "loop": {"checkpoint_every_minutes": 0.0, "log_every_steps": 20},
                                       "runtime": {"device": self.scale.device}, "samples": 4})
        fades = size.bit_length() - 3  # 4² → size²
        # 1 kimg of training and 1 of fading per resolution, minibatch 16, a tick (and snapshot) per kimg
        schedule = [f"schedule.total_kimg={2 * fades + 1}", "schedule.lod_training_kimg=1",
                    "schedule.lod_transition_kimg=1", "schedule.minibatch={}", "schedule.minibatch_default=16",
                    "schedule.tick_kimg={}", "schedule.tick_kimg_default=1"]
        overrides = [arg for item in schedule for arg in ("--set", item)]
        plan = run_json(cli("train", "pgan", "-c", str(config), "--dry-schedule", "--json", *overrides), 60)
        if str(size) not in plan["per_resolution"]:
            raise CheckFailed(f"the schedule stops before {size}²: {sorted(plan['per_resolution'], key=int)}")
        run(cli("train", "pgan", "-c", str(config), "--run-dir", str(self.runs["pgan"]), *overrides), timeout)
        snapshots = sorted((self.runs["pgan"] / "snapshots").glob("tick-*.pt"))
        if len(snapshots) < plan["ticks"]:
            raise CheckFailed(f"{len(snapshots)} snapshots for {plan['ticks']} ticks")
        return None, f"{plan['ticks']} ticks, {plan['total_kimg']} kimg"

    def evaluate_swd(self, timeout: float) -> tuple[float, str]:
        doc = run_json(cli("evaluate", "swd", str(self.runs["pgan"]), "--images", "256", "--device",
                           self.scale.device, "--json"), timeout)
        return doc["best_swd_avg"], f"best {doc['best']} of {doc['snapshots']} snapshots"

    def generate_masks(self, timeout: float) -> tuple[None, str]:
        done = run(cli("generate", "masks", str(self.runs["pgan"]), "--n", "64", "--out", str(self.masks),
                       "--snapshot", "best", "--device", self.scale.device), timeout)  # best: evaluate swd's pick
        return None, last_line(done.stdout)

    def train_spade(self, timeout: float) -> tuple[None, str]:
        config = self._config("spade", {
            # the reduced prefix (a fifth of the rows) at batch 16: a few steps, then the epoch's sample grid
            "data": {"store": str(self.store), "reduced": True, "workers": 2},
            "model": {"resolution": self.scale.size, "label_nc": 7, "out_channels": 2, **self.scale.spade},
            "optim": {"batch": 16}, "loop": {"epochs": 1, "checkpoint_every_minutes": 0.0, "log_every_steps": 1},
            "runtime": {"device": self.scale.device}, "samples": 4})
        done = run(cli("train", "spade", "-c", str(config), "--run-dir", str(self.runs["spade"])), timeout)
        if not (self.runs["spade"] / "generator.pt").exists():
            raise CheckFailed("finished without generator.pt")
        return None, last_line(done.stdout)

    def generate_images(self, timeout: float) -> tuple[None, str]:
        done = run(cli("generate", "images", str(self.runs["spade"]), "--masks", str(self.masks), "--out",
                       str(self.out / "images"), "--device", self.scale.device), timeout)
        return None, last_line(done.stdout)

    def bench_doc(self, timeout: float, args: list[str], key: str) -> dict[str, Any]:
        """``bench ARGS --json`` on the check's device; its object, which must hold ``key``."""
        doc = run_json(cli("bench", *args, "--device", self.scale.device, "--json"), timeout)
        if key not in doc:
            raise CheckFailed(f"bench {args[0]} printed no {key!r} (keys: {', '.join(doc)})")
        return doc

    def bench(self, timeout: float, args: list[str], key: str) -> tuple[float, str]:
        doc = self.bench_doc(timeout, args, key)
        return doc[key], doc.get("precision", "")

    def bench_unet(self, timeout: float, batch: int) -> tuple[float, str]:
        doc = self.bench_doc(timeout, ["unet", "--trainer", "--batch", str(batch), "--steps", "20", "--size",
                                       str(self.scale.size)], "trainer_img_per_s")
        return doc["trainer_img_per_s"], _mfu_note(doc)

    def compile_unet(self, timeout: float) -> tuple[float, str]:
        doc = run_json([sys.executable, "-m", "toolkit.check.graph_breaks", "--device", self.scale.device,
                        "--size", str(self.scale.size)], timeout)
        reasons = f"; first break: {doc['break_reasons'][0]}" if doc["break_reasons"] else ""
        return doc["graph_breaks"], (f"{doc['graphs']} graphs, compiled step {doc['compiled_step_seconds']:.0f} s "
                                     f"({doc['precision']}){reasons}")

    def ddp_unet(self, timeout: float) -> tuple[float, str]:
        doc = run_json([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "toolkit.cli", "bench", "unet", "--trainer", "--dist", "ddp", "--device", "cuda",
                        "--batch", "16", "--steps", "20", "--size", str(self.scale.size), "--json"], timeout)
        if doc.get("ranks") != 2:
            raise CheckFailed(f"ran on {doc.get('ranks')} ranks, not 2")
        return doc["trainer_img_per_s"], f"2 ranks on {doc['hosts']} host(s), {_mfu_note(doc)}"


def _mfu_note(doc: dict[str, Any]) -> str:
    mfu = doc.get("mfu")
    share = "mfu n/a (GPU not in toolkit/bench/peak.py)" if mfu is None else f"mfu {mfu:.3f}"
    return f"{share}, {doc.get('trainer_precision')}, model step {doc.get('img_per_s', 0):.0f} img/s"


def check_gpu(out: Path, *, budget_s: float = BUDGET_S, scale: Scale | None = None) -> dict[str, Any]:
    """Run every path into ``out`` (created; must be empty) and return the ``check gpu --json`` object."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty; the check needs a fresh folder (its runs would resume)")
    out.mkdir(parents=True, exist_ok=True)
    begin = time.monotonic()
    check = GPUCheck(out, budget_s=budget_s, scale=scale)
    rows = check.run_all()
    return {"device": check.device_name, "gpus": check.gpus, "targets_judged": check.judged,
            "ok": all(r.status != "FAILED" for r in rows), "seconds": time.monotonic() - begin, "out": str(out),
            "rows": [asdict(r) for r in rows]}


def table(doc: dict[str, Any]) -> str:
    """The check's object as a plain-text table, one path per line."""
    lines = [f"GPU check on {doc['device']} ({doc['gpus']} visible), {doc['seconds']:.0f} s, in {doc['out']}"]
    if not doc["targets_judged"]:
        lines.append(f"(targets are for {'/'.join(JUDGED_GPUS)}: figures shown without a verdict)")
    lines.append(f"{'path':34s} {'status':7s} {'figure':>10s} {'unit':14s} {'target':>8s} {'verdict':7s} "
                 f"{'s':>5s}  detail")
    for r in doc["rows"]:
        figure = "" if r["value"] is None else f"{r['value']:.4g}"
        lines.append(f"{r['path'][:34]:34s} {r['status']:7s} {figure:>10s} {r['unit'][:14]:14s} "
                     f"{r['target'] or '':>8s} {r['verdict'] or '':7s} {r['seconds']:5.0f}  {r['detail']}")
    failed = sum(r["status"] == "FAILED" for r in doc["rows"])
    lines.append("all paths OK" if doc["ok"] else f"{failed} path(s) FAILED")
    return "\n".join(lines)
