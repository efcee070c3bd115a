"""``tumorsynth compare pgan``: PGAN runs side by side (e.g. slice-conditioned against unconditioned), as Markdown.

Per run, from what ``evaluate swd`` and the filters wrote: the best tick's SWD, tick 0's and their ratio, and, with a
filtered store of the run's masks (``--filtered``), its filter's drop rate. A slice-conditioned run adds a per-bin
table: the real masks per bin and the best snapshot's SWD there (``swd-bins.csv``, from ``evaluate swd --per-bin``)
and, as generated masks record their bin's centre slice, the filter's drop rate per bin (read from the filter's CSV
through the bins in the masks store's provenance). An unconditioned generator has no bins, so it has no per-bin rows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.data.bins import SliceBins
from toolkit.data.store import Store
from toolkit.train.pgan_eval import BEST, BIN_TABLE, TABLE


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run_summary(run: Path) -> dict[str, Any]:
    """The SWD figures of a scored PGAN run (and its per-bin ones, if any)."""
    run = Path(run)
    if not (run / TABLE).exists() or not (run / "snapshots" / BEST).exists():
        raise ValueError(f"{run}: no {TABLE} or snapshots/{BEST}: score the run first (tumorsynth evaluate swd {run})")
    rows = {row["snapshot"]: row for row in _csv(run / TABLE)}
    best = (run / "snapshots" / BEST).read_text().strip()
    first = rows[min(rows)]
    snapshot = torch.load(run / "snapshots" / f"{best}.pt", map_location="cpu", weights_only=True)
    doc = {"run": str(run), "label_size": int(snapshot["model"].get("label_size", 0)), "ticks": len(rows),
           "best": best, "best_swd": float(rows[best]["swd_avg"]), "tick0_swd": float(first["swd_avg"])}
    doc["ratio"] = doc["best_swd"] / doc["tick0_swd"]
    if (run / BIN_TABLE).exists():
        doc["bins"] = [{"bin": int(r["bin"]), "slices": f"{r['first_slice']}–{r['last_slice']}",
                        "real": int(r["real"]), "swd": float(r["swd_avg"]) if r["swd_avg"] else None}
                       for r in _csv(run / BIN_TABLE)]
    return doc


def _slice_bins(provenance: dict[str, Any]) -> SliceBins | None:
    """The bins of the generated masks a filtered store descends from (through each stage's ``source``)."""
    while provenance:
        if "slice_bins" in provenance:
            return SliceBins.from_dict(provenance["slice_bins"])
        provenance = provenance.get("source") or {}
    return None


def filtered_summary(store: Path) -> dict[str, Any]:
    """A filtered store's drop rate, and per bin when its masks came from a slice-conditioned generator."""
    store = Path(store)
    provenance = Store(store).manifest.provenance
    if "filter" not in provenance:
        raise ValueError(f"{store}: not the output of a filter (its manifest's provenance has no 'filter')")
    name = provenance["filter"]
    doc = {"store": str(store), "filter": name, "kept": provenance["kept"], "dropped": provenance["dropped"],
           "dropped_percent": provenance["dropped_percent"], "threshold": provenance["threshold"]}
    bins = _slice_bins(provenance.get("source", {}))
    if bins is not None:
        rows = _csv(store / f"{name}.csv")
        of = bins.of(np.array([int(r["slice"]) for r in rows]))
        dropped = np.array([r["kept"] == "0" for r in rows])
        doc["bins"] = [{"bin": b, "masks": int((of == b).sum()), "dropped": int(dropped[of == b].sum())}
                       for b in range(bins.count)]
    return doc


def compare(runs: list[Path], filtered: list[Path] | None = None) -> dict[str, Any]:
    """Each run's summary, with its filtered store's (``filtered[i]`` belongs to ``runs[i]``)."""
    filtered = filtered or []
    if filtered and len(filtered) != len(runs):
        raise ValueError(f"--filtered: give one filtered store per run ({len(runs)}), got {len(filtered)}")
    docs = [run_summary(run) for run in runs]
    for doc, store in zip(docs, filtered):
        doc["filtered"] = filtered_summary(store)
    return {"runs": docs}


def _name(doc: dict[str, Any]) -> str:
    conditioning = f"{doc['label_size']} slice bins" if doc["label_size"] else "unconditioned"
    return f"`{Path(doc['run']).name}` ({conditioning})"


def render(doc: dict[str, Any]) -> str:
    """The comparison as Markdown."""
    runs = doc["runs"]
    lines = ["# PGAN runs compared", "",
             "SWD ×10³ against the run's real training masks (lower is closer); the ratio is best tick ÷ tick 0.", "",
             "| run | ticks | best tick | SWD best | SWD tick 0 | ratio | filter | dropped |",
             "|---|---:|---|---:|---:|---:|---|---:|"]
    for r in runs:
        f = r.get("filtered")
        drop = (f"{f['filter']} ({f['threshold']:g})", f"{f['dropped']} / {f['kept'] + f['dropped']} "
                f"({f['dropped_percent']:.1f} %)") if f else ("—", "—")
        lines.append(f"| {_name(r)} | {r['ticks']} | {r['best']} | {r['best_swd']:.2f} | {r['tick0_swd']:.2f} | "
                     f"{r['ratio']:.3f} | {drop[0]} | {drop[1]} |")
    for r in runs:
        lines += _bin_table(r)
    return "\n".join(lines) + "\n"


def _bin_table(run: dict[str, Any]) -> list[str]:
    swd = {b["bin"]: b for b in run.get("bins", [])}
    drops = {b["bin"]: b for b in run.get("filtered", {}).get("bins", [])}
    if not swd and not drops:
        return []
    lines = ["", f"## {_name(run)} per slice bin", "",
             "| bin | slices | real masks | SWD (best tick) | generated | dropped |", "|---:|---|---:|---:|---:|---:|"]
    for b in sorted(set(swd) | set(drops)):
        s, d = swd.get(b, {}), drops.get(b)
        value = "—" if s.get("swd") is None else f"{s['swd']:.2f}"
        dropped = "—" if d is None else f"{d['dropped']} ({100 * d['dropped'] / d['masks']:.1f} %)" if d["masks"] \
            else "0"
        lines.append(f"| {b} | {s.get('slices', '')} | {s.get('real', '')} | {value} | "
                     f"{'' if d is None else d['masks']} | {dropped} |")
    return lines
