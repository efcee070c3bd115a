"""The peak table: torch's device names find NVIDIA's dense figures for the precision in use; the CPU has none."""

import pytest
import torch

from toolkit.bench.peak import device_peak, mfu, peak_tflops


@pytest.mark.parametrize(("name", "precision", "peak"), [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # how torch names the SXM part
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA H200", "fp32", 494.5),  # fp32 runs as TF32 on Hopper
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", "fp16", 112.0),
    ("NVIDIA GeForce RTX 2080 Ti", "fp16", 53.8),
    ("NVIDIA GeForce GTX 1080", "fp32", 8.9),
    ("NVIDIA GeForce GTX 1080 Ti", "fp32", 11.3),
])
def test_device_names_match_their_published_dense_peak(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_precisions_without_tensor_cores_and_unknown_gpus_have_no_peak():
    assert peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    assert peak_tflops("Some Future GPU", "bf16") is None
    assert device_peak(torch.device("cpu"), "fp32") is None


def test_mfu_is_achieved_over_peak_and_null_without_a_peak():
    assert mfu(494.5, 989.0) == pytest.approx(0.5)
    assert mfu(1.0, None) is None
