"""The U-Net trainer: the paper's segmentation network trained with the weighted Dice loss on real + synthetic mixes.

Fills in :class:`toolkit.train.loop.Task`. Paper settings (all config values): Adam lr 1e-4 (constant; the demo decays
it linearly over its last ``optim.decay_epochs``), batch 8, 150 epochs, shuffle each epoch, validate each epoch, keep
``best.pt`` when validation improves.

- Inputs: one channel per modality of the stores (``prepare --modality t1ce,flair`` gives two). Normalised
  (``data.normalise``) as the paper did, ``x / max − mean`` with ``max`` the training data's maximum pixel value and
  ``mean`` the scalar mean of the scaled training images, over the data actually trained on (real + synthetic) or,
  with ``stats_from: real``, over the real part only; or, with ``normalise: slice``, each channel of each slice
  divided by the mean of its brain (non-zero) pixels, so that scanner gains, which differ up to 10× between BraTS
  institutions, fall out (:func:`normalise`).
- Loss: ``1 − Σ_c w_c · Dice_c`` with soft Dice from per-class sums over the *global* batch (summed across DDP ranks
  with a differentiable all-reduce, so 2 ranks × 4 equal 1 process × 8) and class weights
  ``w_c = (1/f_c) / Σ_k (1/f_k)`` from the training pixels' class frequencies ``f`` (absent class: weight 0); plus,
  off in the paper's config, ``loss.ce_weight`` × the global batch's pixel cross-entropy (:class:`LossConfig`).
- Validation loss: the same weighted soft Dice loss over the whole validation split, from accumulated sums.
- Batch order: :func:`toolkit.train.sampling.rank_batches` (a permutation per (seed, epoch), equal rank shares of each
  global batch), so resuming mid-epoch only needs the batch index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.atomic import atomic_path
from toolkit.config import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Range, to_dict
from toolkit.data.dataset import SliceDataset, Source
from toolkit.metrics.dice import class_weights, dice_from_sums, soft_sums
from toolkit.models.unet import BN_MOMENTUM, UNet, UNetConfig
from toolkit.train.augment import AugmentConfig, augment, draw
from toolkit.train.distributed import Dist
from toolkit.train.loader import EpochBatches, EpochLoader, loader, to_device
from toolkit.train.loop import LoopConfig
from toolkit.train.lr import linear_decay, set_lr
from toolkit.train.precision import Precision
from toolkit.train.runtime import RuntimeConfig, adam, compiled, prepare_device

log = logging.getLogger(__name__)

PROB_FLOOR = 1e-7  # log of a softmax probability that underflowed to 0 would be −inf


@dataclass(frozen=True)
class DataConfig:
    """Which rows train and validate: a prefix of the real training split plus, optionally, a synthetic store."""

    real: Path
    real_n: NonNegativeInt | None = None  # None: all rows; 0: none (a synthetic-only mix)
    synthetic: Path | None = None
    synthetic_n: NonNegativeInt | None = None
    classes: Annotated[int, Range(ge=2)] = 7  # background and at least one class
    stats_from: Literal["all", "real"] = "all"
    normalise: Literal["max", "slice"] = "max"  # the paper's x / max − mean, or per slice and channel (see normalise)
    val_split: str = "val"
    workers: NonNegativeInt = 0


@dataclass(frozen=True)
class ModelConfig:
    """Widths of the U-Net; the paper's are the defaults, the CPU demo narrows them."""

    widths: tuple[PositiveInt, ...] = (64, 128, 256, 512)
    bridge: PositiveInt = 1024
    bn_momentum: Annotated[float, Range(gt=0.0, le=1.0)] = BN_MOMENTUM  # the paper's Keras default


@dataclass(frozen=True)
class OptimConfig:
    lr: PositiveFloat = 1e-4
    batch: PositiveInt = 8
    decay_epochs: NonNegativeInt = 0  # linear decay to lr / decay_epochs over the last epochs; the paper: constant


