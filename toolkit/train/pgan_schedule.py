"""The official Progressive GAN training schedule (one-GPU preset) as pure functions of the image count.

:func:`state_at` is the official ``TrainingSchedule``: lod, resolution, minibatch and tick length for ``cur_nimg``
images shown to D. :func:`ticks` replays the official main loop without training — one iteration =
``minibatch_repeats`` × (one D step + one G step) on ``minibatch`` images each, all at the lod and minibatch of the
iteration's start; a tick ends after the first iteration that reaches ``tick_start + tick_kimg`` (``tick_kimg`` of that
iteration's state) or the end of training. The paper config (256², 12,000 kimg) gives 205 ticks.

Resume needs only the iteration's position: every iteration's ``(nimg, lod, minibatch)`` is a function of the config.
Ticks store their iterations run-length encoded (:class:`Iterations`), so the 375k iterations of the paper schedule
cost a few hundred segments and :func:`ticks` runs in milliseconds.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload


def _minibatch_default() -> dict[int, int]:
    return {4: 128, 8: 128, 16: 128, 32: 64, 64: 32, 128: 16, 256: 8}


def _tick_kimg_default() -> dict[int, int]:
    return {4: 160, 8: 140, 16: 120, 32: 100, 64: 80, 128: 60, 256: 40}


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule hyperparameters; the defaults are the official one-GPU preset (600 + 600 kimg per resolution).

    ``minibatch`` and ``tick_kimg`` map a resolution to its value (``*_default`` for resolutions not listed). Keys may
    be given as strings (YAML configs: ``"4": 128``); they are stored as ints.
    """

    resolution: int = 256
    total_kimg: int = 12000
    lod_training_kimg: int = 600
    lod_transition_kimg: int = 600
    minibatch: dict[int, int] = field(default_factory=_minibatch_default)
    tick_kimg: dict[int, int] = field(default_factory=_tick_kimg_default)
    minibatch_repeats: int = 4
    minibatch_default: int = 16
    tick_kimg_default: int = 160

    def __post_init__(self) -> None:
        for name in ("minibatch", "tick_kimg"):
            try:
                table = {int(k): v for k, v in getattr(self, name).items()}
            except ValueError as exc:
                raise ValueError(f"schedule.{name}: keys must be resolutions (integers): {exc}") from exc
            if any(not isinstance(v, int) or v < 1 for v in table.values()):
                raise ValueError(f"schedule.{name}: expected positive integers, got {table!r}")
            object.__setattr__(self, name, table)
        for name in ("resolution", "total_kimg", "minibatch_repeats", "minibatch_default", "tick_kimg_default"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"schedule.{name}: expected a positive integer, got {value!r}")
        for name in ("lod_training_kimg", "lod_transition_kimg"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"schedule.{name}: expected a non-negative integer, got {value!r}")
        if self.resolution < 4 or self.resolution & (self.resolution - 1):
            raise ValueError(f"schedule.resolution: expected a power of two ≥ 4, got {self.resolution}")

    @property
    def resolution_log2(self) -> int:
        return self.resolution.bit_length() - 1


@dataclass(frozen=True)
class TrainingState:
    """The schedule at one image count: ``lod`` (max_lod … 0, fractional during fades), the training ``resolution``
    (during a fade the new, finer one), its ``minibatch`` and ``tick_kimg``."""

    kimg: float
    lod: float
    resolution: int
    minibatch: int
    tick_kimg: int


def state_at(cur_nimg: int, config: ScheduleConfig) -> TrainingState:
    """The official ``TrainingSchedule`` for ``cur_nimg`` real images shown so far (initial resolution 4²)."""
    kimg = cur_nimg / 1000.0
    phase_dur = config.lod_training_kimg + config.lod_transition_kimg
    phase_idx = math.floor(kimg / phase_dur) if phase_dur > 0 else 0
    phase_kimg = kimg - phase_idx * phase_dur
    lod = float(config.resolution_log2 - 2 - phase_idx)
    if config.lod_transition_kimg > 0:
        lod -= max(phase_kimg - config.lod_training_kimg, 0.0) / config.lod_transition_kimg
    lod = max(lod, 0.0)
    # floor(lod) is the *finer* end of a fade, so the new resolution's minibatch and tick length apply during it.
    resolution = 2 ** (config.resolution_log2 - math.floor(lod))
    return TrainingState(kimg, lod, resolution, config.minibatch.get(resolution, config.minibatch_default),
                         config.tick_kimg.get(resolution, config.tick_kimg_default))


@dataclass(frozen=True)
class Segment:
    """``count`` consecutive iterations at one resolution and minibatch, the first starting at ``start_nimg``;
    iteration ``j`` starts at ``start_nimg + j · step`` with ``step = repeats · minibatch``."""

    start_nimg: int
    count: int
    minibatch: int
    resolution: int
    step: int


