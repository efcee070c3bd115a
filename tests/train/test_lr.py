"""Learning-rate schedules: the linear decay's factor by epoch, and setting a rate on every parameter group."""

import pytest
import torch

from toolkit.train.lr import linear_decay, set_lr


def test_linear_decay_is_flat_then_falls_by_one_step_per_decay_epoch():
    assert [linear_decay(e, 6, 3) for e in range(6)] == pytest.approx([1, 1, 1, 1, 2 / 3, 1 / 3])
    assert [linear_decay(e, 4, 0) for e in range(4)] == [1.0] * 4
    assert linear_decay(0, 2, 2) == 1.0 and linear_decay(1, 2, 2) == 0.5


def test_set_lr_sets_every_parameter_group():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 2.0}])
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