@dataclass(frozen=True)
class LossConfig:
    """The training loss: the paper's weighted soft Dice, plus ``ce_weight`` × the (unweighted) pixel cross-entropy.

    The paper uses Dice alone (``ce_weight: 0``). Its inverse-frequency weights give background and grey matter well
    under 1 % of the loss, which 150 epochs can afford to learn from; a few-epoch run (the CPU demo) cannot, and
    predicts the background as whatever the network's stride pattern paints there. Cross-entropy weighs every pixel
    alike, so those classes learn in the first epochs; the metrics stay the paper's weighted Dice.
    """

    ce_weight: NonNegativeFloat = 0.0


@dataclass(frozen=True)
class UNetRunConfig:
    """A U-Net training run (configs/paper/unet.yaml, configs/demo.yaml)."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # none by default, as the paper
    seed: NonNegativeInt = 0

    def input_stores(self) -> dict[str, Path]:
        """The stores this run reads, by config key (their fingerprints are recorded in the run directory)."""
        stores = {"data.real": self.data.real}
        if self.data.synthetic is not None:
            stores["data.synthetic"] = self.data.synthetic
        return stores


def network_config(cfg: UNetRunConfig, in_channels: int = 1) -> UNetConfig:
    """The network a run trains: one input channel per modality of its stores, its class count and the model
    section's sizes."""
    m = cfg.model
    return UNetConfig(in_channels=in_channels, classes=cfg.data.classes, widths=m.widths, bridge=m.bridge,
                      bn_momentum=m.bn_momentum)


def build_model(cfg: UNetRunConfig, in_channels: int = 1) -> UNet:
    """The configured network (before device placement and DDP)."""
    return UNet(network_config(cfg, in_channels))


