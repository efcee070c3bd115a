"""`tumorsynth evaluate unet RUN`: the best checkpoint of a U-Net run scored on a store split (Table 1's number).

Reports the weighted soft Dice error in percent (100 × the training loss over the whole split, from accumulated
sums), hard Dice per class and, for 4- and 7-class runs, the BraTS regions (whole tumour, tumour core, enhancing
tumour). Results go to ``RUN/eval-<split>.json`` and a figure of input / prediction / truth rows to
``RUN/figures/eval-<split>.png``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from toolkit import config as configs
from toolkit.atomic import write_json
from toolkit.data.dataset import SliceDataset, Source
from toolkit.lock import WriterLock
from toolkit.report.figures import segmentation_grid
from toolkit.train import distributed
from toolkit.train.loader import loader
from toolkit.train.precision import Precision
from toolkit.train.unet import UNetRunConfig, build_model, dice_results, forward, segmentation_sums

FIGURE_COLUMNS = 6


def evaluate_run(run_dir: Path, *, store: Path | None = None, split: str = "test",
                 device: str | None = None) -> dict[str, Any]:
    """Score ``run_dir/best.pt`` on ``split`` of ``store`` (default: the run's real store) into
    ``eval-<split>.json`` and a figure, holding the run directory's lock (a training still running there is refused,
    and a sweep's status sees an evaluating member as running)."""
    with WriterLock(run_dir, "run directory"):
        return _evaluate(Path(run_dir), store, split, device)


def _evaluate(run_dir: Path, store: Path | None, split: str, device: str | None) -> dict[str, Any]:
    cfg = configs.load(UNetRunConfig, run_dir / "config.yaml")
    best_path = run_dir / "best.pt"
    if not best_path.exists():
        raise FileNotFoundError(f"{best_path}: no best checkpoint yet (the run has not finished an epoch)")
    best = torch.load(best_path, map_location="cpu", weights_only=True)
    dev = distributed.pick_device(device)
    precision = Precision.for_device(cfg.runtime.precision, dev)
    memory_format = cfg.runtime.memory_format(dev)
    model = build_model(cfg, int(best.get("in_channels", 1)))
    model.load_state_dict(best["model"], strict=True)
    model.to(dev, memory_format=memory_format).eval()
    dataset = SliceDataset([Source(store or cfg.data.real, split)], classes=cfg.data.classes)
    if dataset.channels != model.config.in_channels:
        raise ValueError(f"{store or cfg.data.real}: {dataset.channels}-channel images, but the U-Net in {best_path} "
                         f"takes {model.config.in_channels}")
    rows, batch = list(range(len(dataset))), cfg.optim.batch
    batches = loader(dataset, [rows[i:i + batch] for i in range(0, len(rows), batch)], workers=0, device=dev)

    def fwd(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(model, batch, best["stats"], cfg.data.classes, dev, precision, memory_format)

    result = {**dice_results(segmentation_sums(model, batches, fwd), best["weights"]),
              "split": split, "store": str(store or cfg.data.real), "slices": len(dataset)}
    write_json(run_dir / f"eval-{split}.json", result)
    _figure(dataset, fwd, cfg.data.classes, run_dir / "figures" / f"eval-{split}.png")
    return result


@torch.no_grad()
def _figure(dataset: SliceDataset, fwd: Any, classes: int, path: Path) -> None:
    """Input / prediction / truth for the slices with the most tumour among the first rows of the split."""
    candidates = dataset.__getitems__(list(range(min(len(dataset), 64))))
    tumour = [int(((s["label"] > 0) & (s["label"] < 4)).sum()) if classes != 2 else int(s["label"].sum())
              for s in candidates]
    chosen = [candidates[i] for i in np.argsort(tumour)[::-1][:FIGURE_COLUMNS]]
    batch = default_collate(chosen)
    probs, _ = fwd(batch)
    segmentation_grid(batch["image"][:, 0].numpy(), probs.argmax(1).cpu().numpy(), batch["label"].numpy(),
                      classes, path)
