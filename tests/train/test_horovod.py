"""Horovod for real: the same trainings under `--dist horovod` as under DDP, on 2 CPU processes.

Every run is a real `tumorsynth train` launched by ``mpirun -n 2`` or ``horovodrun --gloo -np 2``, and every
comparison is against a real 2-rank DDP run of the same config: the U-Net, the PGAN and SPADE end with the same
weights and optimiser states (bit for bit: with two ranks every reduction is one addition, and both backends average
gradients as (a + b) / 2), two steps of the U-Net on 2 Horovod ranks end where one process on the whole batch does, and
a Horovod run preempted with SIGUSR2 (forwarded by mpirun) resumes to the same result as an uninterrupted one.
"""

import copy
import json
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from toolkit.models.unet import UNet, UNetConfig
from toolkit.mpi import clean_environment, mpirun_prefix

pytestmark = pytest.mark.horovod

CLI = [sys.executable, "-m", "toolkit.cli"]
CONFIGS = {  # tiny versions of each trainer: seconds per run on one thread per rank
    "unet": {
        "data": {"classes": 7, "real_n": 160},
        "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"lr": 1e-3, "batch": 8},
        "loop": {"epochs": 3, "checkpoint_every_steps": 7},
    },
    "pgan": {
        "model": {"resolution": 16, "latent": 16, "fmap_base": 64, "fmap_max": 16},
        "schedule": {"total_kimg": 1, "lod_training_kimg": 1, "lod_transition_kimg": 1,
                     "minibatch": {4: 8, 8: 8, 16: 8}, "tick_kimg": {4: 1, 8: 1, 16: 1}},
        "loop": {"checkpoint_every_steps": 10},
        "samples": 4,
    },
    "spade": {
        "data": {"reduced": True},
        "model": {"resolution": 64, "ngf": 4, "ndf": 8, "hidden": 8},
        "optim": {"batch": 4},
        "loop": {"epochs": 1, "checkpoint_every_steps": 4},
        "samples": 4,
    },
}


def write_config(path, model, store):
    config = copy.deepcopy(CONFIGS[model])
    config.setdefault("data", {})["real" if model == "unet" else "store"] = str(store)
    config["loop"].update(checkpoint_every_minutes=0.0, log_every_steps=5)
    config.update(runtime={"threads": 1}, seed=4)
    path.write_text(yaml.safe_dump(config))
    return path


def train(model, config, run_dir, *extra):
    return [*CLI, "train", model, "-c", str(config), "--run-dir", str(run_dir), *extra]


