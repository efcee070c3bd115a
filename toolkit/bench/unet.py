"""``tumorsynth bench unet``: training throughput (images/s), achieved TFLOP/s and MFU of the U-Net.

Two measurements:

- **model step** (always): what the trainer does per batch minus the data: forward, cross-entropy on the logits,
  backward, Adam, on random tensors already on the device. It measures the model and optimiser alone.
- **trainer step** (``--trainer``): :meth:`toolkit.train.unet.UNetTask.train_step` over the task's own loader on a
  throw-away random store (:mod:`toolkit.bench.random_store`): loading and decoding, the weighted Dice over the global
  batch, SyncBN and DDP under ``--dist``, the run's precision policy, channels_last and ``runtime.compile``. Its
  TFLOP/s over the device's peak (:mod:`toolkit.bench.peak`) is the ``mfu``.

Both compute in the precision policy's format (``--precision``, default ``auto``: bf16/fp16 on GPUs that have them,
fp32 on the CPU). With ``dist`` (``--dist ddp|horovod``, under torchrun/srun or mpirun/horovodrun) every rank takes
``batch / ranks`` of the global batch, so the steps include the gradient averaging and the img/s are the whole job's.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from toolkit.bench.peak import device_peak, mfu
from toolkit.bench.random_store import write_random_store
from toolkit.bench.timing import time_steps
from toolkit.models.unet import UNet, UNetConfig, count_parameters
from toolkit.train.distributed import Dist
from toolkit.train.precision import Precision
from toolkit.train.runtime import RuntimeConfig, adam, prepare_device
from toolkit.train.unet import DataConfig, ModelConfig, OptimConfig, UNetRunConfig, UNetTask

log = logging.getLogger(__name__)

# Training ≈ forward + backward, and backward costs about twice the forward (gradients w.r.t. inputs and weights).
TRAIN_FLOPS_PER_FWD = 3.0


def forward_flops(model: torch.nn.Module, in_channels: int, size: int, device: torch.device) -> int:
    """FLOPs (multiply-add = 2) of one forward of a single ``size``² image, as ``FlopCounterMode`` counts them.

    Only matmul-like ops (convs, transposed convs) are counted; BatchNorm, ReLU, pooling and concatenation are
    memory-bound and left out, as is customary.
    """
    x = torch.zeros(1, in_channels, size, size, device=device)
    was_training = model.training
    model.eval()  # eval so the count does not move BatchNorm running statistics
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops()


def count_hosts(dist: Dist) -> int:
    """Distinct hostnames among the ranks, through the distributed layer's sum: each rank fills its own slot of a
    zero vector with its hostname's CRC-32 (exact in float64, and the same in every process, unlike ``hash``)."""
    if not dist.active:
        return 1
    slots = torch.zeros(dist.world_size, dtype=torch.float64, device=dist.device)
    slots[dist.rank] = zlib.crc32(socket.gethostname().encode())
    return len(set(dist.all_reduce_sum(slots).tolist()))


def bench_unet(config: UNetConfig, *, device: str = "cpu", batch: int = 8, size: int = 256, steps: int = 10,
               warmup: int = 3, precision: str = "auto", channels_last: bool | None = None,
               compile: bool = False, dist: Dist | None = None, peak_tflops: float | None = None) -> dict[str, Any]:
    """Time ``steps`` model steps after ``warmup`` untimed ones; return the ``bench unet`` JSON object.

    ``channels_last`` defaults to on for CUDA and off for CPU. ``model_mfu`` divides by ``peak_tflops`` or the
    device's entry in :mod:`toolkit.bench.peak`. ``tflops`` is ``3 × gflop_per_image_fwd × img_per_s
    / 1000`` (training ≈ 3× the forward). With ``compile`` the warm-up steps also pay for compilation, so give it a few.
    """
    dist = dist or Dist(device=torch.device(device))
    _check_sizes("bench unet", steps, warmup, batch, dist)
    dev = dist.device
    prepare_device(dev)
    policy = Precision.for_device(precision, dev)
    memory_format = RuntimeConfig(channels_last=channels_last).memory_format(dev)

    model = UNet(config).to(dev, memory_format=memory_format)
    flops = forward_flops(model, config.in_channels, size, dev)
    net = dist.wrap(model)
    optimizer = dist.optimizer(adam(net.parameters(), dev, lr=1e-4))
    step_fn = torch.compile(net) if compile else net
    local = batch // dist.world_size
    x = torch.randn(local, config.in_channels, size, size, device=dev).contiguous(memory_format=memory_format)
    target = torch.randint(0, config.classes, (local, size, size), device=dev)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with policy.autocast():
            logits = step_fn(x)
        # Cross-entropy (softmax over channels + negative log-likelihood) in fp32, where bf16 rounding would hurt.
        policy.backward(F.cross_entropy(logits.float(), target))
        policy.step(optimizer)

    elapsed = time_steps(train_step, dev, steps=steps, warmup=warmup)

    img_per_s = batch * steps / elapsed
    tflops = TRAIN_FLOPS_PER_FWD * flops * img_per_s / 1e12
    peak = peak_tflops if peak_tflops is not None else device_peak(dev, policy.name)
    log.info("unet model step: %.1f img/s, %.2f TFLOP/s (%.2f GFLOP/img fwd, batch %d, %d², %s, %s, %s × %d)",
             img_per_s, tflops, flops / 1e9, batch, size, dev, policy.name, dist.backend, dist.world_size)
    return {"model": "unet", "device": str(dev), "params": count_parameters(model), "gflop_per_image_fwd": flops / 1e9,
            "img_per_s": img_per_s, "tflops": tflops, "batch": batch, "size": size, "precision": policy.name,
            "amp": policy.mixed,  # kept from before the precision policy: autocast on
            "channels_last": memory_format == torch.channels_last, "compile": compile, "steps": steps,
            "seconds": elapsed, "step_ms": 1e3 * elapsed / steps, "peak_tflops": peak, "model_mfu": mfu(tflops, peak),
            "dist": dist.backend, "ranks": dist.world_size, "hosts": count_hosts(dist)}


