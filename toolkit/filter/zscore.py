"""`tumorsynth filter zscore`: drop synthetic masks whose pixel-wise z-score norm against the real masks is too large.

The statistics are the per-pixel mean μ and population standard deviation σ (label values as numbers, over the batch
axis) of the masks the PGAN was trained on: the non-empty masks of the real store's training split, or of its reduced
prefix (the first ``manifest.reduced`` rows), reduced to the synthetic masks' size when the PGAN was trained smaller
(:func:`toolkit.data.labels.reduce_labels`). Every mask x of every split of the synthetic store is scored by
‖(x − μ)/σ‖₂ over all pixels and dropped when that norm exceeds the threshold (500 in the paper).

Zero-variance pixels (σ = 0, e.g. corners that are background in every real mask): a pixel equal to μ contributes 0;
any other value makes the norm infinite, so the mask is always dropped. The norm is never NaN and such a mask is never
silently kept. ``min_std`` (``--min-std``, default 0: the strict rule) floors σ instead: a pixel where the real masks
never vary then costs (Δ/min_std)². With few real masks or an undertrained generator (stray pixels on the image
border, as the CPU demo's PGAN makes) the strict rule drops every mask; the floor keeps the filter's ranking.

Statistics are accumulated per shard in fixed 256-row blocks and merged in shard order after one ``allgather``, so
any rank count gives bit-identical statistics (merging per-rank partials in rank order would differ in the last bits
with the rank count), hence identical norms and decisions. Scoring, the kept store, ``zscore.csv``, ``dropped.png``,
resumption and the calibration folder are :mod:`toolkit.filter.stage`'s; the options that define the output are the
real and synthetic stores' fingerprints, ``threshold``, ``reduced`` and ``min_std``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.data.labels import reduce_labels
from toolkit.data.store import Store
from toolkit.filter import stage
from toolkit.mpi import world

MAX_REAL_DROP = 0.01  # calibration: the suggested threshold drops at most 1 % of real masks


@dataclass(frozen=True)
class Moments:
    """Count, per-pixel mean and sum of squared deviations (M2) of a batch of masks, in float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, batch: np.ndarray) -> Moments:
        """The moments of ``batch`` [n, ...] over its first axis (zeros when n = 0)."""
        x = np.asarray(batch, dtype=np.float64)
        if len(x) == 0:
            return cls(0, np.zeros(x.shape[1:]), np.zeros(x.shape[1:]))
        mean = x.mean(axis=0)
        return cls(len(x), mean, ((x - mean) ** 2).sum(axis=0))

    def merge(self, other: Moments) -> Moments:
        """The moments of both batches together (Chan, Golub & LeVeque's pairwise update)."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation, sqrt(M2 / count)."""
        return np.sqrt(self.m2 / self.count)

    def floored(self, min_std: float) -> Moments:
        """The same moments with the standard deviation raised to at least ``min_std`` (0: unchanged)."""
        if min_std <= 0:
            return self
        return Moments(self.count, self.mean, np.maximum(self.std, min_std) ** 2 * self.count)


def real_moments(store: Path, *, reduced: bool, size: int | None = None, comm: Any = None) -> Moments:
    """Moments of the non-empty training masks of ``store`` (only its reduced prefix when ``reduced``), reduced to
    ``size``² when given, on all ranks."""
    comm = world(comm)
    real = Store(store)
    size = size or real.manifest.image_size
    limit = real.manifest.reduced if reduced else real.split("train").n
    tasks, offset = [], 0
    for info, path in real.shards("train"):
        if offset < limit:
            tasks.append((path, info.sha256, min(info.n, limit - offset)))
        offset += info.n

    empty = Moments.of(np.zeros((0, size, size)))

    def shard_moments(task: tuple[Path, str, int]) -> Moments:
        total = empty
        for _, block in stage.blocks(*task, ("label", "empty")):
            total = total.merge(Moments.of(reduce_labels(block["label"][~block["empty"]], size)))
        return total

    merged = empty
    for part in stage.spread(tasks, shard_moments, comm, everywhere=True):  # shard order, whatever the rank count
        merged = merged.merge(part)
    if merged.count == 0:
        raise ValueError(f"{store}: no non-empty training masks to take statistics from")
    return merged