def run_ok(cmd, what):
    done = subprocess.run(cmd, env=clean_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{what} failed (exit {done.returncode}):\n{done.stderr[-4000:]}"
    return done


def mpirun(model, config, run_dir):
    return run_ok([*mpirun_prefix(2), *train(model, config, run_dir, "--dist", "horovod")], "mpirun -n 2")


def final_state(latest_task_state, run_dir):
    assert (run_dir / "DONE").exists(), f"{run_dir} did not finish"
    return latest_task_state(run_dir)


def assert_same_tensors(a, b, path=""):
    """Every tensor in two nested task states is identical (models, buffers, optimiser moments)."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path}: max |Δ| {float((a.double() - b.double()).abs().max())}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_tensors(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list | tuple):
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}/{k}")


@pytest.fixture(scope="module")
def unet_horovod(horovod, store_64, tmp_path_factory):
    """An uninterrupted 2-rank Horovod U-Net run (60 steps) under mpirun."""
    root = tmp_path_factory.mktemp("unet-horovod")
    config = write_config(root / "unet.yaml", "unet", store_64)
    done = mpirun("unet", config, root / "run")
    assert "horovod: rank 0/2" in done.stderr and "horovod: rank 1/2" in done.stderr, done.stderr[-2000:]
    return config, root / "run"


def test_unet_under_mpirun_equals_ddp(unet_horovod, tmp_path, launch_ddp, latest_task_state):
    config, run_dir = unet_horovod
    launch_ddp(train("unet", config, tmp_path / "ddp", "--dist", "ddp"))
    hvd, ddp = final_state(latest_task_state, run_dir), final_state(latest_task_state, tmp_path / "ddp")
    assert_same_tensors(hvd, ddp)


def test_unet_two_horovod_ranks_of_four_equal_one_process_of_eight(horovod, store_64, tmp_path, latest_task_state,
                                                                   update_difference):
    """Against a reference that involves neither backend: one process on the union of the ranks' batches (the same
    global batch, BatchNorm and Dice), after two optimiser steps, where summation-order differences stay small
    (measured relative differences: 0.020 for this config's seed, 3e-4 for test_unet_training's DDP test); per-rank
    BatchNorm statistics over 4 instead of 8 slices move the weights far from it (0.89), so the tolerance tells a
    correct gradient average from a broken one."""
    config = write_config(tmp_path / "unet.yaml", "unet", store_64)
    doc = yaml.safe_load(config.read_text())
    doc["data"]["real_n"], doc["loop"] = 16, {**doc["loop"], "epochs": 1, "checkpoint_every_steps": 0}
    config.write_text(yaml.safe_dump(doc))
    run_ok(train("unet", config, tmp_path / "single"), "one process")
    reference = final_state(latest_task_state, tmp_path / "single")["model"]
    mpirun("unet", config, tmp_path / "horovod")
    synced = update_difference(config, reference, final_state(latest_task_state, tmp_path / "horovod")["model"])
    assert synced < 0.05, synced
    run_ok([*mpirun_prefix(2), *train("unet", config, tmp_path / "plain-bn", "--dist", "horovod", "--set",
                                      "runtime.sync_bn=false")], "mpirun -n 2, per-rank BatchNorm")
    unsynced = update_difference(config, reference, final_state(latest_task_state, tmp_path / "plain-bn")["model"])
    assert unsynced > 0.1, unsynced


def test_preempted_horovod_run_resumes_to_the_uninterrupted_result(unet_horovod, tmp_path, interrupt,
                                                                    latest_task_state):
    config, reference = unet_horovod
    run_dir = tmp_path / "run"
    # mpirun forwards SIGUSR2 to both ranks; they agree on a step and checkpoint there
    stopped = interrupt([*mpirun_prefix(2), *train("unet", config, run_dir, "--dist", "horovod")], run_dir,
                        signal.SIGUSR2)
    assert stopped.returncode != 0 and not (run_dir / "DONE").exists(), stopped.stderr[-3000:]
    assert stopped.stdout.count('"status": "preempted"') == 2, stopped.stdout  # both ranks stopped

    resumed = mpirun("unet", config, run_dir)
    assert "resumed from" in resumed.stderr
    assert_same_tensors(final_state(latest_task_state, run_dir), final_state(latest_task_state, reference))
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["pgan", "spade"])
def test_gan_under_horovodrun_gloo_equals_ddp(model, horovod, store_64, tmp_path, launch_ddp, latest_task_state):
    config = write_config(tmp_path / f"{model}.yaml", model, store_64)
    run_ok([str(horovod), "--gloo", "-np", "2", "-H", "localhost:2",
            *train(model, config, tmp_path / "horovod", "--dist", "horovod")], "horovodrun --gloo -np 2")
    launch_ddp(train(model, config, tmp_path / "ddp", "--dist", "ddp"))
    hvd, ddp = final_state(latest_task_state, tmp_path / "horovod"), final_state(latest_task_state, tmp_path / "ddp")
    assert_same_tensors(hvd, ddp)
    assert len((tmp_path / "horovod" / "metrics.jsonl").read_text().splitlines()) >= 2


def test_bench_unet_over_two_horovod_ranks(horovod, tmp_path, conv_flops):
    """`bench unet --dist horovod` under mpirun: one report (rank 0's) for the whole job's global batch, whose
    throughput, FLOPs and parameters agree with each other and the model."""
    config = tmp_path / "unet.yaml"
    config.write_text(yaml.safe_dump({"data": {"real": str(tmp_path)}, "model": CONFIGS["unet"]["model"]}))
    done = run_ok([*mpirun_prefix(2), *CLI, "bench", "unet", "-c", str(config), "--size", "32", "--batch", "4",
                   "--steps", "2", "--dist", "horovod", "--json"], "bench unet under mpirun")
    (line,) = done.stdout.splitlines()
    doc = json.loads(line)
    assert doc["dist"] == "horovod" and doc["ranks"] == 2 and doc["batch"] == 4
    model = UNet(UNetConfig(classes=7, widths=(4, 8, 16, 32), bridge=32)).eval()
    assert doc["params"] == sum(p.numel() for p in model.parameters())
    assert doc["gflop_per_image_fwd"] * 1e9 == conv_flops(model, torch.zeros(1, 1, 32, 32))
    assert doc["img_per_s"] * doc["seconds"] == pytest.approx(4 * 2, rel=1e-9)  # the global batch, 2 timed steps
    assert doc["tflops"] == pytest.approx(3 * doc["gflop_per_image_fwd"] * doc["img_per_s"] / 1e3, rel=1e-9)