def training_loss(probs: torch.Tensor, onehot: torch.Tensor, weights: torch.Tensor, ce_weight: float,
                  global_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The weighted soft Dice loss of softmax ``probs`` against ``onehot`` (both ``[N, C, H, W]``), plus ``ce_weight``
    × the mean pixel cross-entropy, each from sums over the global batch (``global_sum`` adds a tensor over the ranks,
    differentiably), so 2 ranks × 4 slices equal 1 process × 8."""
    intersection, total = soft_sums(probs, onehot)
    loss = 1 - (weights * dice_from_sums(global_sum(intersection), global_sum(total))).sum()
    if ce_weight:
        nll = -(onehot * probs.clamp_min(PROB_FLOOR).log()).sum()
        pixels = torch.full_like(nll, onehot.shape[0] * onehot.shape[2] * onehot.shape[3])
        loss = loss + ce_weight * global_sum(nll) / global_sum(pixels)
    return loss


def normalise(image: torch.Tensor, stats: dict[str, Any]) -> torch.Tensor:
    """The network input for raw images ``[N, C, S, S]``: ``image / max − mean`` (the paper's scaling; ``stats``
    from the training data), or, when ``stats["normalise"]`` is ``"slice"``, each channel of each slice over the
    mean of its non-zero pixels (the brain: BraTS volumes are 0 outside it), so the brain averages 1 and the
    background stays 0. Device ops only: no host synchronisation."""
    if stats.get("normalise", "max") == "max":
        return image / stats["max"] - stats["mean"]
    x = image.float()
    brain = (x > 0).sum((2, 3), keepdim=True).clamp_min(1)
    return x / (x.sum((2, 3), keepdim=True) / brain).clamp_min(1.0)  # an empty slice stays 0


class UNetTask:
    """Data, model, optimiser and the two per-step computations of U-Net training."""

    def __init__(self, cfg: UNetRunConfig, dist: Dist, run_dir: Path) -> None:
        # run_dir is part of the task signature; the U-Net writes nothing of its own (the loop places best.pt)
        self.cfg, self.dist = cfg, dist
        if cfg.optim.batch % dist.world_size:
            raise ValueError(f"optim.batch = {cfg.optim.batch} must be divisible by the {dist.world_size} ranks")
        d = cfg.data
        real = Source(d.real, "train", n=d.real_n)
        sources = [real] if d.synthetic is None else [real, Source(d.synthetic, "train", n=d.synthetic_n)]
        self.train_set = SliceDataset(sources, classes=d.classes)
        if len(self.train_set) < cfg.optim.batch:
            raise ValueError(f"{self.train_set.describe()} training rows (from {[str(s.store) for s in sources]}): "
                             f"fewer than one batch of {cfg.optim.batch}")
        self.val_set = SliceDataset([Source(d.real, d.val_split)], classes=d.classes)
        stats_set = self.train_set if d.stats_from == "all" else SliceDataset([real], classes=d.classes)
        peak, mean, _ = stats_set.intensity_stats()
        self.stats = {"max": float(peak), "mean": float(mean), "normalise": d.normalise}
        self.in_channels = self.train_set.channels
        weights = class_weights(self.train_set.class_pixels())
        log.info("training on %s (%s); input max %.0f mean %.4f, normalised by %s; class weights %s",
                 self.train_set.describe(), ",".join(self.train_set.modalities) or "1 channel", peak, mean,
                 d.normalise, np.round(weights, 4).tolist())
        # a constant of every step: on the device once, not copied there per step
        self.weights = torch.as_tensor(weights, dtype=torch.float32, device=dist.device)
        runtime = cfg.runtime
        prepare_device(dist.device)
        self.precision = Precision.for_device(runtime.precision, dist.device)
        self.memory_format = runtime.memory_format(dist.device)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, self.in_channels).to(memory_format=self.memory_format)
        self.net = dist.wrap(self.model, sync_bn=runtime.sync_bn)
        self.step_fn = compiled(self.net, runtime.compile)
        self.optimizer = dist.optimizer(adam(self.net.parameters(), dist.device, lr=cfg.optim.lr))
        self.train_loader = EpochLoader(
            self.train_set, EpochBatches(len(self.train_set), cfg.optim.batch, seed=cfg.seed, rank=dist.rank,
                                         world_size=dist.world_size), workers=d.workers, device=dist.device)
        rows, batch = list(range(dist.rank, len(self.val_set), dist.world_size)), cfg.optim.batch
        val_batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
        self.val_loader = loader(self.val_set, val_batches, workers=d.workers, device=dist.device)
        log.info("U-Net on %s in %s, %s", dist.device, self.precision.name,
                 "channels_last" if self.memory_format == torch.channels_last else "NCHW")

    def loop_config(self) -> LoopConfig:
        return self.cfg.loop

    # --- data -------------------------------------------------------------------------------------------------
    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.train_set) // self.cfg.optim.batch

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        o = self.cfg.optim  # the rate is a pure function of the epoch, set whenever its batches are asked for
        set_lr(self.optimizer, o.lr * linear_decay(epoch, self.cfg.loop.epochs, o.decay_epochs))
        batches = self.train_loader.epoch(epoch, start)
        if not self.cfg.augment.enabled:
            return batches
        return (self._augmented(batch, epoch, index) for index, batch in enumerate(batches, start))

    def _augmented(self, batch: dict[str, torch.Tensor], epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Global batch ``index`` of ``epoch``, this rank's share, on the device and augmented."""
        image, label = to_device(batch, self.dist.device)
        share = len(label)
        params = draw(self.cfg.augment, self.cfg.seed, epoch, index, share * self.dist.world_size)
        image, label = augment(image, label, params.rows(self.dist.rank * share, (self.dist.rank + 1) * share),
                               self.stats["max"])
        return {"image": image, "label": label}

    def _forward(self, batch: dict[str, torch.Tensor], net: Callable | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(net or self.step_fn, batch, self.stats, self.cfg.data.classes, self.dist.device,
                       self.precision, self.memory_format)

    # --- steps ------------------------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.net.train()
        probs, onehot = self._forward(batch)
        loss = training_loss(probs, onehot, self.weights, self.cfg.loss.ce_weight,
                             lambda t: self.dist.all_reduce_sum(t, differentiable=True))
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer)
        return {"loss": loss.detach()}

    def evaluate(self, epoch: int) -> dict[str, float]:
        # the uncompiled network: validation batches may be ragged, and eval-mode BatchNorm is another graph
        sums = segmentation_sums(self.net, self.val_loader, lambda b: self._forward(b, self.net))
        result = dice_results({k: self.dist.all_reduce_sum(v) for k, v in sums.items()}, self.weights)
        return {"val_loss": result["dice_error_percent"] / 100, "val_dice_error_percent": result["dice_error_percent"],
                **{f"val_dice_{c}": v for c, v in enumerate(result["per_class_dice"])}}

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "precision": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state.get("precision", {}))

    def save_best(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save({"model": self.model.state_dict(), "stats": self.stats, "weights": self.weights.cpu(),
                        "in_channels": self.in_channels, "config": to_dict(self.cfg)}, tmp)


# BraTS evaluation regions as sets of 4/7-class tumour labels: whole tumour, tumour core, enhancing tumour.
REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}


