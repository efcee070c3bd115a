"""The GPU-path rules, shown on the CPU: what a step creates lives on the step's device, nothing is read back inside a
step, devices and RNG states fit the GPUs a process sees, and the precision policy follows the device.

PyTorch's ``meta`` device stands in for a GPU: a meta tensor combined with a CPU tensor raises ("not on the expected
device"), and reading a meta tensor's value (``float``, ``.item()``, ``.tolist()``) raises too. A step that runs on
``meta`` therefore creates no constant on the host and synchronises nothing, the two defects that crash or stall CUDA
runs.
"""

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from toolkit.models.spade import SPADEConfig
from toolkit.train import checkpoint, distributed, precision
from toolkit.train.distributed import Dist
from toolkit.train.loop import LoopConfig, run
from toolkit.train.spade import SPADEDataConfig, SPADEOptimConfig, SPADERunConfig, SPADETask
from toolkit.train.unet import DataConfig, ModelConfig, OptimConfig, UNetRunConfig, UNetTask

META = torch.device("meta")


@pytest.mark.parametrize("store, normalise", [("store_64", "max"), ("store_64_two", "slice")])
def test_unet_train_step_on_a_device_creates_nothing_on_the_host_and_reads_nothing_back(store, normalise, tmp_path,
                                                                                       request):
    """The paper's normalisation on one channel; per-slice normalisation of two channels."""
    cfg = UNetRunConfig(data=DataConfig(real=request.getfixturevalue(store), normalise=normalise),
                        model=ModelConfig(widths=(4, 8), bridge=8), optim=OptimConfig(batch=4))
    task = UNetTask(cfg, Dist(device=META), tmp_path)
    batches = task.batches(0, 0)
    for _ in range(2):  # the second step also exercises Adam's state
        values = task.train_step(next(batches))
        assert all(v.device == META for v in values.values())


@pytest.mark.parametrize("store, channels", [("store_64", 1), ("store_64_two", 2)])
def test_spade_train_step_on_a_device_creates_nothing_on_the_host_and_reads_nothing_back(store, channels, tmp_path,
                                                                                        request):
    """One modality over the store maximum; two, each over its own maximum (a [C] tensor on the device)."""
    cfg = SPADERunConfig(data=SPADEDataConfig(store=request.getfixturevalue(store)),
                         optim=SPADEOptimConfig(batch=2, lambda_l1=10.0),
                         model=SPADEConfig(resolution=64, ngf=4, ndf=8, hidden=8, out_channels=channels))
    task = SPADETask(cfg, Dist(device=META), tmp_path)
    values = task.train_step(next(task.batches(0, 0)))
    assert set(values) == {"loss_g_gan", "loss_g_feat", "loss_g_l1", "loss_d_fake", "loss_d_real"}
    assert all(v.device == META for v in values.values())


class _CountingTask:
    """The smallest Task: ``steps`` batches per epoch, no model; records nothing but what the loop asks."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def loop_config(self) -> LoopConfig:
        return LoopConfig(epochs=1)

    def batches_per_epoch(self, epoch: int) -> int:
        return self.steps

    def batches(self, epoch: int, start: int):
        return iter(range(start, self.steps))

    def train_step(self, batch):
        return {"loss": torch.zeros((), device=META)}  # a device value: the loop must not read it off log steps

    def evaluate(self, epoch: int) -> dict[str, float]:
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state) -> None:
        pass

    def save_best(self, path: Path) -> None:
        pass


VOTES: list[torch.device] = []


class _VotingDist(Dist):
    """A two-rank Dist whose sum records the device of what it was given (the collective itself is tested with real
    processes in the DDP and Horovod tests) and answers as a peer that never votes."""

    def all_reduce_sum(self, tensor, *, differentiable=False):
        VOTES.append(tensor.device)
        return torch.zeros(tensor.shape)

    def barrier(self) -> None:
        pass


def test_ranks_vote_with_device_tensors_every_agree_every_steps(tmp_path):
    dist = _VotingDist(backend="ddp", rank=1, world_size=2, device=META)  # rank 1: writes nothing
    VOTES.clear()
    cfg = LoopConfig(epochs=1, log_every_steps=1000, agree_every_steps=5, checkpoint_every_minutes=0)
    result = run(_CountingTask(steps=23), cfg, tmp_path, dist, config={})
    assert result.status == "done"
    # steps 5, 10, 15, 20, and the epoch's end (the divergence check before evaluation and the epoch's save);
    # each vote made on the run's device
    assert VOTES == [META] * 5


def test_local_device_wraps_the_local_rank_onto_the_visible_gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # SLURM bound one GPU to this task
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert distributed.local_device(3) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.local_device(6) == torch.device("cuda", 2)
    assert chosen == [torch.device("cuda", 0), torch.device("cuda", 2)]


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch sees none"):
        distributed.pick_device("cuda")
    assert distributed.pick_device(None) == torch.device("cpu")


def test_rng_restore_on_a_node_with_fewer_gpus_restores_those_it_sees(monkeypatch, caplog):
    state = checkpoint.rng_state()
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(4)]  # saved on a 4-GPU node
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, index: restored.append((index, int(s[0]))))
    with caplog.at_level(logging.WARNING):
        checkpoint.set_rng_state(state)
    assert restored == [(0, 0), (1, 1)]
    assert "4 GPUs, this process sees 2" in caplog.text


@pytest.mark.parametrize(("capability", "bf16", "expected"), [
    ((9, 0), True, "bf16"),  # H100 / H200
    ((8, 0), True, "bf16"),  # A100
    ((7, 0), False, "fp16"),  # V100
    ((7, 5), False, "fp16"),  # RTX 2080 Ti
    ((6, 1), False, "fp32"),  # GTX 1080
])
def test_auto_precision_follows_the_gpu(monkeypatch, capability, bf16, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    cuda = torch.device("cuda", 0)
    assert precision.auto_precision(cuda) == expected
    # the PGAN's gradient penalty is not loss-scaled: where auto means fp16, it trains in fp32
    assert precision.resolve("auto", cuda, allow_fp16=False) == ("fp32" if expected == "fp16" else expected)


def test_cpu_precision_is_fp32_and_fp16_is_refused_there():
    cpu = torch.device("cpu")
    assert precision.resolve("auto", cpu) == "fp32"
    assert precision.resolve("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        precision.resolve("fp16", cpu)
    with pytest.raises(ValueError, match="must be one of"):
        precision.resolve("half", cpu)


def test_fp32_precision_steps_exactly_as_plain_backward_and_step():
    torch.manual_seed(0)
    a = nn.Linear(4, 2)
    b = nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = torch.optim.Adam(a.parameters()), torch.optim.Adam(b.parameters())
    policy = precision.Precision.for_device("fp32", torch.device("cpu"))
    x = torch.randn(3, 4)
    a(x).square().sum().backward()
    opt_a.step()
    with policy.autocast():
        loss = b(x).square().sum()
    policy.backward(loss)
    policy.step(opt_b)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
