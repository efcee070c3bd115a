"""The SPADE trainer: mask → MR image, learned from the real store's pairs, on the shared loop.

Fills in :class:`toolkit.train.loop.Task` with the official recipe (reference: shared/reference/official-codes.md)
at the paper's settings: no VAE encoder, no VGG loss, no instance map, no flipping, no resizing.

- Data: the (non-empty by default) pairs of a real store's training split or its reduced prefix. Images are scaled to
  [−1, 1] with the store's intensity maximum, which every checkpoint and ``generator.pt`` carry, so synthesis writes
  native uint16 (the official code clips to 8 bits and assumes 3 channels).
- One step, in the official order: a G step (hinge ``−D(fake)`` plus λ_feat × the L1 feature-matching loss between D's
  intermediate features on fake and real, averaged over the discriminators, plus, where ``lambda_l1`` > 0 (not in
  the paper's recipe; pix2pix's term), λ_l1 × the pixel L1 between fake and real in [−1, 1]), then a D step (hinge
  ``relu(1 − D(real)) + relu(1 + D(fake))`` on a freshly generated, detached fake). Fake and real go through D as one
  batch, as officially, so spectral norm's power iteration runs once per pass.
- TTUR: Adam β (0, 0.9), G lr 1e-4, D lr 4e-4; an optional linear decay to zero over the last ``decay_epochs``
  (a pure function of the epoch, so resume needs nothing extra).
- Multi-process: G and D are DDP-wrapped; SPADE's parameter-free BatchNorm is synchronised across ranks.
- After every epoch: ``generator.pt`` (what ``generate images`` loads), a grid of mask / synthetic / class mean / real
  MR on ``samples`` validation rows spread over those with the larger brain areas (the paper's Fig. 7), and image
  metrics over all non-empty validation pairs: ``val_l1``, ``val_psnr``, ``val_ssim`` of what synthesis writes
  (eval-mode G, rounded and clipped to [0, max]) against the real MR, and ``baseline_l1``/``_psnr``/``_ssim`` of the
  class-mean baseline (every mask class painted with its mean training intensity; :mod:`toolkit.train.spade_eval`),
  the bar SPADE must beat. Means over images, in store intensity units, PSNR and SSIM with the intensity maximum as
  data range. The baseline's sums are computed once, at start-up; the ranks split the validation rows and sum their
  shares.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from toolkit.atomic import atomic_path
from toolkit.config import Decay, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, from_dict, to_dict
from toolkit.data.dataset import SliceDataset, Source
from toolkit.data.store import Store
from toolkit.models.spade import MultiscaleDiscriminator, SPADEConfig, SPADEGenerator, one_hot
from toolkit.report.figures import row_grid
from toolkit.train.distributed import Dist
from toolkit.train.loader import EpochBatches, EpochLoader, to_device
from toolkit.train.loop import LoopConfig
from toolkit.train.lr import linear_decay, set_lr
from toolkit.train.precision import Precision
from toolkit.train.runtime import RuntimeConfig, adam, compiled, prepare_device
from toolkit.train.spade_eval import (
    class_means,
    largest_brains,
    metric_means,
    metric_sums,
    paint,
    predicted_pairs,
    validation_loader,
)

log = logging.getLogger(__name__)

GENERATOR = "generator.pt"


@dataclass(frozen=True)
class SPADEDataConfig:
    """The pairs SPADE learns: a real store's training split (or its reduced prefix), empty masks dropped."""

    store: Path
    reduced: bool = False
    drop_empty: bool = True
    workers: NonNegativeInt = 0


