"""The PGAN trainer: progressive growing of 7-class mask generators with WGAN-GP, on the shared loop.

Fills in :class:`toolkit.train.loop.Task` with the official recipe (reference: shared/reference/official-codes.md):

- an "epoch" of the loop is a *tick* of the official schedule; one loop step is one official iteration, i.e.
  ``minibatch_repeats`` × (one D step, one G step) at the schedule's lod and minibatch for the iteration's start;
- WGAN-GP: D loss ``D(fake) − D(real) + λ·(‖∇D(x̂)‖ − 1)² + ε·D(real)²`` with x̂ a per-sample uniform lerp of real and
  fake, G loss ``−D(G(z))``; Adam (lr 1e-3, β 0/0.99, ε 1e-8) whose state is reset when a fade starts or ends; an EMA
  of G (β 0.999) is what snapshots hold;
- data: the non-empty masks of a real store's training split (optionally its reduced prefix), label values 0…6 mapped
  linearly to [−1, 1], 2×2 box-averaged down to the training resolution when the store is larger;
- after every tick: ``snapshots/tick-<t>.pt`` (EMA generator, the discriminator ``filter dscore`` scores with, all
  that generation needs, and the training set: ``store`` and ``reduced``, which ``evaluate swd`` scores against) and a
  sample grid;
- multi-process (``--dist ddp``): as the official multi-GPU code, each rank takes minibatch / ranks of every minibatch
  and gradients are averaged over ranks; minibatch-stddev therefore sees only the rank's share (groups stay per GPU);
- slice-position conditioning (``model.label_size`` L > 0; the official label conditioning, ``D_wgangp_acgan`` /
  ``G_wgan_acgan``): a mask's label is its axial bin, one of L equal-width :class:`~toolkit.data.bins.SliceBins`
  spanning the training masks' slice indices. D's loss gains ``cond_weight``·(CE(labels, D's logits on the reals) +
  CE(labels, D's logits on the fakes)), the fakes made with the reals' labels; G's loss gains ``cond_weight``·CE(labels,
  D's logits on G(z, labels)), its labels those of random training rows (the official ``get_random_labels``). The
  gradient penalty and the drift term use the score column only. Snapshots then also hold the bins (``slice_bins``)
  and the training masks' count per bin (``bin_counts``), which generation draws its labels in proportion to.

The masks are read once and stay on the run's device as one uint8 tensor (with their bins as one int64 tensor when
conditioned); real minibatches are rows drawn there with a generator seeded by (seed, iteration), and so are the
rows whose bins label the G steps; latents and GP mixing weights come from the device's global torch RNG
(restored from checkpoints), so a resumed run continues bit-identically on CPU and a step never waits for the host.
Precision: bf16 autocast where the GPU has it, else fp32 — never fp16, whose loss scaling would have to reach through
the gradient penalty's double backward. Memory format: ``runtime.channels_last`` (default on CUDA; the CPU demo turns
it on too, where oneDNN's NHWC kernels are ~20 % faster for its thin layers).
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
from toolkit.config import Decay, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, to_dict
from toolkit.data.bins import SliceBins
from toolkit.data.dataset import SliceDataset, Source
from toolkit.data.store import Store
from toolkit.models.pgan import Discriminator, Generator, PGANConfig, blend_reals
from toolkit.report.figures import sample_grid
from toolkit.train.distributed import Dist
from toolkit.train.loop import LoopConfig
from toolkit.train.pgan_schedule import ScheduleConfig, Tick, optimizer_reset, ticks
from toolkit.train.precision import Precision
from toolkit.train.runtime import RuntimeConfig, adam, prepare_device
from toolkit.train.sampling import epoch_seed

log = logging.getLogger(__name__)

MAX_LABEL = 6.0  # 7-class masks: dynamic range [0, 6]


@dataclass(frozen=True)
class PGANDataConfig:
    """The masks the PGAN learns: non-empty rows of a store's training split (or its reduced prefix)."""

    store: Path
    reduced: bool = False


@dataclass(frozen=True)
class PGANOptimConfig:
    lr: PositiveFloat = 1e-3
    beta1: Decay = 0.0
    beta2: Decay = 0.99
    eps: PositiveFloat = 1e-8
    gp_lambda: NonNegativeFloat = 10.0
    drift: NonNegativeFloat = 1e-3
    ema: Decay = 0.999  # 0: G_ema is G
    cond_weight: NonNegativeFloat = 1.0  # the AC-GAN label terms (conditioned runs only)


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
    samples: PositiveInt = 16
    seed: NonNegativeInt = 0

    def input_stores(self) -> dict[str, Path]:
        """The stores this run reads, by config key (their fingerprints are recorded in the run directory)."""
        return {"data.store": self.data.store}


