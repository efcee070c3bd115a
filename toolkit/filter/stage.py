"""What every synthetic-mask filter shares: MPI-parallel scoring by shard, the kept store, its CSV, figure and
manifest, and the calibration curve. A filter (:mod:`toolkit.filter.zscore`, :mod:`toolkit.filter.dscore`) supplies
only a :class:`Scorer`: a number per mask and which side of the threshold keeps it.

Scoring: shard i of a store goes to rank i % size; each reads its shards in fixed blocks of :data:`BLOCK` rows, so a
score depends on the shard alone and any rank count gives byte-identical output. Filtering is one pass: each rank
writes each of its shards' kept rows as the output shard of the same number (bounded memory, parallel writes); rank 0
gathers the scores and shard infos and writes ``<name>.csv`` (every row's score and decision) and ``dropped.png``
(examples of dropped masks with their scores, as the paper's Fig. 4), then the manifest, last.

One writer, one set of options: rank 0 takes the output store's lock (:class:`StoreWriter`, held for every rank from
before the first shard until the manifest) and records the options that define the output (the input stores'
fingerprints and the filter's own); if it cannot (another writer, other options), every rank raises at once. A killed
filter leaves no manifest: run it again with the same options and it recomputes every shard (the CSV needs every
row's score anyway), each a pure function of the inputs and options, so the store equals an uninterrupted one; other
options are refused naming them, and so is a complete store made with other options (one made with the same options
is kept and its summary returned). The provenance of the output keeps the input's (``source``), so a chain of filters
records each stage's counts. A calibration folder likewise holds a lock while it is written and records its options in
``.calibration.json``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from toolkit import provenance
from toolkit.atomic import remove_stale_temps, write_bytes
from toolkit.data.store import (
    Manifest,
    ShardInfo,
    Store,
    StoreWriter,
    complete,
    open_shard,
    reading,
    shard_name,
    write_shard,
)
from toolkit.lock import WriterLock
from toolkit.mpi import from_root, world
from toolkit.report.figures import row_grid, save_figure

log = logging.getLogger(__name__)

DROPPED = "dropped.png"  # examples of dropped masks, written beside <name>.csv
CALIBRATION = ".calibration.json"  # the options a calibration folder was written with
SUMMARY = ("kept", "dropped", "dropped_percent", "threshold")
BLOCK = 256  # rows held in memory at a time: 256 × 256² float64 is 128 MiB


class Scorer(Protocol):
    """One number per mask and the rule that keeps it."""

    name: str  # the filter: ``<name>.csv``, provenance ``filter``
    column: str  # the CSV column of the score
    higher_is_better: bool  # True: keep score ≥ threshold; False: keep score ≤ threshold

    def __call__(self, labels: np.ndarray) -> np.ndarray:
        """Scores (float64 [n]) of masks [n, S, S] as a store holds them."""

    def caption(self, score: float) -> str:
        """How ``dropped.png`` labels a mask's score."""

    def grid(self, scores: np.ndarray) -> np.ndarray:
        """The default calibration thresholds for these scores (real and synthetic together)."""


