"""The GPU check's paths on a CUDA device: every path passes, and on H100/H200 every figure meets its target.

The check runs once per module (about 8 minutes); each path is its own test, so a report names what broke.
"""

import pytest
import torch

from toolkit.check.gpu import check_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PATHS = ["random store", "train unet: SIGUSR2 + resume", "evaluate unet", "train pgan: fades to 256²", "evaluate swd",
         "generate masks", "train spade", "generate images", "bench unet --trainer, batch 8",
         "bench unet --trainer, batch 64", "bench spade, batch 16", "bench pgan", "bench swd, 16,384 masks",
         "torch.compile unet", "ddp unet, 2 GPUs"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> dict[str, dict]:
    doc = check_gpu(tmp_path_factory.mktemp("gpu-check") / "out")
    return {row["path"]: row for row in doc["rows"]}


def test_the_check_reports_every_path(rows):
    assert list(rows) == PATHS


@pytest.mark.parametrize("path", PATHS)
def test_path_runs_on_cuda(rows, path):
    row = rows[path]
    if row["status"] == "SKIPPED":
        pytest.skip(row["detail"])
    assert row["status"] == "OK", row["detail"]


@pytest.mark.parametrize("path", [p for p in PATHS if p.startswith(("bench", "torch.compile"))])
def test_figure_meets_its_target_where_judged(rows, path):
    row = rows[path]
    if row["verdict"] is None:
        pytest.skip(f"no verdict on this GPU ({row['status']}: {row['detail']})")
    assert row["verdict"] == "meets", f"{row['value']} {row['unit']}, target {row['target']}"
