"""The PGAN trainer: progressive growing of 7-class mask generators with WGAN-GP, on the shared loop.

Fills in :class:`toolkit.train.loop.Task` with the official recipe (reference: shared/reference/official-codes.md):

- an "epoch" of the loop is a *tick* of the official schedule; one loop step is one official iteration, i.e.
  ``minibatch_repeats`` × (one D step, one G step) at the schedule's lod and minibatch for the iteration's start;
- WGAN-GP: D loss ``D(fake) − D(real) + λ·(‖∇D(x̂)‖ − 1)² + ε·D(real)²`` with x̂ a per-sample uniform lerp of real and
  fake, G loss ``−D(G(z))``; Adam (lr 1e-3, β 0/0.99, ε 1e-8) whose state is reset when a fade starts or ends; an EMA
  of G (β 0.999) is what snapshots hold;
- data: the non-empty masks of a real store's training split (optionally its reduced prefix), label values 0…6 mapped
  linearly to [−1, 1], 2×2 box-averaged down to the training resolution when the store is larger;
- after every tick: ``snapshots/tick-<t>.pt`` (EMA generator + everything generation needs) and a sample grid;
- multi-process (``--dist ddp``): as the official multi-GPU code, each rank takes minibatch / ranks of every minibatch
  and gradients are averaged over ranks; minibatch-stddev therefore sees only the rank's share (groups stay per GPU).

Real minibatches are drawn with a generator seeded by (seed, iteration), latents and GP mixing weights from the global
torch RNG (restored from checkpoints), so a resumed run continues bit-identically on CPU.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.atomic import atomic_path
from toolkit.config import to_dict
from toolkit.data.dataset import SliceDataset, Source
from toolkit.models.pgan import Discriminator, Generator, PGANConfig, blend_reals
from toolkit.report.figures import sample_grid
from toolkit.train.distributed import Dist
from toolkit.train.loop import LoopConfig
from toolkit.train.pgan_schedule import ScheduleConfig, Tick, optimizer_reset, ticks
from toolkit.train.sampling import epoch_seed
from toolkit.train.unet import RuntimeConfig

log = logging.getLogger(__name__)

MAX_LABEL = 6.0  # 7-class masks: dynamic range [0, 6]


@dataclass(frozen=True)
class PGANDataConfig:
    """The masks the PGAN learns: non-empty rows of a store's training split (or its reduced prefix)."""

    store: Path
    reduced: bool = False


@dataclass(frozen=True)
class PGANOptimConfig:
    lr: float = 1e-3
    beta1: float = 0.0
    beta2: float = 0.99
    eps: float = 1e-8
    gp_lambda: float = 10.0
    drift: float = 1e-3
    ema: float = 0.999