def to_unit(labels: torch.Tensor) -> torch.Tensor:
    """Class labels 0…6 → [−1, 1]."""
    return labels.float() * (2 / MAX_LABEL) - 1


def reals_at(labels: torch.Tensor, resolution: int) -> torch.Tensor:
    """Masks as the PGAN sees them: labels [N,S,S] → [N,1,R,R] in [−1, 1], box-averaged down from S to R like the
    official dataset's lower-resolution copies."""
    reals = to_unit(labels)[:, None]
    factor = labels.shape[-1] // resolution
    return F.avg_pool2d(reals, factor) if factor > 1 else reals


RESIDENT_CHUNK = 1024  # rows per read while loading the masks: bounds the host copy, not the device tensor


def resident_masks(data: PGANDataConfig, resolution: int, device: torch.device) -> torch.Tensor:
    """The non-empty training masks of ``data`` as one uint8 tensor [N, S, S] on ``device`` (S: the store's size),
    read chunk by chunk so the host never holds more than a chunk."""
    source = Source(data.store, "train", n="reduced" if data.reduced else None, drop_empty=True)
    dataset = SliceDataset([source], classes=7, with_image=False)
    size = dataset.image_size
    if size < resolution:
        raise ValueError(f"{data.store}: masks are {size}², smaller than the PGAN's {resolution}²")
    log.info("PGAN on %s non-empty masks (%.1f MiB resident on %s)", dataset.describe(),
             len(dataset) * size * size / 2**20, device)
    masks = torch.empty((len(dataset), size, size), dtype=torch.uint8, device=device)
    try:
        for start in range(0, len(dataset), RESIDENT_CHUNK):
            rows = range(start, min(start + RESIDENT_CHUNK, len(dataset)))
            masks[rows.start:rows.stop] = dataset.collate(dataset.__getitems__(rows))["label"].to(device)
    finally:
        dataset.close()
    return masks


def mask_slices(store: Path, reduced: bool = False) -> np.ndarray:
    """The slice index (int64) of every non-empty training mask of ``store`` (of its reduced prefix), in the order
    :func:`resident_masks` reads the masks: the ``slice`` field of the rows that are not ``empty`` (what
    ``drop_empty`` keeps), read chunk by chunk."""
    source = Store(store)
    count = source.manifest.reduced if reduced else source.split("train").n
    parts = [np.zeros(0, dtype=np.int64)]
    for start in range(0, count, RESIDENT_CHUNK):
        rows = source.read("train", start, min(start + RESIDENT_CHUNK, count), fields=("slice", "empty"))
        parts.append(rows["slice"][~rows["empty"].astype(bool)].astype(np.int64))
    return np.concatenate(parts)


@dataclass(frozen=True)
class Conditioning:
    """The labels of a slice-conditioned run: the bins, each resident mask's bin (int64, on the device) and the
    training masks' count per bin."""

    bins: SliceBins
    labels: torch.Tensor
    counts: list[int]

    @classmethod
    def of(cls, data: PGANDataConfig, label_size: int, rows: int, device: torch.device) -> Conditioning:
        slices = mask_slices(data.store, data.reduced)
        if len(slices) != rows:
            raise RuntimeError(f"{data.store}: read {len(slices)} slice indices for {rows} non-empty masks")
        try:
            bins = SliceBins.spanning(label_size, slices)
        except ValueError as err:
            raise ValueError(f"model.label_size: {err} (the non-empty training masks of {data.store})") from None
        labels = bins.of(slices)
        counts = np.bincount(labels, minlength=bins.count).tolist()
        log.info("PGAN conditioned on %d slice bins over slices [%d, %d); masks per bin %s", bins.count, bins.lo,
                 bins.hi, counts)
        return cls(bins, torch.from_numpy(labels).to(device), counts)


def to_labels(images: torch.Tensor) -> torch.Tensor:
    """Generator output in [−1, 1] → nearest class in 0…6 (uint8)."""
    return torch.round((images + 1) * (MAX_LABEL / 2)).clamp(0, MAX_LABEL).to(torch.uint8)


