"""Peak dense tensor throughput of known GPUs, the denominator of the benchmarks' model FLOP utilisation (``mfu``).

Values are NVIDIA's published dense numbers (TFLOP/s, no 2:4 sparsity) per precision of the precision policy
(:mod:`toolkit.train.precision`). ``fp32`` is the TF32 tensor-core figure on Ampere and later, because the policy's fp32
lets cuDNN and cuBLAS use TF32 there; on Pascal, Volta and Turing it is the plain FP32 figure. ``fp16`` is the
tensor-core figure with fp32 accumulation, which is what autocast's GEMMs and convolutions use (GeForce Turing runs it
at half the fp16-accumulate rate). A precision the GPU has no tensor cores for is absent, so its ``mfu`` is null.
"""

from __future__ import annotations

import torch

# (substring of torch.cuda.get_device_name(), peaks): the first match wins, so more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 417.5}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 494.5}),  # SXM5; torch names it "NVIDIA H100 80GB HBM3"
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}),  # SXM4 and PCIe alike
    ("V100-PCIE", {"fp16": 112.0, "fp32": 14.0}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),  # SXM2
    ("RTX 2080 Ti", {"fp16": 53.8, "fp32": 13.4}),  # fp16 with fp32 accumulation (107.6 with fp16 accumulation)
    ("GTX 1080 Ti", {"fp32": 11.3}),
    ("GTX 1080", {"fp32": 8.9}),  # no fp16 tensor cores (fp16 runs at 1/64 rate)
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of the GPU named ``device_name`` in ``precision`` (bf16, fp16, fp32); None if unknown."""
    name = device_name.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if pattern.lower() in name:
            return peaks.get(precision)
    return None


def device_peak(device: torch.device, precision: str) -> float | None:
    """:func:`peak_tflops` of ``device``; None on the CPU (no meaningful published peak)."""
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device), precision)


def mfu(tflops: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved over peak TFLOP/s, None without a peak."""
    return tflops / peak if peak else None
