"""Figures: rows of input / prediction / ground truth, as in the paper's segmentation figures (Figs 8–10)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on cluster nodes
import matplotlib.pyplot as plt
import numpy as np

from toolkit.atomic import atomic_path


def segmentation_grid(images: np.ndarray, predictions: np.ndarray, truths: np.ndarray, classes: int,
                      path: Path, titles: list[str] | None = None) -> Path:
    """Save a 3-row grid (input, prediction, truth) with one column per slice; returns ``path``."""
    columns = len(images)
    fig, axes = plt.subplots(3, columns, figsize=(2.2 * columns, 6.6), squeeze=False)
    for col in range(columns):
        for row, (data, kwargs) in enumerate((
            (images[col], {"cmap": "gray"}),
            (predictions[col], {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"}),
            (truths[col], {"cmap": "tab10", "vmin": 0, "vmax": 9, "interpolation": "nearest"}),
        )):
            ax = axes[row, col]
            ax.imshow(data, **kwargs)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(("input", "prediction", "truth")[row])
        if titles:
            axes[0, col].set_title(titles[col], fontsize=7)
    fig.suptitle(f"{classes}-class segmentation")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def curve(x: list[float], y: list[float], path: Path, *, xlabel: str, ylabel: str, mark: float | None = None) -> Path:
    """Save a line plot of ``y`` against ``x``, with an optional vertical marker (e.g. the best tick)."""
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(x, y, marker="o", markersize=3)
    if mark is not None:
        ax.axvline(mark, color="tab:red", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path