def d_loss(G: Generator, D: Discriminator, reals: torch.Tensor, latents: torch.Tensor, mix: torch.Tensor, lod: float,
           o: PGANOptimConfig, precision: Precision, labels: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP discriminator loss: D(fake) − D(real) + λ·(‖∇D(x̂)‖₂ − 1)² + ε·D(real)², x̂ = lerp(real, fake, mix),
    on D's score column; with the reals' ``labels`` (a conditioned run) the fakes are G(z, labels) and the loss gains
    ``cond_weight``·(CE(labels, D's logits on the reals) + CE(labels, D's logits on the fakes)).

    Forwards run under the precision policy; scores, logits and the penalty's gradient norm are fp32 (a bf16 norm of
    ~10⁶ elements would be too coarse for the (‖∇‖ − 1)² term)."""
    with precision.autocast():
        with torch.no_grad():
            fakes = G(latents, lod, labels).float()
        real_out, fake_out = D(reals, lod).float(), D(fakes, lod).float()
    real_scores, fake_scores = real_out[:, 0], fake_out[:, 0]
    mixed = (reals + mix * (fakes - reals)).requires_grad_(True)
    with precision.autocast():
        mixed_scores = D(mixed, lod).float()[:, :1]
    (grad,) = torch.autograd.grad(mixed_scores.sum(), mixed, create_graph=True)
    penalty = (grad.float().flatten(1).norm(dim=1) - 1) ** 2
    loss = fake_scores - real_scores + o.gp_lambda * penalty + o.drift * real_scores**2
    if labels is not None:
        label_penalty = (F.cross_entropy(real_out[:, 1:], labels, reduction="none")
                         + F.cross_entropy(fake_out[:, 1:], labels, reduction="none"))
        loss = loss + o.cond_weight * label_penalty
    return loss.mean()


def g_loss(G: Generator, D: Discriminator, latents: torch.Tensor, lod: float, precision: Precision,
           labels: torch.Tensor | None = None, cond_weight: float = 1.0) -> torch.Tensor:
    """WGAN generator loss −D(G(z)) on D's score column; with ``labels`` (a conditioned run) −D(G(z, labels)) +
    ``cond_weight``·CE(labels, D's logits on G(z, labels))."""
    with precision.autocast():
        out = D(G(latents, lod, labels), lod).float()
    if labels is None:
        return -out[:, 0].mean()
    return (cond_weight * F.cross_entropy(out[:, 1:], labels, reduction="none") - out[:, 0]).mean()


class WGANGP:
    """G, D, the EMA of G, their Adam states, and one WGAN-GP step pair (D step, G step, EMA update) under the run's
    precision: what the trainer repeats and what ``bench pgan`` times.

    Every tensor a step creates is drawn on ``dist.device`` from the global RNG, so on the CPU the draws are those of
    a CPU run and on CUDA they come from the CUDA RNG (both restored from checkpoints); nothing reads a value back to
    the host.
    """

    def __init__(self, model: PGANConfig, optim: PGANOptimConfig, dist: Dist, precision: Precision,
                 memory_format: torch.memory_format = torch.contiguous_format) -> None:
        self.model, self.optim, self.dist, self.precision = model, optim, dist, precision
        self.memory_format = memory_format
        self.G = Generator(model).to(dist.device, memory_format=memory_format)
        self.D = Discriminator(model).to(dist.device, memory_format=memory_format)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.reset_optimizers()

    def reset_optimizers(self) -> None:
        o, device = self.optim, self.dist.device
        self.opt_G, self.opt_D = (adam(net.parameters(), device, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
                                  for net in (self.G, self.D))

    def share(self, minibatch: int) -> slice:
        """This rank's rows of a minibatch: the official multi-GPU split (each GPU takes minibatch / GPUs)."""
        size = minibatch // self.dist.world_size
        return slice(self.dist.rank * size, (self.dist.rank + 1) * size)

    def step(self, reals: torch.Tensor, lod: float, minibatch: int, labels: torch.Tensor | None = None,
             g_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One D step on this rank's full-resolution ``reals`` (faded to ``lod`` here), one G step and the EMA update;
        the two losses, detached. A conditioned pair takes the reals' ``labels`` and the G step's ``g_labels``
        (this rank's shares, int64 on the device)."""
        conditioned = bool(self.model.label_size)
        if (labels is not None) != conditioned or (g_labels is not None) != conditioned:
            raise ValueError(f"pgan.label_size {self.model.label_size}: a step takes both labels and g_labels exactly "
                             "when the networks are conditioned")
        reals = reals.contiguous(memory_format=self.memory_format)
        loss_d = self._d_step(blend_reals(reals, lod), lod, minibatch, labels)
        loss_g = self._g_step(lod, minibatch, g_labels)
        self._update_ema()
        return loss_d, loss_g

    def _draw(self, minibatch: int, *shape: int, uniform: bool = False) -> torch.Tensor:
        """This rank's rows of a whole-minibatch draw from the global RNG: every rank draws the same numbers, so the
        RNG state stays identical across ranks and a run is the same whatever the rank count (but for mbstd)."""
        device = self.dist.device
        values = torch.rand(minibatch, *shape, device=device) if uniform else torch.randn(minibatch, *shape,
                                                                                           device=device)
        return values[self.share(minibatch)]

    def _d_step(self, reals: torch.Tensor, lod: float, minibatch: int, labels: torch.Tensor | None) -> torch.Tensor:
        latents = self._draw(minibatch, self.model.latent)
        mix = self._draw(minibatch, 1, 1, 1, uniform=True)
        loss = d_loss(self.G, self.D, reals, latents, mix, lod, self.optim, self.precision, labels)
        self.opt_D.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.dist.average_gradients(self.D.parameters())  # official multi-GPU rule
        self.precision.step(self.opt_D)
        return loss.detach()

    def _g_step(self, lod: float, minibatch: int, labels: torch.Tensor | None) -> torch.Tensor:
        loss = g_loss(self.G, self.D, self._draw(minibatch, self.model.latent), lod, self.precision, labels,
                      self.optim.cond_weight)
        self.opt_G.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.dist.average_gradients(self.G.parameters())  # official multi-GPU rule
        self.precision.step(self.opt_G)
        return loss.detach()

    @torch.no_grad()
    def _update_ema(self) -> None:
        # one fused multi-tensor kernel instead of a launch per parameter (~100 of them)
        torch._foreach_lerp_(list(self.G_ema.parameters()), list(self.G.parameters()), 1 - self.optim.ema)


@dataclass(frozen=True)
class Iteration:
    """One official loop iteration: its global index, images shown before it, lod and minibatch, the reals and, in a
    conditioned run, the reals' labels and the G steps' labels."""

    index: int
    nimg: int
    lod: float
    minibatch: int
    reals: torch.Tensor  # this rank's share: [repeats, minibatch / ranks, C, R, R] in [−1, 1]
    labels: torch.Tensor | None = None  # the reals' bins: int64 [repeats, minibatch / ranks]
    g_labels: torch.Tensor | None = None  # the G steps' bins (of other random rows): int64, the same shape


class PGANTask:
    """The training masks (resident on the device), the schedule, and per iteration ``minibatch_repeats`` WGAN-GP
    step pairs of :class:`WGANGP`."""

    def __init__(self, cfg: PGANRunConfig, dist: Dist, run_dir: Path) -> None:
        if any(mb % dist.world_size for mb in cfg.schedule.minibatch.values()):
            raise ValueError(f"every schedule.minibatch must be divisible by the {dist.world_size} ranks")
        if cfg.runtime.compile != "none":
            # D's gradient penalty differentiates a gradient (create_graph=True), which torch.compile's AOTAutograd
            # does not support (pytorch#181581: "does not currently support double backward"); and the fade alpha is a
            # Python float in G and D, so a compiled G would recompile at every lod
            raise ValueError(f"runtime.compile: {cfg.runtime.compile!r} is not supported by the PGAN yet; use none")
        self.cfg, self.dist, self.run_dir = cfg, dist, Path(run_dir)
        device = dist.device
        prepare_device(device)
        self.masks = resident_masks(cfg.data, cfg.model.resolution, device)
        label_size = cfg.model.label_size
        self.cond = Conditioning.of(cfg.data, label_size, len(self.masks), device) if label_size else None
        self.ticks: list[Tick] = ticks(replace(cfg.schedule, resolution=cfg.model.resolution))
        # real rows are drawn where the masks live: on CUDA no index copy crosses from the host
        self.row_generator = torch.Generator(device)
        self.precision = Precision.for_device(cfg.runtime.precision, device, allow_fp16=False)
        log.info("PGAN in %s on %s", self.precision.name, device)
        torch.manual_seed(cfg.seed)
        self.nets = WGANGP(cfg.model, cfg.optim, dist, self.precision, cfg.runtime.memory_format(device))
        self.prev_lod = -1.0
        self.sample_z = torch.randn(cfg.samples, cfg.model.latent, generator=torch.Generator().manual_seed(cfg.seed))
        # fixed labels too, so that ticks are comparable: the bins spread evenly over the grid (first to last)
        self.sample_labels = (torch.arange(cfg.samples) * label_size // cfg.samples) if label_size else None

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
        self.row_generator.manual_seed(epoch_seed(self.cfg.seed, index))
        rows = torch.randint(len(self.masks), (repeats * minibatch,), generator=self.row_generator,
                             device=self.masks.device)
        rows = rows.view(repeats, minibatch)[:, self.nets.share(minibatch)]
        reals = reals_at(self.masks[rows.reshape(-1)], self.cfg.model.resolution)
        labels = g_labels = None
        if self.cond is not None:
            # the G steps' labels: bins of random rows (the official get_random_labels), drawn for the whole
            # minibatch from the same generator, after the reals' rows, so the iteration stays a function of its index
            g_rows = torch.randint(len(self.masks), (repeats * minibatch,), generator=self.row_generator,
                                   device=self.masks.device)
            labels = self.cond.labels[rows]
            g_labels = self.cond.labels[g_rows.view(repeats, minibatch)[:, self.nets.share(minibatch)]]
        return Iteration(index, nimg, lod, minibatch, reals.view(*rows.shape, *reals.shape[1:]), labels, g_labels)

    # --- steps ------------------------------------------------------------------------------------------------
    def train_step(self, it: Iteration) -> dict[str, torch.Tensor | float]:
        if optimizer_reset(self.prev_lod, it.lod):
            # official: Adam state is reset when a fade starts or ends (and at the start of training)
            self.nets.reset_optimizers()
        self.prev_lod = it.lod
        repeats = len(it.reals)
        labels = it.labels if it.labels is not None else [None] * repeats
        g_labels = it.g_labels if it.g_labels is not None else [None] * repeats
        losses = [self.nets.step(reals, it.lod, it.minibatch, real_labels, fake_labels)
                  for reals, real_labels, fake_labels in zip(it.reals, labels, g_labels)]
        d_losses, g_losses = zip(*losses)
        return {"loss_d": torch.stack(d_losses).mean(), "loss_g": torch.stack(g_losses).mean(), "lod": it.lod,
                "kimg": (it.nimg + len(it.reals) * it.minibatch) / 1000}

    def evaluate(self, epoch: int) -> dict[str, float]:
        """End of a tick: write the snapshot and a sample grid of the EMA generator."""
        tick = self.ticks[epoch]
        lod = tick.iterations[-1][1]
        summary = {"tick": float(epoch), "kimg": tick.end_nimg / 1000, "lod": lod}
        if not self.dist.is_main:
            return summary
        conditioning = {} if self.cond is None else {"slice_bins": self.cond.bins.to_dict(),
                                                     "bin_counts": self.cond.counts}  # what generation draws from
        with atomic_path(self.run_dir / "snapshots" / f"tick-{epoch:04d}.pt") as tmp:
            torch.save({"G_ema": self.nets.G_ema.state_dict(), "D": self.nets.D.state_dict(),
                        "model": to_dict(self.cfg.model), "lod": lod,
                        "kimg": tick.end_nimg / 1000, "tick": epoch, "store": str(self.cfg.data.store),
                        "reduced": self.cfg.data.reduced, **conditioning}, tmp)  # what `evaluate swd` scores against
        labels = None if self.sample_labels is None else self.sample_labels.to(self.dist.device)
        with torch.no_grad():
            samples = self.nets.G_ema(self.sample_z.to(self.dist.device), lod, labels)
            samples = to_labels(samples[:, 0]).cpu().numpy()
        sample_grid(samples, self.run_dir / "samples" / f"tick-{epoch:04d}.png", title=f"tick {epoch}, lod {lod:.2f}")
        return summary

    # --- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        n = self.nets
        return {"G": n.G.state_dict(), "D": n.D.state_dict(), "G_ema": n.G_ema.state_dict(),
                "opt_G": n.opt_G.state_dict(), "opt_D": n.opt_D.state_dict(), "prev_lod": self.prev_lod}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = self.nets
        n.G.load_state_dict(state["G"], strict=True)
        n.D.load_state_dict(state["D"], strict=True)
        n.G_ema.load_state_dict(state["G_ema"], strict=True)
        n.opt_G.load_state_dict(state["opt_G"])
        n.opt_D.load_state_dict(state["opt_D"])
        self.prev_lod = float(state["prev_lod"])
