"""Table 1: Dice error % per class set (columns) and real/synthetic mix (rows), as Markdown, CSV and a bar plot.

Cells hold the mean over repeats (± the sample standard deviation when there are several); the best (lowest) value of
each column is bold, as in the paper. Missing cells (members not finished) show as "–".
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.atomic import write_bytes
from toolkit.report.figures import save_figure


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def table1(results: list[dict[str, Any]], *, rows: str, columns: str, row_order: list[str], column_order: list[str],
           out: Path, title: str) -> dict[str, Any]:
    """Aggregate ``results`` (dicts with the ``rows`` and ``columns`` labels and a ``value``) and write
    ``out.md``, ``out.csv`` and ``out.png``; returns the cells and the paths."""
    cells: dict[str, dict[str, dict[str, Any]]] = {r: {} for r in row_order}
    for r in row_order:
        for c in column_order:
            values = [x["value"] for x in results if x[rows] == r and x[columns] == c]
            if values:
                mean, sd = mean_sd(values)
                cells[r][c] = {"mean": mean, "sd": sd, "n": len(values)}
    best = {c: min((cells[r][c]["mean"] for r in row_order if c in cells[r]), default=None) for c in column_order}

    def show(r: str, c: str) -> str:
        if c not in cells[r]:
            return "–"
        cell = cells[r][c]
        text = f"{cell['mean']:.2f}" + (f" ± {cell['sd']:.2f}" if cell["sd"] is not None else "")
        return f"**{text}**" if cell["mean"] == best[c] else text

    markdown = "\n".join([f"**{title}**", "", f"| {rows} | " + " | ".join(f"{columns} {c}" for c in column_order)
                          + " |", "|---|" + "---:|" * len(column_order),
                          *(f"| {r} | " + " | ".join(show(r, c) for c in column_order) + " |" for r in row_order), ""])
    out = Path(out)
    write_bytes(out.with_suffix(".md"), markdown.encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([rows, columns, "mean", "sd", "n"])
    for r in row_order:
        for c, cell in cells[r].items():
            writer.writerow([r, c, repr(cell["mean"]), "" if cell["sd"] is None else repr(cell["sd"]), cell["n"]])
    write_bytes(out.with_suffix(".csv"), buffer.getvalue().encode())
    _plot(cells, row_order, column_order, columns, title, out.with_suffix(".png"))
    return {"cells": cells, "markdown": markdown, "paths": [str(out.with_suffix(s)) for s in (".md", ".csv", ".png")]}


def _plot(cells: dict[str, dict[str, dict[str, Any]]], row_order: list[str], column_order: list[str], columns: str,
          title: str, path: Path) -> None:
    import matplotlib.pyplot as plt  # toolkit.report.figures selected the file-only Agg backend

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(row_order) * len(column_order) / 2, 3.2))
    width = 0.8 / max(1, len(column_order))
    x = np.arange(len(row_order))
    for k, c in enumerate(column_order):
        means = [cells[r][c]["mean"] if c in cells[r] else np.nan for r in row_order]
        sds = [cells[r][c]["sd"] or 0 if c in cells[r] else 0 for r in row_order]
        ax.bar(x + k * width, means, width, yerr=sds, label=f"{columns} {c}")
    ax.set_xticks(x + width * (len(column_order) - 1) / 2, row_order, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("Dice error %")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