class Iterations(Sequence[tuple[int, float, int]]):
    """A tick's iterations as a lazy sequence of ``(nimg_at_start, lod, minibatch)``, stored run-length encoded.

    ``lod`` is recomputed with :func:`state_at`, so it is exactly the official value. Supports ``len``, indexing
    (negative too), slicing to a list, and iteration.
    """

    def __init__(self, segments: Sequence[Segment], config: ScheduleConfig) -> None:
        self.segments = tuple(segments)
        self._config = config
        self._starts = [0]
        for seg in self.segments:
            self._starts.append(self._starts[-1] + seg.count)

    def __len__(self) -> int:
        return self._starts[-1]

    @overload
    def __getitem__(self, index: int) -> tuple[int, float, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, float, int]]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"iteration {index} outside a tick of {len(self)}")
        s = bisect.bisect_right(self._starts, index) - 1
        seg = self.segments[s]
        nimg = seg.start_nimg + (index - self._starts[s]) * seg.step
        return nimg, state_at(nimg, self._config).lod, seg.minibatch

    def __iter__(self) -> Iterator[tuple[int, float, int]]:
        for seg in self.segments:
            for j in range(seg.count):
                nimg = seg.start_nimg + j * seg.step
                yield nimg, state_at(nimg, self._config).lod, seg.minibatch

    def __repr__(self) -> str:
        return f"Iterations({len(self)} in {len(self.segments)} segments)"


@dataclass(frozen=True)
class Tick:
    """One tick: its ``index`` (0-based), image counts at its start and end, the global index of its first iteration,
    and its iterations."""

    index: int
    start_nimg: int
    end_nimg: int
    first_iteration: int
    iterations: Iterations

    @property
    def resolution(self) -> int:
        """The training resolution at the tick's start."""
        return self.iterations.segments[0].resolution


def _same_resolution_run(nimg: int, step: int, limit: int, resolution: int, config: ScheduleConfig) -> int:
    """The number of iterations (≤ ``limit``) from ``nimg`` whose start state has ``resolution``. Resolution never
    decreases with ``nimg``, so a binary search on :func:`state_at` itself is exact."""
    lo, hi = 1, limit  # the first iteration has `resolution` by construction
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if state_at(nimg + (mid - 1) * step, config).resolution == resolution:
            lo = mid
        else:
            hi = mid - 1
    return lo


def ticks(config: ScheduleConfig) -> list[Tick]:
    """Replay the official main loop and return its ticks (see the module docstring)."""
    total = config.total_kimg * 1000
    result: list[Tick] = []
    nimg = tick_start = 0
    iteration = tick_first = 0
    segments: list[Segment] = []
    while nimg < total:
        state = state_at(nimg, config)
        step = config.minibatch_repeats * state.minibatch
        target = min(tick_start + state.tick_kimg * 1000, total)
        to_target = max(1, -(-(target - nimg) // step))  # iterations until the end-of-tick check passes (≥ 1)
        count = _same_resolution_run(nimg, step, to_target, state.resolution, config)
        segments.append(Segment(nimg, count, state.minibatch, state.resolution, step))
        nimg += count * step
        iteration += count
        if count == to_target:  # the check after this iteration ends the tick
            result.append(Tick(len(result), tick_start, nimg, tick_first, Iterations(segments, config)))
            tick_start, tick_first, segments = nimg, iteration, []
    return result


def optimizer_reset(prev_lod: float, lod: float) -> bool:
    """The official rule: reset the Adam states when floor or ceil of lod changes (a fade starts or ends; start with
    ``prev_lod = -1``)."""
    return math.floor(lod) != math.floor(prev_lod) or math.ceil(lod) != math.ceil(prev_lod)


def dry_schedule(config: ScheduleConfig) -> dict[str, Any]:
    """``train pgan --dry-schedule``: tick count and, per resolution, the ticks that start there, the kimg trained
    there (iterations counted by their start resolution) and the minibatch. Extra keys: ``images`` (the real total,
    ≥ ``total_kimg`` · 1000) and ``iterations``."""
    all_ticks = ticks(config)
    per: dict[int, dict[str, Any]] = {}
    for tick in all_ticks:
        per.setdefault(tick.resolution, {"ticks": 0, "kimg": 0.0, "minibatch": 0})["ticks"] += 1
        for seg in tick.iterations.segments:
            row = per.setdefault(seg.resolution, {"ticks": 0, "kimg": 0.0, "minibatch": 0})
            row["kimg"] += seg.count * seg.step / 1000
            row["minibatch"] = seg.minibatch
    return {
        "ticks": len(all_ticks),
        "total_kimg": config.total_kimg,
        "per_resolution": {str(res): {**row, "kimg": round(row["kimg"], 3)} for res, row in sorted(per.items())},
        "images": all_ticks[-1].end_nimg if all_ticks else 0,
        "iterations": sum(len(t.iterations) for t in all_ticks),
    }
