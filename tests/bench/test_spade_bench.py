"""`bench spade` on the CPU: the trainer's iteration under the precision policy, batch 1 by default there."""

import time

import pytest

from toolkit.bench.spade import bench_spade
from toolkit.models.spade import SPADEConfig


def test_spade_bench_defaults_to_batch_1_in_fp32_on_cpu():
    begin = time.perf_counter()
    doc = bench_spade(SPADEConfig(resolution=64, ngf=4, ndf=8, hidden=8), steps=1, warmup=0)
    wall = time.perf_counter() - begin
    assert doc["batch"] == 1 and doc["precision"] == "fp32"
    # one timed step of one image each: its time, from either throughput, fits in the call and matches the step time
    assert doc["img_per_s"] * doc["train_step_ms"] / 1e3 == pytest.approx(1, rel=1e-9)
    assert 0 < 1 / doc["img_per_s"] < wall and 0 < 1 / doc["inference_img_per_s"] < wall
