"""Figures: row grids (input / prediction / truth as the paper's Figs 8–10; mask / synthetic / real MR as Fig. 7),
sample grids of generated masks, and curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import numpy as np

from toolkit.atomic import atomic_path


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically and free it; returns ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def row_grid(rows: list[tuple[str, np.ndarray, bool]], path: Path, title: str = "",
             column_titles: list[str] | None = None) -> Path:
    """Save a grid with one row per ``(name, images, is_label)`` and one column per slice; returns ``path``.

    Label rows are coloured by class, image rows grey (each image scaled to its own range).
    """
    columns = len(rows[0][1])
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.2 * len(rows)), squeeze=False)
    for r, (name, data, is_label) in enumerate(rows):
        kwargs = {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"} if is_label else {"cmap": "gray"}
        for col in range(columns):
            ax = axes[r, col]
            ax.imshow(data[col], **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name)
    for col, text in enumerate(column_titles or []):
        axes[0, col].set_title(text, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def segmentation_grid(images: np.ndarray, predictions: np.ndarray, truths: np.ndarray, classes: int,
                      path: Path, titles: list[str] | None = None) -> Path:
    """Save a 3-row grid (input, prediction, truth) with one column per slice; returns ``path``."""
    return row_grid([("input", images, False), ("prediction", predictions, True), ("truth", truths, True)], path,
                    f"{classes}-class segmentation", titles)


def sample_grid(labels: np.ndarray, path: Path, title: str = "", columns: int = 8) -> Path:
    """Save a grid of label images (e.g. generated masks) coloured by class; returns ``path``."""
    rows = -(-len(labels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.2 * columns, 1.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        ax.imshow(label, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def curve(x: list[float], y: list[float], path: Path, *, xlabel: str, ylabel: str, mark: float | None = None) -> Path:
    """Save a line plot of ``y`` against ``x``, with an optional vertical marker (e.g. the best tick)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(x, y, marker="o", markersize=3)
    if mark is not None:
        ax.axvline(mark, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return save_figure(fig, path)
