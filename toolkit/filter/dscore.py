"""`tumorsynth filter dscore`: drop synthetic masks that the PGAN's own discriminator scores below a threshold.

The paper's proposal: reuse the trained critic. Every mask of the synthetic store is scored by the discriminator of
the snapshot that generated it, found through the store's provenance (``generate masks`` records the run, the
snapshot and its fingerprint; a filtered store keeps its input's provenance as ``source``, so a z-score-filtered
store still leads back to it); a snapshot changed since generation is refused. Masks enter D as the trainer feeds it
(labels 0…6 → [−1, 1]) at the generator's resolution and the snapshot's lod; real masks are first reduced to that
size as the generator sees and makes them (:func:`toolkit.data.labels.reduce_labels`), so real and synthetic masks
are both label maps. Column 0 of D's output is the WGAN score (higher: more real).

Minibatch stddev makes a WGAN score depend on the other masks of its group, so scores are taken in fixed batches of
``batch`` consecutive rows of a shard's 256-row block (the last batch of a block is filled by repeating the block's
rows from its start, and the copies' scores are discarded): a score is a function of the shard alone, and any rank
count gives byte-identical output on one kind of device (as the z-score filter, :mod:`toolkit.filter.stage`).

Threshold: ``--threshold`` (absolute), or by default the ``real_quantile``-quantile (0.01) of the scores of the real
store's non-empty validation masks, which the PGAN never saw: the filter then drops about that fraction of unseen real
masks and every synthetic mask that scores lower. ``--calibrate`` writes the curve of both drop fractions against the
threshold and suggests the threshold that drops the most synthetic masks while dropping at most ``real_quantile`` of
the real ones. Output: the kept store, ``dscore.csv`` (every row's score and decision), ``dropped.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import provenance
from toolkit.config import from_dict
from toolkit.data.labels import reduce_labels
from toolkit.data.store import Manifest, Store
from toolkit.filter import stage
from toolkit.models.pgan import Discriminator, PGANConfig
from toolkit.mpi import world
from toolkit.train.distributed import mpi_device
from toolkit.train.pgan import to_unit

DEFAULT_QUANTILE = 0.01


@dataclass(frozen=True)
class Critic:
    """A snapshot's discriminator, ready to score: the network (eval mode, on its device), its lod and file."""

    D: Discriminator
    lod: float
    snapshot: Path

    @property
    def resolution(self) -> int:
        return self.D.config.resolution


def load_discriminator(path: Path, device: torch.device) -> Critic:
    """The discriminator of the tick snapshot ``path``; a snapshot without one (written before snapshots kept D) is
    named."""
    snap = torch.load(path, map_location="cpu", weights_only=True)
    if "D" not in snap:
        raise ValueError(f"{path}: the snapshot holds no discriminator (written before tick snapshots kept D); "
                         "train again or filter with zscore")
    D = Discriminator(from_dict(PGANConfig, snap["model"], source=str(path)))
    D.load_state_dict(snap["D"], strict=True)
    return Critic(D.to(device).eval().requires_grad_(False), float(snap["lod"]), Path(path))


def generating_snapshot(manifest: Manifest, where: Path) -> tuple[Path, str | None]:
    """The snapshot file that generated the masks of a store (following filtered stores' ``source`` provenance) and
    the fingerprint generation recorded for it."""
    doc: Any = manifest.provenance
    while isinstance(doc, dict) and "generator_run" not in doc:
        doc = doc.get("source")
    if not isinstance(doc, dict) or not doc.get("snapshot"):
        raise ValueError(f"{where}: its provenance names no PGAN snapshot (not made by `generate masks`, or a filter "
                         "of such a store)")
    path = Path(doc["generator_run"]) / "snapshots" / doc["snapshot"]
    return path, doc.get("options", {}).get("snapshot_fingerprint")