def bench_trainer(run: UNetRunConfig, *, dist: Dist, size: int = 256, steps: int = 10, warmup: int = 3,
                  peak_tflops: float | None = None) -> dict[str, Any]:
    """Time ``steps`` of ``UNetTask.train_step`` on its own loader after ``warmup`` untimed ones.

    ``run`` gives the model, global batch (``optim.batch``), loader workers and runtime; its ``data.real`` is
    replaced by a random store of ``size``² slices with exactly the rows the timed and warm-up steps read (every rank
    writes the same one from the same seed into its own temporary folder). ``mfu`` divides the achieved TFLOP/s by
    ``peak_tflops``, or by the device's entry in :mod:`toolkit.bench.peak` (none on the CPU: null).
    """
    batch = run.optim.batch
    _check_sizes("bench unet --trainer", steps, warmup, batch, dist)
    with tempfile.TemporaryDirectory(prefix="bench-unet-") as tmp:
        store = write_random_store(Path(tmp) / "store", size=size, classes=run.data.classes,
                                   rows={"train": (steps + warmup) * batch, "val": batch})
        task = UNetTask(replace(run, data=replace(run.data, real=store, real_n=None, synthetic=None)), dist, Path(tmp))
        # counted on the meta device: shapes only, and no contact with the task's (possibly synchronised) BatchNorm
        meta = torch.device("meta")
        flops = forward_flops(UNet(task.model.config).to(meta), task.model.config.in_channels, size, meta)
        elapsed = _time_task(task, steps=steps, warmup=warmup)
        precision = task.precision.name
        del task  # stop the loader's workers before their store is deleted

    img_per_s = batch * steps / elapsed
    tflops = TRAIN_FLOPS_PER_FWD * flops * img_per_s / 1e12
    peak = peak_tflops if peak_tflops is not None else device_peak(dist.device, precision)
    log.info("unet trainer step: %.1f img/s, %.2f TFLOP/s, MFU %s (batch %d, %d², %s, %d workers)", img_per_s,
             tflops, "n/a" if peak is None else f"{tflops / peak:.3f}", batch, size, precision, run.data.workers)
    return {"trainer_img_per_s": img_per_s, "trainer_tflops": tflops, "trainer_step_ms": 1e3 * elapsed / steps,
            "trainer_seconds": elapsed, "trainer_precision": precision, "trainer_workers": run.data.workers,
            "trainer_compile": run.runtime.compile, "peak_tflops": peak, "mfu": mfu(tflops, peak)}


def _time_task(task: UNetTask, *, steps: int, warmup: int) -> float:
    """Seconds of ``steps`` trainer steps, each taking the next batch of epoch 0 from the task's loader."""
    batches = iter(task.batches(0, 0))
    return time_steps(lambda: task.train_step(next(batches)), task.dist.device, steps=steps, warmup=warmup)


def trainer_config(model: ModelConfig, *, classes: int = 7, batch: int = 8, workers: int = 0,
                   runtime: RuntimeConfig | None = None) -> UNetRunConfig:
    """The run config :func:`bench_trainer` times: ``model`` at the global ``batch`` (its data store is replaced)."""
    return UNetRunConfig(data=DataConfig(real=Path("unused"), classes=classes, workers=workers), model=model,
                         optim=OptimConfig(batch=batch), runtime=runtime or RuntimeConfig())


def _check_sizes(what: str, steps: int, warmup: int, batch: int, dist: Dist) -> None:
    if steps < 1 or warmup < 0 or batch < 1 or batch % dist.world_size:
        raise ValueError(f"{what}: need steps >= 1, warmup >= 0 and a batch >= 1 divisible by the "
                         f"{dist.world_size} ranks (got {steps}, {warmup}, {batch})")
