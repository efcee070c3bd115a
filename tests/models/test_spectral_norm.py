"""Our spectral norm: torch's semantics and state dict, with the power iteration outside autocast."""

import torch
from torch import nn
from torch.nn.utils import spectral_norm as torch_spectral_norm
from torch.overrides import TorchFunctionMode

from toolkit.models.spectral_norm import spectral_norm


def _pair() -> tuple[nn.Conv2d, nn.Conv2d]:
    torch.manual_seed(0)
    theirs = torch_spectral_norm(nn.Conv2d(4, 8, 3, padding=1))
    torch.manual_seed(0)
    ours = spectral_norm(nn.Conv2d(4, 8, 3, padding=1))
    return theirs, ours


def test_training_and_eval_match_torch_spectral_norm_bit_for_bit():
    theirs, ours = _pair()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 4, 8, 8)
    for _ in range(3):
        a, b = theirs(x), ours(x)
        a.square().sum().backward()
        b.square().sum().backward()
        assert torch.equal(a, b)
    assert torch.equal(ours.weight_u, theirs.weight_u) and torch.equal(ours.weight_v, theirs.weight_v)
    assert torch.equal(ours.weight_orig.grad, theirs.weight_orig.grad)
    theirs.eval()
    ours.eval()
    assert torch.equal(ours(x), theirs(x))
    ours.load_state_dict(theirs.state_dict(), strict=True)  # checkpoints interchange


class _AutocastAtMatVec(TorchFunctionMode):
    """Records whether autocast was on at every matrix-vector product."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.mv, torch.dot):
            self.seen.append(torch.is_autocast_enabled("cpu"))
        return func(*args, **(kwargs or {}))


def test_power_iteration_and_sigma_run_without_autocast_inside_an_autocast_region():
    theirs, ours = _pair()
    x = torch.randn(2, 4, 8, 8)
    for module, expected in ((theirs, True), (ours, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16), _AutocastAtMatVec() as mode:
            module(x)
        assert mode.seen and set(mode.seen) == {expected}  # torch's hook computes under the caller's autocast
    assert ours.weight_u.dtype == torch.float32