@dataclass(frozen=True)
class SPADEOptimConfig:
    """TTUR Adam (official: lr 2e-4 halved for G, doubled for D) and the loss weight; batch is the global batch."""

    lr_g: PositiveFloat = 1e-4
    lr_d: PositiveFloat = 4e-4
    beta1: Decay = 0.0
    beta2: Decay = 0.9
    lambda_feat: NonNegativeFloat = 10.0
    # pixel L1 to the real image (0: the paper's recipe). Short runs: it pulls G to the pairs' conditional mean
    # within a few hundred steps, which the GAN terms alone take thousands of steps to reach.
    lambda_l1: NonNegativeFloat = 0.0
    batch: PositiveInt = 1
    decay_epochs: NonNegativeInt = 0


@dataclass(frozen=True)
class SPADERunConfig:
    """A SPADE training run (configs/paper/spade.yaml, configs/demo-spade.yaml)."""

    data: SPADEDataConfig
    model: SPADEConfig = field(default_factory=SPADEConfig)
    optim: SPADEOptimConfig = field(default_factory=SPADEOptimConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=50))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    samples: PositiveInt = 8
    seed: NonNegativeInt = 0

    def input_stores(self) -> dict[str, Path]:
        """The stores this run reads, by config key (their fingerprints are recorded in the run directory)."""
        return {"data.store": self.data.store}


Scale = float | torch.Tensor  # one intensity maximum, or one per channel ([C], on the images' device)


def _per_channel(scale: Scale) -> Scale:
    return scale.view(1, -1, 1, 1) if isinstance(scale, torch.Tensor) else scale


def to_unit(image: torch.Tensor, intensity_max: Scale) -> torch.Tensor:
    """Raw intensities [0, max] → [−1, 1] (each channel over its own maximum when ``intensity_max`` is [C])."""
    return image * (2 / _per_channel(intensity_max)) - 1


def to_uint16(image: torch.Tensor, intensity_max: Scale) -> torch.Tensor:
    """Generator output in [−1, 1] → raw intensities, rounded and clipped to [0, max] (int32; uint16-safe)."""
    peak = _per_channel(intensity_max)
    return torch.round((image.float() + 1) * (peak / 2)).clamp_min(0).clamp(max=peak).to(torch.int32)


def channel_scale(intensity_max: float | Sequence[float], device: torch.device) -> Scale:
    """What :func:`to_unit` takes for a generator's saved ``intensity_max``: the float of a one-channel store, or the
    per-channel maxima of a several-modality one as a [C] tensor on ``device``."""
    if isinstance(intensity_max, (int, float)):
        return float(intensity_max)
    return torch.as_tensor([float(v) for v in intensity_max], dtype=torch.float32, device=device)


def hinge_d(scores: list[list[torch.Tensor]], real: bool) -> torch.Tensor:
    """Hinge loss of D on real (``relu(1 − s)``) or fake (``relu(1 + s)``) patches, averaged over discriminators."""
    sign = -1 if real else 1
    return torch.stack([F.relu(1 + sign * features[-1]).mean() for features in scores]).mean()


def hinge_g(scores: list[list[torch.Tensor]]) -> torch.Tensor:
    """Generator hinge loss ``−D(fake)``, averaged over discriminators."""
    return torch.stack([-features[-1].mean() for features in scores]).mean()


