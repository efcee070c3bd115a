"""`bench unet --trainer` on the CPU: the real trainer step on a random store gives positive img/s, and mfu is null
without a peak and achieved/peak TFLOP/s with --peak-tflops."""

import json

import pytest
import yaml

from toolkit.cli import main

TINY = {"data": {"real": "unused", "classes": 7}, "model": {"widths": [4, 8, 16, 32], "bridge": 32}}


def bench(tmp_path, capsys, *extra):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["bench", "unet", "--trainer", "-c", str(config), "--size", "64", "--steps", "2", "--json",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_trainer_bench_times_the_real_step_in_fp32_with_null_mfu_on_cpu(tmp_path, capsys):
    doc = bench(tmp_path, capsys)
    assert doc["trainer_img_per_s"] > 0 and doc["trainer_tflops"] > 0 and doc["img_per_s"] > 0
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
