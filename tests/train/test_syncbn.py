"""Global-batch BatchNorm: equal to BatchNorm on one process, fp32 statistics under autocast, no host tensors."""

import torch
from torch import nn

from toolkit.train.syncbn import GlobalBatchNorm2d, convert


def _one_rank(t: torch.Tensor) -> torch.Tensor:
    return t  # the sum over a single rank


def test_one_rank_matches_batchnorm_in_outputs_gradients_and_running_statistics():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(5, eps=1e-3, momentum=0.01)
    nn.init.normal_(plain.weight)
    nn.init.normal_(plain.bias)
    synced = convert(nn.Sequential(nn.BatchNorm2d(5, eps=1e-3, momentum=0.01)), _one_rank)[0]
    synced.load_state_dict(plain.state_dict())
    x = (torch.randn(4, 5, 6, 6) * 3 + 10).requires_grad_(True)  # a mean far from 0: no cancellation
    y = x.detach().clone().requires_grad_(True)
    for _ in range(3):
        out_plain, out_synced = plain(x), synced(y)
        torch.testing.assert_close(out_synced, out_plain, rtol=1e-5, atol=1e-5)
    g = torch.randn(out_plain.shape)
    (out_plain * g).sum().backward()
    (out_synced * g).sum().backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(synced.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(synced.running_mean, plain.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(synced.running_var, plain.running_var, rtol=1e-5, atol=1e-6)
    assert int(synced.num_batches_tracked) == 3


def test_running_statistics_stay_fp32_and_exact_under_bf16_autocast():
    bn = GlobalBatchNorm2d(3, momentum=0.5, all_reduce=_one_rank)
    x = (torch.randn(2, 3, 8, 8) * 0.01 + 1.2345).bfloat16()  # bf16 activations, as autocast makes them
    out = bn(x)
    expected_mean = 0.5 * x.float().mean((0, 2, 3))
    assert bn.running_mean.dtype == torch.float32 and out.dtype == torch.bfloat16
    # rounded to bf16 first, the update would be off by ~1e-3 of the mean
    torch.testing.assert_close(bn.running_mean, expected_mean, rtol=1e-6, atol=1e-7)


def test_parameter_free_form_normalises_each_channel():
    bn = GlobalBatchNorm2d(2, affine=False, all_reduce=_one_rank)
    out = bn(torch.randn(3, 2, 4, 4) * 5 - 2)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var((0, 2, 3), unbiased=False), torch.ones(2), atol=1e-3, rtol=0)