def feature_matching(fake: list[list[torch.Tensor]], real: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between D's intermediate features on fake and (detached) real, summed over layers, averaged over Ds."""
    total = sum(F.l1_loss(f, r.detach()) for f_layers, r_layers in zip(fake, real)
                for f, r in zip(f_layers[:-1], r_layers[:-1]))
    return total / len(fake)


def split_scores(scores: list[list[torch.Tensor]]) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """D's outputs on ``cat(fake, real)`` → (outputs on fake, outputs on real)."""
    halves = [[f.chunk(2) for f in features] for features in scores]
    return [[f for f, _ in h] for h in halves], [[r for _, r in h] for h in halves]


def _discriminate(D: torch.nn.Module, segmap: torch.Tensor, fake: torch.Tensor, real: torch.Tensor,
                  precision: Precision) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """D's outputs on fake and on real, from one pass over both (as officially: one spectral-norm power step)."""
    with precision.autocast():
        scores = D(torch.cat([segmap, segmap]), torch.cat([fake, real]))
    return split_scores([[f.float() for f in features] for features in scores])


def train_iteration(G: torch.nn.Module, D: torch.nn.Module, opt_G: torch.optim.Optimizer,
                    opt_D: torch.optim.Optimizer, segmap: torch.Tensor, real: torch.Tensor, *, lambda_feat: float,
                    precision: Precision, lambda_l1: float = 0.0) -> dict[str, torch.Tensor]:
    """One official SPADE iteration: a G step (hinge + feature matching, + pixel L1 where ``lambda_l1`` > 0), then
    a D step on a fresh, detached fake.

    The losses come back as detached device tensors: reading them is the caller's host synchronisation.
    """
    with precision.autocast():
        fake = G(segmap)
    on_fake, on_real = _discriminate(D, segmap, fake, real, precision)
    loss_gan, loss_feat = hinge_g(on_fake), lambda_feat * feature_matching(on_fake, on_real)
    pixel = {"loss_g_l1": lambda_l1 * F.l1_loss(fake.float(), real)} if lambda_l1 > 0 else {}
    opt_G.zero_grad(set_to_none=True)
    precision.backward(loss_gan + loss_feat + sum(pixel.values()))
    precision.step(opt_G)

    with torch.no_grad(), precision.autocast():
        fake = G(segmap)
    on_fake, on_real = _discriminate(D, segmap, fake.detach(), real, precision)
    loss_d_fake, loss_d_real = hinge_d(on_fake, real=False), hinge_d(on_real, real=True)
    opt_D.zero_grad(set_to_none=True)
    precision.backward(loss_d_fake + loss_d_real)
    precision.step(opt_D)
    losses = {"loss_g_gan": loss_gan, "loss_g_feat": loss_feat, **pixel, "loss_d_fake": loss_d_fake,
              "loss_d_real": loss_d_real}
    return {k: v.detach() for k, v in losses.items()}


class SPADETask:
    """Networks, TTUR optimisers and the per-step hinge + feature-matching computation."""

    def __init__(self, cfg: SPADERunConfig, dist: Dist, run_dir: Path) -> None:
        if cfg.optim.batch % dist.world_size:
            raise ValueError(f"optim.batch = {cfg.optim.batch} must be divisible by the {dist.world_size} ranks")
        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
        d = cfg.data
        manifest = Store(d.store).manifest
        if manifest.intensity_max is None:
            raise ValueError(f"{d.store}: mask-only store; SPADE trains on image/mask pairs")
        if manifest.image_size != cfg.model.resolution:
            raise ValueError(f"{d.store}: images are {manifest.image_size}², model.resolution is "
                             f"{cfg.model.resolution}")
        if manifest.classes != cfg.model.label_nc:
            raise ValueError(f"{d.store}: {manifest.classes}-class masks, model.label_nc is {cfg.model.label_nc}")
        if manifest.channels != cfg.model.out_channels:
            raise ValueError(f"{d.store}: {manifest.channels}-channel images (modality {manifest.modality}), "
                             f"model.out_channels is {cfg.model.out_channels}: set model.out_channels: "
                             f"{manifest.channels}")
        self.train_set = SliceDataset([Source(d.store, "train", n="reduced" if d.reduced else None,
                                              drop_empty=d.drop_empty)], classes=cfg.model.label_nc)
        self.intensity_max = float(manifest.intensity_max)  # the metrics' data range
        # [−1, 1] per channel: one store maximum for one modality (as the official code scales), each modality's own
        # training maximum for several, whose ranges differ (raw FLAIR runs about twice T1ce in the phantom)
        peaks = (self.intensity_max if manifest.channels == 1
                 else list(SliceDataset([Source(d.store, "train")], classes=cfg.model.label_nc).intensity_stats()
                           .channel_max))
        self.scale = channel_scale(peaks, dist.device)
        self.modalities = manifest.modalities if manifest.channels > 1 else ()  # names the grid rows and metrics
        self.meta = {"intensity_max": peaks, "modality": manifest.modality, "store": str(d.store),
                     "reduced": d.reduced}
        if len(self.train_set) < cfg.optim.batch:
            raise ValueError(f"{d.store}: {len(self.train_set)} training pairs, fewer than one batch")
        self._init_validation(cfg, dist)
        log.info("SPADE on %s; intensity max %s", self.train_set.describe(), peaks)

        runtime = cfg.runtime
        prepare_device(dist.device)
        self.precision = Precision.for_device(runtime.precision, dist.device)
        self.memory_format = runtime.memory_format(dist.device)
        torch.manual_seed(cfg.seed)
        self.G = SPADEGenerator(cfg.model).to(memory_format=self.memory_format)
        self.D = MultiscaleDiscriminator(cfg.model).to(memory_format=self.memory_format)
        self.G_net = compiled(dist.wrap(self.G, sync_bn=True), runtime.compile)
        self.D_net = compiled(dist.wrap(self.D), runtime.compile)
        o = cfg.optim
        self.opt_G = dist.optimizer(adam(self.G.parameters(), dist.device, lr=o.lr_g, betas=(o.beta1, o.beta2)))
        self.opt_D = dist.optimizer(adam(self.D.parameters(), dist.device, lr=o.lr_d, betas=(o.beta1, o.beta2)))
        self.loader = EpochLoader(self.train_set, EpochBatches(len(self.train_set), o.batch, seed=cfg.seed,
                                                               rank=dist.rank, world_size=dist.world_size),
                                  workers=d.workers, device=dist.device)

    def _init_validation(self, cfg: SPADERunConfig, dist: Dist) -> None:
        """This rank's share of the non-empty validation pairs (a loader of chunks), the baseline's metric sums over
        it, and on the main rank the grid's rows."""
        source = Source(cfg.data.store, "val", drop_empty=True)
        val = SliceDataset([source], classes=cfg.model.label_nc)
        if not len(val):
            raise ValueError(f"{cfg.data.store}: no non-empty validation pairs to evaluate SPADE on")
        self.val_loader = validation_loader(val, dist, workers=cfg.data.workers)
        self.class_means = torch.as_tensor(class_means(self.train_set), dtype=torch.float32)
        log.info("class-mean baseline (training intensities by class): %s", self.class_means.round().tolist())
        cpu = torch.device("cpu")  # the baseline needs no network: computed here once, whatever the run's device
        self.baseline_sums = metric_sums(predicted_pairs(self.val_loader, lambda label: paint(self.class_means, label),
                                                         cpu), self.intensity_max, cpu, cfg.model.out_channels)
        self.grid_batch = (val.collate(val.__getitems__(largest_brains(source, cfg.model.label_nc, cfg.samples)))
                           if dist.is_main else None)

    def loop_config(self) -> LoopConfig:
        return self.cfg.loop

    # --- data -------------------------------------------------------------------------------------------------
    def batches_per_epoch(self, epoch: int = 0) -> int:
        return len(self.train_set) // self.cfg.optim.batch

    def batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        # The learning rate is a pure function of the epoch, set whenever an epoch's batches are asked for (so also
        # on resume).
        o = self.cfg.optim
        scale = linear_decay(epoch, self.cfg.loop.epochs, o.decay_epochs)
        set_lr(self.opt_G, o.lr_g * scale)
        set_lr(self.opt_D, o.lr_d * scale)
        return self.loader.epoch(epoch, start)

    def _inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(one-hot mask, image in [−1, 1]) on the device, in the configured memory format."""
        image, label = to_device(batch, self.dist.device)
        segmap = one_hot(label, self.cfg.model.label_nc)
        image = to_unit(image, self.scale)
        return segmap.contiguous(memory_format=self.memory_format), image.contiguous(memory_format=self.memory_format)

    # --- steps ------------------------------------------------------------------------------------------------
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        segmap, real = self._inputs(batch)
        return train_iteration(self.G_net, self.D_net, self.opt_G, self.opt_D, segmap, real,
                               lambda_feat=self.cfg.optim.lambda_feat, lambda_l1=self.cfg.optim.lambda_l1,
                               precision=self.precision)

    def _synthesise(self, label: torch.Tensor) -> torch.Tensor:
        """What synthesis writes for labels [N, H, W] on the device: intensities [N, C, H, W] (float, integral)."""
        segmap = one_hot(label, self.cfg.model.label_nc).contiguous(memory_format=self.memory_format)
        return to_uint16(self.G(segmap), self.scale).float()

    @torch.no_grad()
    def evaluate(self, epoch: int) -> dict[str, float]:
        """End of an epoch: ``generator.pt``, the sample grid, and SPADE's and the baseline's validation metrics
        (the same on every rank: each sums its share of the rows, one all-reduce combines them)."""
        device = self.dist.device
        self.G.eval()
        try:
            sums = metric_sums(predicted_pairs(self.val_loader, self._synthesise, device), self.intensity_max, device,
                               self.cfg.model.out_channels)
            grid = self._synthesise(self.grid_batch["label"].to(device)) if self.dist.is_main else None
        finally:
            self.G.train()
        sums = self.dist.all_reduce_sum(torch.cat([sums, self.baseline_sums.to(device)]))
        if self.dist.is_main:
            save_generator(self.G, self.cfg.model, {**self.meta, "epoch": epoch}, self.run_dir / GENERATOR)
            label = self.grid_batch["label"]
            images = {"synthetic": grid.cpu(), "class mean": paint(self.class_means, label),
                      "real": self.grid_batch["image"]}
            rows = [(f"{title}{name}", batch[:, c].numpy(), False)
                    for c, name in enumerate([f" {m}" for m in self.modalities] or [""])
                    for title, batch in images.items()]
            row_grid([("mask", label.numpy(), True), *rows],
                     self.run_dir / "samples" / f"epoch-{epoch:04d}.png", f"SPADE epoch {epoch}")
        half = len(sums) // 2
        return {**metric_means(sums[:half], "val", self.modalities),
                **metric_means(sums[half:], "baseline", self.modalities)}

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "opt_G": self.opt_G.state_dict(),
                "opt_D": self.opt_D.state_dict(), "intensity_max": self.meta["intensity_max"],
                "precision": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["intensity_max"] != self.meta["intensity_max"]:
            raise ValueError(f"checkpoint intensity_max {state['intensity_max']} differs from the store's "
                             f"{self.meta['intensity_max']}: the store changed under the run")
        self.G.load_state_dict(state["G"], strict=True)
        self.D.load_state_dict(state["D"], strict=True)
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.precision.load_state_dict(state.get("precision", {}))

    def save_best(self, path: Path) -> None:
        save_generator(self.G, self.cfg.model, {**self.meta, "epoch": None}, path)


def save_generator(G: SPADEGenerator, model: SPADEConfig, meta: dict[str, Any], path: Path) -> None:
    """Atomically write what synthesis needs: generator weights, model config and ``meta`` (intensity maximum,
    modality, training store, epoch)."""
    with atomic_path(path) as tmp:
        torch.save({"G": G.state_dict(), "model": to_dict(model), **meta}, tmp)


def load_generator(path: Path, device: torch.device) -> tuple[SPADEGenerator, dict[str, Any]]:
    """A saved generator in eval mode (BatchNorm on its running statistics) and its metadata."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    G = SPADEGenerator(from_dict(SPADEConfig, saved["model"], source=str(path)))
    G.load_state_dict(saved["G"], strict=True)
    return G.to(device).eval(), {k: v for k, v in saved.items() if k != "G"}