def norms(labels: np.ndarray, moments: Moments) -> np.ndarray:
    """‖(x − μ)/σ‖₂ per mask of ``labels`` [n,S,S] (float64 [n]); inf where a σ = 0 pixel differs from μ.

    Computed as two matrix products instead of a z-image per mask: with a = 1/σ² and b = μ/σ² on live pixels,
    ‖z‖² = x²·a − 2 x·b + Σ μ²/σ²; the same expansion with a = 1 on dead pixels is Σ (x − μ)², which is exactly zero
    (small integers in float64) unless a dead pixel differs from μ. Measured 1.7× faster than the direct form at 256².
    """
    if labels.shape[1:] != moments.mean.shape:
        raise ValueError(f"masks are {labels.shape[1:]}, statistics are {moments.mean.shape}")
    x = labels.reshape(len(labels), -1).astype(np.float64)
    weights, offsets = _norm_weights(moments)
    sums = np.square(x) @ weights[0] - 2 * (x @ weights[1]) + offsets
    out = np.sqrt(np.maximum(sums[:, 0], 0))
    out[sums[:, 1] > 0] = np.inf
    return out


def _norm_weights(moments: Moments) -> tuple[np.ndarray, np.ndarray]:
    """The [2, P, 2] weights and [2] offsets of :func:`norms`: column 0 live pixels (1/σ², μ/σ²), column 1 dead ones
    (1, μ)."""
    mean, std = moments.mean.ravel(), moments.std.ravel()
    live = std > 0
    inv_var = np.where(live, 1 / np.where(live, std, 1) ** 2, 0.0)
    dead = (~live).astype(np.float64)
    weights = np.stack([np.stack([inv_var, dead], 1), np.stack([mean * inv_var, mean * dead], 1)])
    offsets = np.array([(mean**2 * inv_var).sum(), (mean**2 * dead).sum()])
    return weights, offsets


@dataclass(frozen=True)
class ZScore:
    """The z-score norm of masks against real moments (a :class:`~toolkit.filter.stage.Scorer`: keep norm ≤ t)."""

    moments: Moments
    name: str = "zscore"
    column: str = "norm"
    higher_is_better: bool = False

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        return norms(reduce_labels(labels, self.moments.mean.shape[-1]), self.moments)

    def caption(self, score: float) -> str:
        return f"‖z‖ = {score:.0f}" if np.isfinite(score) else "‖z‖ = ∞ (σ = 0)"

    def grid(self, scores: np.ndarray) -> np.ndarray:
        """401 evenly spaced thresholds from 0 to the largest finite norm (at least 1000)."""
        finite = scores[np.isfinite(scores)]
        return np.linspace(0.0, max(1000.0, float(finite.max()) if len(finite) else 0.0), 401)


def _scorer(real: Path, synthetic: Path, reduced: bool, min_std: float, comm: Any) -> ZScore:
    size = Store(synthetic).manifest.image_size
    return ZScore(real_moments(real, reduced=reduced, size=size, comm=comm).floored(min_std))


def filter_store(real: Path, synthetic: Path, out: Path, *, threshold: float = 500.0, reduced: bool = False,
                 min_std: float = 0.0, comm: Any = None) -> dict[str, Any]:
    """Write the masks of ``synthetic`` whose norm is ≤ ``threshold`` to the store ``out`` plus ``out/zscore.csv``
    (:func:`toolkit.filter.stage.filter_store`). Collective over ``comm``; rank 0 returns the summary."""
    if not threshold >= 0:  # NaN too: every comparison with it fails, so it would silently drop every mask
        raise ValueError(f"--threshold must be ≥ 0 (or inf to keep all), got {threshold}")
    comm = world(comm)
    size, real_size = Store(synthetic).manifest.image_size, Store(real).manifest.image_size
    if size > real_size:
        raise ValueError(f"{synthetic} is {size}², larger than the real masks of {real} ({real_size}²)")
    options = {**stage.inputs(real=real, synthetic=synthetic), "threshold": threshold, "reduced": reduced,
               "min_std": min_std}

    def prepare() -> stage.Prepared:
        scorer = _scorer(real, synthetic, reduced, min_std, comm)
        return stage.Prepared(scorer, threshold, {"real": str(Path(real).resolve()), "reduced": reduced,
                                                  "min_std": min_std, "real_masks": scorer.moments.count})

    return stage.filter_store("zscore", synthetic, out, options, prepare, comm)


def calibrate(real: Path, synthetic: Path, out_dir: Path, *, thresholds: np.ndarray | None = None,
              reduced: bool = False, min_std: float = 0.0, comm: Any = None) -> dict[str, Any]:
    """Drop fractions versus threshold for the synthetic masks and the real validation masks
    (:func:`toolkit.filter.stage.calibrate`): the suggested threshold is the smallest of the grid (default: 401
    values from 0 to the largest finite norm, at least 1000) that drops at most 1 % of the real masks."""
    comm = world(comm)
    options = {**stage.inputs(real=real, synthetic=synthetic), "reduced": reduced, "min_std": min_std}
    return stage.calibrate(real, synthetic, out_dir, options, lambda: _scorer(real, synthetic, reduced, min_std, comm),
                           thresholds=thresholds, max_real_drop=MAX_REAL_DROP, xlabel="threshold on ‖z‖₂", comm=comm)
