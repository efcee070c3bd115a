"""The one training-loop shape: resume → epochs of steps with periodic checkpoints → validation → DONE.

Trainers (U-Net, PGAN, SPADE) implement :class:`Task`; the loop owns everything else: resuming from the newest
complete checkpoint, deterministic positioning inside an epoch, periodic (steps or minutes) and end-of-epoch
checkpoints, ``best.pt`` whenever validation improves, metrics.jsonl / TensorBoard / tqdm, and stopping on SIGUSR2 or
SIGTERM (save now, report "preempted") for the job layer to requeue. An "epoch" is the task's outer unit: a pass over
the data for the U-Net and SPADE, a tick for the PGAN.

Resume is bit-identical on CPU because the task's batch order is a pure function of (seed, epoch) and the checkpoint
holds the task state, the position (epoch, batch, step), the best value so far and every RNG state.

A diverged run must not overwrite its good checkpoints: :class:`FiniteWatch` keeps, on the device, whether every value
``train_step`` returned was finite, and the loop reads it where it synchronises anyway (log steps of a single process,
the ranks' votes) and before every save, ``best.pt`` and end-of-epoch evaluation, stopping with
:class:`~toolkit.train.errors.DivergedError` instead of saving.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, Literal, Protocol

import torch
from tqdm import tqdm

from toolkit.atomic import write_bytes, write_json
from toolkit.config import NonNegativeFloat, NonNegativeInt, PositiveInt
from toolkit.train.checkpoint import Checkpoints, rng_state, set_rng_state
from toolkit.train.distributed import Dist
from toolkit.train.errors import DivergedError

log = logging.getLogger(__name__)


class Task(Protocol):
    """What a trainer provides; the loop calls nothing else."""

    def loop_config(self) -> LoopConfig:
        """Length of the run and checkpoint cadence (the PGAN derives its epoch count, the ticks, from its schedule)."""
        ...

    def batches_per_epoch(self, epoch: int) -> int: ...

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """The batches of ``epoch`` from index ``start`` on; the same sequence every time it is asked for."""
        ...

    def train_step(self, batch: Any) -> dict[str, torch.Tensor | float]:
        """One step; values stay tensors on the device (the loop reads them on log steps only: no host sync)."""
        ...

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Metrics after ``epoch``; ``val_loss`` (lower is better), when present, selects ``best.pt``."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_best(self, path: Path) -> None:
        """Write what evaluation and inference need to ``path``, atomically (called only when ``evaluate`` reports an
        improved ``val_loss``)."""
        ...


@dataclass(frozen=True)
class LoopConfig:
    """Length of the run and when to checkpoint and log."""

    epochs: PositiveInt = 150
    checkpoint_every_steps: NonNegativeInt = 0  # 0: no step cadence
    checkpoint_every_minutes: NonNegativeFloat = 30.0  # 0: no time cadence
    # a checkpoint at every epoch's end: "auto" does on CPU; on a GPU, where an epoch may take seconds, only the
    # steps/minutes cadence (and a stop request) saves
    epoch_checkpoints: Literal["auto", "always", "never"] = "auto"
    keep_checkpoints: PositiveInt = 3
    log_every_steps: PositiveInt = 10
    # multi-process runs agree on stop requests and minutes-due saves every this many steps (a collective and a host
    # sync each time; single-process runs check every step, for free)
    agree_every_steps: PositiveInt = 10


@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best: float = math.inf


@dataclass(frozen=True)
class LoopResult:
    """How :func:`run` ended: ``done`` (DONE written) or ``preempted`` (checkpoint saved, run again to continue;
    ``metrics["signal"]`` is the signal that asked, None on a rank that stopped because another rank was signalled)."""

    status: str
    metrics: dict[str, Any]
    resumed_from_step: int | None


class StopRequest:
    """Turns SIGUSR2/SIGTERM into a flag the loop checks after every step (install from the main thread)."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR2, signal.SIGTERM)) -> None:
        self.requested = False
        self.signum: int | None = None  # the signal that asked, so the job layer knows who ends the job
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("signal %d: checkpointing at the end of this step", signum)
        self.requested = True
        self.signum = signum


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, written by the main rank only.

    On resume, lines beyond the checkpoint's step are dropped: those steps are about to be recomputed.
    """

    def __init__(self, run_dir: Path, enabled: bool, resumed_step: int) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resumed_step]
            write_json_lines(self.path, kept)
        # TensorBoard's event writer imports all of TensorFlow when it is installed (the `keras` extra): seconds per
        # process and a screen of TF logs. TensorBoard's own switch, a `tensorboard.compat.notf` module, selects the
        # bundled stub writer instead; the event files are the same.
        sys.modules.setdefault("tensorboard.compat.notf", ModuleType("tensorboard.compat.notf"))
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resumed_step + 1)

    def write(self, step: int, epoch: int, values: dict[str, torch.Tensor | float]) -> None:
        if not self.enabled:
            return
        values = {key: float(value) for key, value in values.items()}  # the host sync of a log step
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": step, "epoch": epoch, **values}) + "\n")
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line torn by a kill


def write_json_lines(path: Path, lines: list[str]) -> None:
    """Atomically replace ``path`` with ``lines``."""
    write_bytes(path, "".join(line + "\n" for line in lines).encode())


class FiniteWatch:
    """Whether the values ``train_step`` returned were all finite, kept without a host sync: per key, on the device,
    the first step whose value was not (−1 while none was). A few tensor ops per step; read only where the loop
    synchronises anyway."""

    def __init__(self) -> None:
        self.first: dict[str, torch.Tensor] = {}  # key -> int64 scalar on the value's device
        self.host: dict[str, int] = {}  # plain-number values, checked at once (no device involved)

    def observe(self, step: int, values: dict[str, torch.Tensor | float]) -> None:
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                if not math.isfinite(value):
                    self.host.setdefault(key, step)
                continue
            finite = torch.isfinite(value.detach()).all()
            first = self.first.get(key)
            if first is None:
                first = torch.full((), -1, dtype=torch.int64, device=value.device)
            self.first[key] = torch.where(finite | (first >= 0), first, step)

    def flag(self) -> torch.Tensor | bool:
        """True once any value was not finite: a device tensor (reading it is the sync), or a bool without one."""
        if self.host or not self.first:
            return bool(self.host)
        return torch.stack([first >= 0 for first in self.first.values()]).any()

    def error(self, run_dir: Path, step: int) -> DivergedError:
        """The error to stop with at ``step``, naming the first value that was not finite (a host sync)."""
        bad = {**self.host, **{key: int(first) for key, first in self.first.items() if int(first) >= 0}}
        if not bad:
            return DivergedError(f"{run_dir}: another rank's training values were not finite (found at step {step}); "
                                 "stopped before saving")
        key = min(bad, key=bad.get)
        return DivergedError(f"{run_dir}: training diverged: {key} was not finite at step {bad[key]} (found at step "
                             f"{step}); stopped before saving, the checkpoints are the last good ones (lower the "
                             "learning rate, or look at the data, before resuming)")


def _agree(dist: Dist, *flags: bool | torch.Tensor) -> list[bool]:
    """Each flag true on any rank becomes true on all ranks, so that every rank saves or stops at the same step.

    The votes travel in a tensor on the run's device: NCCL has no CPU tensors. A flag may be a device tensor (the
    divergence flag), read with the others in one host sync.
    """
    if not dist.active and not any(isinstance(f, torch.Tensor) for f in flags):
        return [bool(f) for f in flags]
    votes = torch.stack([f.to(dist.device, torch.float32).reshape(()) if isinstance(f, torch.Tensor)
                         else torch.tensor(float(f), device=dist.device) for f in flags])
    votes = dist.all_reduce_sum(votes)
    return [bool(v > 0) for v in votes.tolist()]


def run(task: Task, cfg: LoopConfig, run_dir: Path, dist: Dist, *, config: dict[str, Any],
        stop: StopRequest | None = None) -> LoopResult:
    """Train ``task`` to ``cfg.epochs`` from wherever its run directory left off."""
    run_dir = Path(run_dir)
    if (run_dir / "DONE").exists():
        log.info("%s: run already finished", run_dir)
        return LoopResult("done", json.loads((run_dir / "DONE").read_text()), None)
    checkpoints = Checkpoints(run_dir, cfg.keep_checkpoints)
    progress, resumed = Progress(), None
    newest = checkpoints.load_newest(set_aside=dist.is_main)
    if newest is not None:
        latest, state = newest
        task.load_state_dict(state["task"])
        progress = Progress(**state["progress"])
        set_rng_state(state["rng"])
        resumed = progress.step
        log.info("%s: resumed from %s (epoch %d, batch %d)", run_dir, latest.name, progress.epoch, progress.batch)
    metrics = MetricsLog(run_dir, dist.is_main, progress.step)

    background = dist.device.type == "cuda"  # host copy now, file written while the next steps run
    epoch_saves = cfg.epoch_checkpoints == "always" or (cfg.epoch_checkpoints == "auto" and not background)

    def save(*, wait: bool = False) -> None:
        if dist.is_main:
            checkpoints.save({"task": task.state_dict(), "progress": asdict(progress), "rng": rng_state(),
                              "config": config}, progress.step, background=background and not wait)
            if wait:
                checkpoints.wait()

    watch = FiniteWatch()

    def diverged() -> bool:
        """Whether any rank's values were not finite: a host sync, and under DDP/Horovod a collective that every
        rank makes at the same step."""
        return _agree(dist, watch.flag())[0]

    last_save = time.monotonic()
    try:
        while progress.epoch < cfg.epochs:
            bar = tqdm(task.batches(progress.epoch, progress.batch), total=task.batches_per_epoch(progress.epoch),
                       initial=progress.batch, desc=f"epoch {progress.epoch}", disable=None if dist.is_main else True)
            for batch in bar:
                values = task.train_step(batch)
                progress.step += 1
                progress.batch += 1
                watch.observe(progress.step, values)
                logged = progress.step % cfg.log_every_steps == 0
                if logged:
                    metrics.write(progress.step, progress.epoch, values)
                every, minutes = cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes
                due = every > 0 and progress.step % every == 0  # the same step on every rank
                bad, voted = False, False
                if not dist.active or progress.step % cfg.agree_every_steps == 0:
                    # a signal, the clock or a rank's own values may differ between ranks: they vote (a single
                    # process reads its divergence flag below, only where it syncs anyway)
                    late = minutes > 0 and time.monotonic() - last_save > 60 * minutes
                    stop_now, late, bad = _agree(dist, stop is not None and stop.requested, late,
                                                 watch.flag() if dist.active else False)
                    due, voted = due or late, dist.active
                else:
                    stop_now = False
                if not voted and (due or stop_now or (logged and not dist.active)):
                    bad = diverged()  # before any save; a single process also on its log steps
                if bad:
                    raise watch.error(run_dir, progress.step)
                if due or stop_now:
                    save(wait=stop_now)
                    last_save = time.monotonic()
                if stop_now:
                    return LoopResult("preempted", {"step": progress.step, "epoch": progress.epoch,
                                                    "signal": stop.signum if stop else None}, resumed)
            if diverged():  # before evaluation, which may write files of its own, best.pt and the epoch's save
                raise watch.error(run_dir, progress.step)
            values = task.evaluate(progress.epoch)
            if values.get("val_loss", math.inf) < progress.best:
                progress.best = values["val_loss"]
                if dist.is_main:
                    task.save_best(run_dir / "best.pt")
            metrics.write(progress.step, progress.epoch, values)
            progress.epoch += 1
            progress.batch = 0
            if epoch_saves:
                save()
                last_save = time.monotonic()
    finally:
        checkpoints.wait()
        metrics.close()
    # best_val is null for runs without a validation loss (GANs): JSON has no Infinity
    final = {"step": progress.step, "epochs": progress.epoch,
             "best_val": progress.best if math.isfinite(progress.best) else None}
    if dist.is_main:
        write_json(run_dir / "DONE", final)
    dist.barrier()
    return LoopResult("done", final, resumed)
