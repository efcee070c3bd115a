"""`bench spade` on the CPU: the trainer's iteration under the precision policy, batch 1 by default there."""

from toolkit.bench.spade import bench_spade
from toolkit.models.spade import SPADEConfig


def test_spade_bench_defaults_to_batch_1_in_fp32_on_cpu():
    doc = bench_spade(SPADEConfig(resolution=64, ngf=4, ndf=8, hidden=8), steps=1, warmup=0)
    assert doc["batch"] == 1 and doc["precision"] == "fp32"
    assert doc["img_per_s"] > 0 and doc["inference_img_per_s"] > 0