@dataclass(frozen=True)
class PGANRunConfig:
    """A PGAN training run (configs/paper/pgan.yaml, configs/demo-pgan.yaml). ``loop.epochs`` is ignored: the
    schedule's tick count is the run's length."""

    data: PGANDataConfig
    model: PGANConfig = field(default_factory=PGANConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: PGANOptimConfig = field(default_factory=PGANOptimConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(checkpoint_every_minutes=15.0))
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    samples: int = 16
    seed: int = 0


def to_unit(labels: torch.Tensor) -> torch.Tensor:
    """Class labels 0…6 → [−1, 1]."""
    return labels.float() * (2 / MAX_LABEL) - 1


def reals_at(labels: torch.Tensor, resolution: int) -> torch.Tensor:
    """Masks as the PGAN sees them: labels [N,S,S] → [N,1,R,R] in [−1, 1], box-averaged down from S to R like the
    official dataset's lower-resolution copies."""
    reals = to_unit(labels)[:, None]
    factor = labels.shape[-1] // resolution
    return F.avg_pool2d(reals, factor) if factor > 1 else reals


def to_labels(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [−1, 1] → nearest class in 0…6 (uint8)."""
    return torch.round((images + 1) * (MAX_LABEL / 2)).clamp(0, MAX_LABEL).to(torch.uint8)


def d_loss(G: Generator, D: Discriminator, reals: torch.Tensor, latents: torch.Tensor, mix: torch.Tensor, lod: float,
           o: PGANOptimConfig) -> torch.Tensor:
    """WGAN-GP discriminator loss: D(fake) − D(real) + λ·(‖∇D(x̂)‖₂ − 1)² + ε·D(real)², x̂ = lerp(real, fake, mix)."""
    with torch.no_grad():
        fakes = G(latents, lod)
    real_scores, fake_scores = D(reals, lod).flatten(), D(fakes, lod).flatten()
    mixed = (reals + mix * (fakes - reals)).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(mixed, lod).sum(), mixed, create_graph=True)
    penalty = (grad.flatten(1).norm(dim=1) - 1) ** 2
    return (fake_scores - real_scores + o.gp_lambda * penalty + o.drift * real_scores**2).mean()


def g_loss(G: Generator, D: Discriminator, latents: torch.Tensor, lod: float) -> torch.Tensor:
    """WGAN generator loss: −D(G(z))."""
    return -D(G(latents, lod), lod).mean()


@dataclass(frozen=True)
class Iteration:
    """One official loop iteration: its global index, images shown before it, lod and minibatch, and the reals."""

    index: int
    nimg: int
    lod: float
    minibatch: int
    reals: torch.Tensor  # this rank's share: [repeats, minibatch / ranks, C, R, R] in [−1, 1]


class PGANTask:
    """Networks, optimisers, EMA and the per-iteration WGAN-GP computation."""

    def __init__(self, cfg: PGANRunConfig, dist: Dist, run_dir: Path) -> None:
        if any(mb % dist.world_size for mb in cfg.schedule.minibatch.values()):
            raise ValueError(f"every schedule.minibatch must be divisible by the {dist.world_size} ranks")
        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
        source = Source(cfg.data.store, "train", n="reduced" if cfg.data.reduced else None, drop_empty=True)
        self.data = SliceDataset([source], classes=7, with_image=False)
        if self.data.image_size < cfg.model.resolution:
            raise ValueError(f"{cfg.data.store}: masks are {self.data.image_size}², smaller than the PGAN's "
                             f"{cfg.model.resolution}²")
        log.info("PGAN on %s non-empty masks", self.data.describe())
        self.ticks: list[Tick] = ticks(replace(cfg.schedule, resolution=cfg.model.resolution))
        torch.manual_seed(cfg.seed)
        device = dist.device
        self.G = Generator(cfg.model).to(device)
        self.D = Discriminator(cfg.model).to(device)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_G, self.opt_D = self._optimizer(self.G), self._optimizer(self.D)
        self.prev_lod = -1.0
        self.sample_z = torch.randn(cfg.samples, cfg.model.latent, generator=torch.Generator().manual_seed(cfg.seed))

    def _optimizer(self, net: torch.nn.Module) -> torch.optim.Adam:
        o = self.cfg.optim
        return torch.optim.Adam(net.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)

    def loop_config(self) -> LoopConfig:
        return replace(self.cfg.loop, epochs=len(self.ticks))

    # --- data -------------------------------------------------------------------------------------------------
    def batches_per_epoch(self, epoch: int) -> int:
        return len(self.ticks[epoch].iterations)

    def batches(self, epoch: int, start: int) -> Iterator[Iteration]:
        tick = self.ticks[epoch]
        for k, (nimg, lod, minibatch) in enumerate(tick.iterations[start:], start):
            yield self._iteration(tick.first_iteration + k, nimg, lod, minibatch)

    def _iteration(self, index: int, nimg: int, lod: float, minibatch: int) -> Iteration:
        repeats = self.cfg.schedule.minibatch_repeats
        rows = torch.randint(len(self.data), (repeats * minibatch,),
                             generator=torch.Generator().manual_seed(epoch_seed(self.cfg.seed, index))).tolist()
        labels = self.data.collate(self.data.__getitems__(rows))["label"]
        reals = reals_at(labels, self.cfg.model.resolution)
        reals = reals.reshape(repeats, minibatch, *reals.shape[1:])[:, self._share(minibatch)]
        return Iteration(index, nimg, lod, minibatch, reals)

    def _share(self, minibatch: int) -> slice:
        """This rank's rows of a minibatch: the official multi-GPU split (each GPU takes minibatch / GPUs)."""
        size = minibatch // self.dist.world_size
        return slice(self.dist.rank * size, (self.dist.rank + 1) * size)

    # --- steps ------------------------------------------------------------------------------------------------
    def train_step(self, it: Iteration) -> dict[str, float]:
        if optimizer_reset(self.prev_lod, it.lod):
            # official: Adam state is reset when a fade starts or ends (and at the start of training)
            self.opt_G, self.opt_D = self._optimizer(self.G), self._optimizer(self.D)
        self.prev_lod = it.lod
        d_losses, g_losses = [], []
        for reals in it.reals.to(self.dist.device):
            d_losses.append(self._d_step(blend_reals(reals, it.lod), it.lod, it.minibatch))
            g_losses.append(self._g_step(it.minibatch, it.lod))
            self._update_ema()
        return {"loss_d": float(np.mean(d_losses)), "loss_g": float(np.mean(g_losses)), "lod": it.lod,
                "kimg": (it.nimg + len(it.reals) * it.minibatch) / 1000}

    def _draw(self, minibatch: int, *shape: int, uniform: bool = False) -> torch.Tensor:
        """This rank's rows of a whole-minibatch draw from the global RNG: every rank draws the same numbers, so the
        RNG state stays identical across ranks and a run is the same whatever the rank count (but for mbstd)."""
        values = torch.rand(minibatch, *shape) if uniform else torch.randn(minibatch, *shape)
        return values[self._share(minibatch)].to(self.dist.device)

    def _d_step(self, reals: torch.Tensor, lod: float, minibatch: int) -> float:
        latents = self._draw(minibatch, self.cfg.model.latent)
        mix = self._draw(minibatch, 1, 1, 1, uniform=True)
        loss = d_loss(self.G, self.D, reals, latents, mix, lod, self.cfg.optim)
        self.opt_D.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(self.D.parameters())  # official multi-GPU rule
        self.opt_D.step()
        return float(loss.detach())

    def _g_step(self, minibatch: int, lod: float) -> float:
        loss = g_loss(self.G, self.D, self._draw(minibatch, self.cfg.model.latent), lod)
        self.opt_G.zero_grad(set_to_none=True)
        loss.backward()
        self.dist.average_gradients(self.G.parameters())  # official multi-GPU rule
        self.opt_G.step()
        return float(loss.detach())

    @torch.no_grad()
    def _update_ema(self) -> None:
        for ema, live in zip(self.G_ema.parameters(), self.G.parameters()):
            ema.lerp_(live, 1 - self.cfg.optim.ema)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """End of a tick: write the snapshot and a sample grid of the EMA generator."""
        tick = self.ticks[epoch]
        lod = tick.iterations[-1][1]
        summary = {"tick": float(epoch), "kimg": tick.end_nimg / 1000, "lod": lod}
        if not self.dist.is_main:
            return summary
        with atomic_path(self.run_dir / "snapshots" / f"tick-{epoch:04d}.pt") as tmp:
            torch.save({"G_ema": self.G_ema.state_dict(), "model": to_dict(self.cfg.model), "lod": lod,
                        "kimg": tick.end_nimg / 1000, "tick": epoch, "store": str(self.cfg.data.store)}, tmp)
        with torch.no_grad():
            samples = to_labels(self.G_ema(self.sample_z.to(self.dist.device), lod)[:, 0]).cpu().numpy()
        sample_grid(samples, self.run_dir / "samples" / f"tick-{epoch:04d}.png", title=f"tick {epoch}, lod {lod:.2f}")
        return summary

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                "opt_G": self.opt_G.state_dict(), "opt_D": self.opt_D.state_dict(), "prev_lod": self.prev_lod}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.G.load_state_dict(state["G"], strict=True)
        self.D.load_state_dict(state["D"], strict=True)
        self.G_ema.load_state_dict(state["G_ema"], strict=True)
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        self.prev_lod = float(state["prev_lod"])