@dataclass(frozen=True)
class DScore:
    """WGAN scores of a critic: a :class:`~toolkit.filter.stage.Scorer` keeping score ≥ threshold."""

    critic: Critic
    batch: int
    name: str = "dscore"
    column: str = "score"
    higher_is_better: bool = True

    @torch.no_grad()
    def __call__(self, labels: np.ndarray) -> np.ndarray:
        n = len(labels)
        if not n:
            return np.zeros(0)
        padded = reduce_labels(labels, self.critic.resolution)[np.arange(-(-n // self.batch) * self.batch) % n]
        device = next(self.critic.D.parameters()).device
        x = to_unit(torch.from_numpy(padded).to(device))[:, None]  # uint8 crosses, the float image is made there
        scores = torch.cat([self.critic.D(x[i:i + self.batch], self.critic.lod)[:, 0]
                            for i in range(0, len(x), self.batch)])
        return scores[:n].double().cpu().numpy()  # one download per block

    def caption(self, score: float) -> str:
        return f"D = {score:.3g}"

    def grid(self, scores: np.ndarray) -> np.ndarray:
        """401 evenly spaced thresholds over the range of the finite scores."""
        finite = scores[np.isfinite(scores)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        return np.linspace(lo, hi if hi > lo else lo + 1.0, 401)


def _check(batch: int, real_quantile: float | None, threshold: float | None) -> None:
    if (threshold is None) == (real_quantile is None):
        raise ValueError("dscore: give either --threshold or --real-quantile, not both")
    if real_quantile is not None and not 0.0 <= real_quantile < 1.0:
        raise ValueError(f"--real-quantile must be in [0, 1), got {real_quantile}")
    if threshold is not None and np.isnan(threshold):
        raise ValueError("--threshold must be a number, got nan")
    if batch < 1:
        raise ValueError(f"--batch must be ≥ 1, got {batch}")


def _scorer(synthetic: Path, batch: int, device: str | None, comm: Any) -> DScore:
    """The scorer of ``synthetic``'s generating snapshot on this rank's device; a changed snapshot, a size mismatch
    or a batch the minibatch-stddev groups do not divide is refused."""
    source = Store(synthetic)
    path, recorded = generating_snapshot(source.manifest, source.root)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the snapshot that generated {synthetic} is gone")
    if recorded is not None and provenance.fingerprint(path) != recorded:
        raise ValueError(f"{path}: the snapshot changed since it generated {synthetic} (fingerprint differs)")
    critic = load_discriminator(path, mpi_device(comm, device))
    if critic.resolution != source.manifest.image_size:
        raise ValueError(f"{synthetic}: masks are {source.manifest.image_size}², the discriminator of {path} "
                         f"scores {critic.resolution}²")
    group = critic.D.config.mbstd_group
    if batch % min(group, batch):
        raise ValueError(f"--batch {batch}: must be a multiple of the discriminator's minibatch-stddev group ({group})")
    return DScore(critic, batch)


def _options(real: Path, synthetic: Path, batch: int) -> dict[str, Any]:
    path, _ = generating_snapshot(Store(synthetic).manifest, Path(synthetic))
    return {**stage.inputs(real=real, synthetic=synthetic), "snapshot": str(path),
            "snapshot_fingerprint": provenance.fingerprint(path) if path.exists() else None, "batch": batch}


def real_scores(real: Path, scorer: DScore, comm: Any) -> np.ndarray | None:
    """Scores of the non-empty validation masks of ``real`` (rank 0; None elsewhere)."""
    parts = stage.score_store(Store(real), ("val",), scorer, comm, drop_empty=True)
    return None if parts is None else stage.all_scores(parts)


def filter_store(real: Path, synthetic: Path, out: Path, *, threshold: float | None = None,
                 real_quantile: float | None = DEFAULT_QUANTILE, batch: int = 64, device: str | None = None,
                 comm: Any = None) -> dict[str, Any]:
    """Write the masks of ``synthetic`` scoring ≥ the threshold to the store ``out`` plus ``out/dscore.csv``; the
    threshold is ``threshold`` or, when that is None, the ``real_quantile``-quantile of the real validation scores.
    Collective over ``comm``; rank 0 returns the summary (with ``real_quantile``), other ranks ``{}``."""
    if threshold is not None:
        real_quantile = None
    _check(batch, real_quantile, threshold)
    comm = world(comm)
    options = {**_options(real, synthetic, batch), "threshold": threshold, "real_quantile": real_quantile}

    def prepare() -> stage.Prepared:
        scorer = _scorer(synthetic, batch, device, comm)
        chosen = threshold
        if chosen is None:
            scores = real_scores(real, scorer, comm)
            if scores is not None and not len(scores):
                raise ValueError(f"{real}: no non-empty validation masks to take the real quantile from")
            chosen = comm.bcast(None if scores is None else float(np.quantile(scores, real_quantile)), root=0)
        return stage.Prepared(scorer, chosen, {"real": str(Path(real).resolve()), "real_quantile": real_quantile,
                                               "snapshot": str(scorer.critic.snapshot), "batch": batch})

    doc = stage.filter_store("dscore", synthetic, out, options, prepare, comm)
    return {**doc, "real_quantile": real_quantile} if doc else doc


def calibrate(real: Path, synthetic: Path, out_dir: Path, *, thresholds: np.ndarray | None = None,
              real_quantile: float = DEFAULT_QUANTILE, batch: int = 64, device: str | None = None,
              comm: Any = None) -> dict[str, Any]:
    """Drop fractions versus threshold for the synthetic masks and the real validation masks
    (:func:`toolkit.filter.stage.calibrate`); the suggestion drops at most ``real_quantile`` of the real masks."""
    _check(batch, real_quantile, None)
    comm = world(comm)
    options = {**_options(real, synthetic, batch), "real_quantile": real_quantile}
    return stage.calibrate(real, synthetic, out_dir, options, lambda: _scorer(synthetic, batch, device, comm),
                           thresholds=thresholds, max_real_drop=real_quantile, xlabel="threshold on D(x)", comm=comm)
