"""`bench unet --trainer` on the CPU: the real trainer step on a random store, with img/s, TFLOP/s, parameters and
FLOPs that agree with each other and the model; mfu is null without a peak and achieved/peak TFLOP/s with
--peak-tflops."""

import json
import time

import pytest
import torch
import yaml

from toolkit.cli import main
from toolkit.models.unet import UNet, UNetConfig

TINY = {"data": {"real": "unused", "classes": 7}, "model": {"widths": [4, 8, 16, 32], "bridge": 32}}


def bench(tmp_path, capsys, *extra):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["bench", "unet", "--trainer", "-c", str(config), "--size", "64", "--steps", "2", "--json",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_trainer_bench_times_the_real_step_in_fp32_with_null_mfu_on_cpu(tmp_path, capsys, conv_flops):
    begin = time.perf_counter()
    doc = bench(tmp_path, capsys)
    wall = time.perf_counter() - begin
    # the reported fields agree with each other and with the model: parameters and forward FLOPs counted here,
    # img/s × timed seconds = the images of the timed steps (2 steps of the default batch 8), TFLOP/s = 3 × the
    # forward FLOPs × img/s, and the timed seconds fit in the call's wall time
    model = UNet(UNetConfig(classes=7, widths=(4, 8, 16, 32), bridge=32)).eval()
    assert doc["params"] == sum(p.numel() for p in model.parameters())
    assert doc["gflop_per_image_fwd"] * 1e9 == conv_flops(model, torch.zeros(1, 1, 64, 64))
    for prefix, seconds in (("", "seconds"), ("trainer_", "trainer_seconds")):
        assert doc[f"{prefix}img_per_s"] * doc[seconds] == pytest.approx(2 * 8, rel=1e-9)
        assert doc[f"{prefix}tflops"] == pytest.approx(3 * doc["gflop_per_image_fwd"] * doc[f"{prefix}img_per_s"] / 1e3,
                                                       rel=1e-9)
        assert 0 < doc[seconds] < wall
    assert doc["precision"] == doc["trainer_precision"] == "fp32"
    assert doc["mfu"] is None and doc["peak_tflops"] is None
    for key in ("model", "device", "params", "gflop_per_image_fwd", "img_per_s", "tflops", "ranks", "hosts"):
        assert key in doc  # DESIGN §3's stable keys
    assert doc["ranks"] == doc["hosts"] == 1


def test_peak_tflops_makes_mfu_the_achieved_over_the_peak(tmp_path, capsys):
    doc = bench(tmp_path, capsys, "--peak-tflops", "0.5")
    assert doc["peak_tflops"] == 0.5
    assert doc["mfu"] == pytest.approx(doc["trainer_tflops"] / 0.5)
    assert doc["model_mfu"] == pytest.approx(doc["tflops"] / 0.5)