def kept(scorer: Scorer, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Which scores the threshold keeps (a NaN score never is)."""
    return scores >= threshold if scorer.higher_is_better else scores <= threshold


def dropped_fraction(scorer: Scorer, scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The fraction of ``scores`` each threshold drops, from sorted scores (NaN counts as dropped): monotone in the
    threshold (non-decreasing when higher scores are better, non-increasing otherwise)."""
    valid = np.sort(scores[~np.isnan(scores)])
    kept_count = (len(valid) - np.searchsorted(valid, thresholds, side="left") if scorer.higher_is_better
                  else np.searchsorted(valid, thresholds, side="right"))
    return 1.0 - kept_count / len(scores)


def _badness(scorer: Scorer, score: float) -> float:
    """Larger is worse (NaN worst), for ranking dropped examples."""
    return np.inf if np.isnan(score) else (-score if scorer.higher_is_better else score)


def blocks(path: Path, sha256: str, stop: int,
           fields: tuple[str, ...]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Rows [0, stop) of one shard as (first row, arrays) in blocks of BLOCK rows; a corrupt shard is named."""
    with open_shard(path, sha256) as f:
        for lo in range(0, stop, BLOCK):
            with reading(path):
                block = {name: f[name][lo:min(lo + BLOCK, stop)] for name in fields}
            yield lo, block


def spread(tasks: list[Any], work: Callable[[Any], Any], comm: Any, *, everywhere: bool) -> list[Any] | None:
    """Run ``work`` on task i on rank i % size; the results in task order, on every rank or on rank 0 only."""
    rank, size = comm.Get_rank(), comm.Get_size()
    mine = [(i, work(task)) for i, task in enumerate(tasks) if i % size == rank]
    parts = comm.allgather(mine) if everywhere else comm.gather(mine, root=0)
    pairs = None if parts is None else sorted((pair for part in parts for pair in part), key=lambda p: p[0])
    return None if pairs is None else [result for _, result in pairs]  # None: a non-root rank of a gather


@dataclass(frozen=True)
class Keep:
    """Where and how :func:`score_store` writes kept rows: the output store, the threshold and the fields to copy."""

    out: Path
    threshold: float
    fields: tuple[str, ...]
    classes: int


def score_store(store: Store, splits: tuple[str, ...], scorer: Scorer, comm: Any, *, drop_empty: bool = False,
                keep: Keep | None = None) -> list[dict[str, Any]] | None:
    """Per shard of ``splits`` (in order): scores, subjects and slices, gathered on rank 0 (None elsewhere).

    With ``keep``, each shard's kept rows are also written (by the rank that scored it) as the shard of the same split
    and number of ``keep.out``; its :class:`ShardInfo` (None when nothing was kept) comes back too.
    """
    tasks = [(split, k, path, info.sha256, info.n)
             for split in splits for k, (info, path) in enumerate(store.shards(split))]
    fields = ("label", "empty", "subject", "slice", *(keep.fields if keep else ()))

    def work(task: tuple[str, int, Path, str, int]) -> dict[str, Any]:
        split, k, path, sha256, n = task
        parts: dict[str, list[Any]] = {"score": [], "subject": [], "slice": []}
        rows_kept: dict[str, list[np.ndarray]] = {name: [] for name in (keep.fields if keep else ())}
        for _, block in blocks(path, sha256, n, tuple(dict.fromkeys(fields))):
            rows = ~block["empty"] if drop_empty else np.ones(len(block["empty"]), bool)
            scores = scorer(block["label"][rows])
            parts["score"].append(scores)
            parts["subject"].extend(s.decode() for s in block["subject"][rows])
            parts["slice"].append(block["slice"][rows])
            if keep:
                chosen = np.flatnonzero(rows)[kept(scorer, scores, keep.threshold)]
                for name in rows_kept:
                    rows_kept[name].append(block[name][chosen])
        result = {"split": split, "score": np.concatenate(parts["score"]) if n else np.zeros(0),
                  "subject": parts["subject"], "slice": np.concatenate(parts["slice"]) if n else np.zeros(0, int)}
        if keep:
            result["info"] = _write_kept(keep, split, k, {name: np.concatenate(v) for name, v in rows_kept.items()})
        return result

    return spread(tasks, work, comm, everywhere=False)


def all_scores(parts: list[dict[str, Any]]) -> np.ndarray:
    """The scores of :func:`score_store`'s shards, concatenated in order."""
    return np.concatenate([np.zeros(0), *(p["score"] for p in parts)])


def _write_kept(keep: Keep, split: str, index: int, rows: dict[str, np.ndarray]) -> ShardInfo | None:
    if not rows or not len(rows["label"]):
        return None  # nothing kept: no shard
    return write_shard(keep.out / shard_name(split, index), label=rows["label"], image=rows.get("image"),
                       subject=[s.decode() for s in rows["subject"]], slice_index=rows["slice"], classes=keep.classes)


def inputs(**stores: Path) -> dict[str, str]:
    """The fingerprints of the input stores by name (each opened first, so that a missing one is a StoreError)."""
    return {name: provenance.fingerprint(Store(path).root) for name, path in stores.items()}


@dataclass(frozen=True)
class Prepared:
    """What a filter has once its collective preparation is done: the scorer, the threshold it keeps by, and what the
    output's provenance records about it."""

    scorer: Scorer
    threshold: float
    provenance: dict[str, Any] = field(default_factory=dict)


def filter_store(name: str, synthetic: Path, out: Path, options: dict[str, Any], prepare: Callable[[], Prepared],
                 comm: Any = None) -> dict[str, Any]:
    """Write the masks of ``synthetic`` that the prepared scorer keeps to the store ``out``, plus ``out/<name>.csv``
    and ``out/dropped.png``.

    ``prepare`` (collective over ``comm``) runs only once the output is claimed, so a complete ``out`` made with the
    same ``options`` is reported (``already_complete``) without any scoring; one made with other options raises
    OptionsChanged. Collective over ``comm`` (default ``MPI.COMM_WORLD``); rank 0 writes and returns the summary,
    other ranks ``{}``.
    """
    comm = world(comm)
    out = Path(out)
    source = Store(synthetic)

    def claim() -> Manifest | StoreWriter:
        manifest = complete(out, options)
        return manifest if manifest is not None else StoreWriter(out, classes=source.manifest.classes,
                                                                 options=options)

    got = from_root(comm, claim)
    if comm.bcast(isinstance(got, Manifest), root=0):
        log.info("%s: store is already complete", out)
        return {} if got is None else {**{k: got.provenance[k] for k in SUMMARY}, "already_complete": True,
                                       **_outputs(name, out, comm)}
    with got or contextlib.nullcontext():  # rank 0 gives the lock up on an error too
        return _filter(name, source, out, got, prepare(), comm)


def _outputs(name: str, out: Path, comm: Any) -> dict[str, Any]:
    return {"ranks": comm.Get_size(), "csv": str(out / f"{name}.csv"),
            "figure": str(out / DROPPED) if (out / DROPPED).exists() else None}


def _filter(name: str, source: Store, out: Path, writer: StoreWriter | None, prepared: Prepared,
            comm: Any) -> dict[str, Any]:
    """The filter proper, once rank 0 holds ``writer`` (None on the other ranks)."""
    m, scorer, threshold = source.manifest, prepared.scorer, prepared.threshold
    splits = tuple(m.splits)
    fields = ("label", "subject", "slice", *(("image",) if m.has_image else ()))
    scored = score_store(source, splits, scorer, comm, keep=Keep(out, threshold, fields, m.classes))
    if scored is None or writer is None:
        return {}
    csv_rows, shard_counts = [], {}
    for split in splits:
        parts = [s for s in scored if s["split"] == split]
        subjects = [subject for p in parts for subject in p["subject"]]
        slices = np.concatenate([np.zeros(0, int), *(p["slice"] for p in parts)])
        scores = all_scores(parts)
        decisions = kept(scorer, scores, threshold)
        csv_rows += [(split, row, subject, int(z), repr(float(v)), int(keep))
                     for row, (subject, z, v, keep) in enumerate(zip(subjects, slices, scores, decisions))]
        infos = [p["info"] for p in parts if p["info"] is not None]
        for index, info in enumerate(infos):
            writer.record(split, index, info)
        shard_counts[split] = len(infos)
    total = len(csv_rows)
    kept_total = sum(row[-1] for row in csv_rows)
    summary = {"kept": kept_total, "dropped": total - kept_total,
               "dropped_percent": 100.0 * (total - kept_total) / total if total else 0.0, "threshold": threshold}
    # The CSV and the figure go before the manifest, which is written last: a complete store always has both.
    write_csv(out / f"{name}.csv", ("split", "row", "subject", "slice", scorer.column, "kept"), csv_rows)
    _dropped_grid(source, scorer, [(r[0], r[1], float(r[4])) for r in csv_rows if not r[5]], out / DROPPED)
    writer.finish(kind="synthetic", image_size=m.image_size, has_image=m.has_image, shard_counts=shard_counts,
                  reduced_fraction=m.reduced_fraction, modality=m.modality,
                  provenance={"filter": name, "synthetic": str(source.root.resolve()), **prepared.provenance,
                              "source": m.provenance, **summary})
    log.info("%s filter: kept %d, dropped %d (%.1f %%)", name, kept_total, total - kept_total,
             summary["dropped_percent"])
    return {**summary, **_outputs(name, out, comm)}


def _dropped_grid(source: Store, scorer: Scorer, dropped: list[tuple[str, int, float]], path: Path,
                  columns: int = 8) -> None:
    """Up to ``columns`` dropped masks, evenly spread from the worst score on, with their scores."""
    if not dropped:
        return
    ranked = sorted(dropped, key=lambda d: -_badness(scorer, d[2]))
    picks = [ranked[i] for i in sorted({round(k) for k in np.linspace(0, len(ranked) - 1, min(columns, len(ranked)))})]
    labels = np.stack([source.read(split, row, row + 1)["label"][0] for split, row, _ in picks])
    row_grid([("dropped", labels, True)], path, f"{len(dropped)} dropped masks (examples)",
             [scorer.caption(score) for _, _, score in picks])


def write_csv(path: Path, header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    write_bytes(path, buffer.getvalue().encode())


def calibrate(real: Path, synthetic: Path, out_dir: Path, options: dict[str, Any], prepare: Callable[[], Scorer], *,
              thresholds: np.ndarray | None, max_real_drop: float, xlabel: str, comm: Any = None) -> dict[str, Any]:
    """Drop fractions versus threshold, for the synthetic masks and for real masks the filter did not learn from.

    The real curve scores the non-empty masks of the real store's *validation* split (training masks would look better
    than unseen real data). The suggested threshold is, among the thresholds that drop at most ``max_real_drop`` of
    those real masks, the first that drops the most synthetic ones (None if no threshold qualifies). ``thresholds``
    defaults to the scorer's grid. Writes ``out_dir/calibration.csv`` and ``out_dir/calibration.png`` under
    ``out_dir``'s lock, refusing a folder calibrated with other options; ``prepare`` (collective) makes the scorer.
    Collective over ``comm``; rank 0 returns the summary, other ranks ``{}``.
    """
    comm = world(comm)
    out_dir = Path(out_dir)
    options = {**options, "thresholds": None if thresholds is None else [float(t) for t in np.ravel(thresholds)]}
    lock = from_root(comm, lambda: _claim_calibration(out_dir, options))
    try:
        scorer = prepare()
        synth = score_store(Store(synthetic), tuple(Store(synthetic).manifest.splits), scorer, comm)
        held_out = score_store(Store(real), ("val",), scorer, comm, drop_empty=True)
        if synth is None or held_out is None:
            return {}
        return _calibrate(scorer, all_scores(held_out), all_scores(synth), real, synthetic, out_dir,
                          thresholds=thresholds, max_real_drop=max_real_drop, xlabel=xlabel, ranks=comm.Get_size())
    finally:
        if lock is not None:
            lock.release()


def _claim_calibration(out_dir: Path, options: dict[str, Any]) -> WriterLock:
    """Rank 0's lock on the calibration folder, its own stale temporary files removed and its options checked."""
    lock = WriterLock(out_dir, "calibration").acquire()
    try:
        remove_stale_temps(out_dir, ("calibration.csv", "calibration.png", CALIBRATION))
        provenance.claim(out_dir / CALIBRATION, options)
    except BaseException:
        lock.release()
        raise
    return lock


def _calibrate(scorer: Scorer, real_scores: np.ndarray, synth_scores: np.ndarray, real: Path, synthetic: Path,
               out_dir: Path, *, thresholds: np.ndarray | None, max_real_drop: float, xlabel: str,
               ranks: int) -> dict[str, Any]:
    if not len(real_scores) or not len(synth_scores):
        raise ValueError(f"calibration needs non-empty validation masks in {real} and masks in {synthetic}")
    if thresholds is None:
        thresholds = scorer.grid(np.concatenate([real_scores, synth_scores]))
    thresholds = np.sort(np.asarray(thresholds, dtype=np.float64))
    real_drop = dropped_fraction(scorer, real_scores, thresholds)
    synth_drop = dropped_fraction(scorer, synth_scores, thresholds)
    ok = np.flatnonzero(real_drop <= max_real_drop)
    best = int(ok[np.argmax(synth_drop[ok])]) if len(ok) else None
    suggested = None if best is None else float(thresholds[best])
    write_csv(out_dir / "calibration.csv", ("threshold", "real_dropped", "synthetic_dropped"),
              [(repr(float(t)), repr(float(r)), repr(float(s))) for t, r, s in zip(thresholds, real_drop, synth_drop)])
    _plot(thresholds, real_drop, synth_drop, suggested, xlabel, out_dir / "calibration.png")
    return {"suggested_threshold": suggested,
            "synthetic_dropped_at_suggested": None if best is None else float(synth_drop[best]),
            "real_masks": len(real_scores), "synthetic_masks": len(synth_scores), "ranks": ranks,
            "csv": str(out_dir / "calibration.csv"), "plot": str(out_dir / "calibration.png")}


def _plot(thresholds: np.ndarray, real_drop: np.ndarray, synth_drop: np.ndarray, suggested: float | None,
          xlabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt  # toolkit.report.figures selected the file-only Agg backend

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(thresholds, 100 * real_drop, label="real (validation)")
    ax.plot(thresholds, 100 * synth_drop, label="synthetic")
    if suggested is not None:
        ax.axvline(suggested, color="tab:red", linestyle="--", linewidth=1, label=f"suggested {suggested:.4g}")
    ax.set(xlabel=xlabel, ylabel="masks dropped (%)")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