def forward(net: Callable[[torch.Tensor], torch.Tensor], batch: dict[str, torch.Tensor], stats: dict[str, Any],
            classes: int, device: torch.device, precision: Precision,
            memory_format: torch.memory_format = torch.contiguous_format) -> tuple[torch.Tensor, torch.Tensor]:
    """Class probabilities (fp32) for a loader batch and its one-hot labels, on ``device``."""
    image, label = to_device(batch, device)
    x = normalise(image, stats).contiguous(memory_format=memory_format)
    onehot = F.one_hot(label, classes).permute(0, 3, 1, 2).float()
    with precision.autocast():
        logits = net(x)
    return torch.softmax(logits.float(), dim=1), onehot


@torch.no_grad()
def segmentation_sums(net: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                      fwd: Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """Dice sums over ``batches`` (this rank's share): soft and hard per class, hard per BraTS region.

    Each value is a float64 [2, K] tensor of (intersection, |P|+|G|) rows, so ranks combine them by summing. The
    network is left in the mode it came in (a training loop's model goes back to training, an evaluator's stays in
    eval for what it draws next).
    """
    was_training = net.training
    net.eval()
    sums: dict[str, torch.Tensor] = {}

    def add(key: str, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        value = torch.stack(pair).double()
        sums[key] = sums[key] + value if key in sums else value

    for batch in batches:
        p, onehot = fwd(batch)
        hard = F.one_hot(p.argmax(1), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
        add("soft", soft_sums(p, onehot))
        add("hard", soft_sums(hard, onehot))
        if p.shape[1] >= 4:
            regions = [list(labels) for labels in REGIONS.values()]
            add("regions", soft_sums(torch.stack([hard[:, r].sum(1) for r in regions], 1),
                                     torch.stack([onehot[:, r].sum(1) for r in regions], 1)))
    net.train(was_training)
    return sums


def dice_results(sums: dict[str, torch.Tensor], weights: torch.Tensor) -> dict[str, Any]:
    """The evaluation numbers from (all-reduced) sums: weighted soft Dice error %, hard Dice per class and region."""
    soft = dice_from_sums(*sums["soft"])
    result: dict[str, Any] = {
        "dice_error_percent": 100 * (1 - float((weights.to(soft.device, torch.float64) * soft).sum())),
        "per_class_dice": dice_from_sums(*sums["hard"]).tolist(),
    }
    if "regions" in sums:
        result["regions"] = dict(zip(REGIONS, dice_from_sums(*sums["regions"]).tolist()))
    return result
