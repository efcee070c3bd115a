"""The pipeline end to end on the local executor with tiny configs: every step's output, MPI steps on 2 ranks, the
sweep over the synthetic store it made, and a re-run that skips everything."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit.cluster.pipeline import PipelineConfig, TrainStep, run_pipeline
from toolkit.data.store import Store

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "toolkit.cli"]


def _yaml(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.mpi
def test_local_pipeline_runs_every_step_then_skips_them(store_64, tmp_path):
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    out = tmp_path / "exp"
    shutil.copytree(store_64, out / "store")  # a complete store: prepare is skipped
    pgan = _yaml(tmp_path / "pgan.yaml", {
        "data": {"store": "set-by-pipeline"}, "model": {"resolution": 64, "latent": 8, "fmap_base": 32, "fmap_max": 8},
        "schedule": {"total_kimg": 1, "lod_training_kimg": 1, "lod_transition_kimg": 1, "minibatch_repeats": 1,
                     "minibatch": {4: 16}, "tick_kimg": {4: 1}},
        "loop": {"checkpoint_every_minutes": 0.0}, "runtime": {"threads": 1}, "samples": 4})
    spade = _yaml(tmp_path / "spade.yaml", {
        "data": {"store": "set-by-pipeline"}, "model": {"resolution": 64, "ngf": 2, "ndf": 4, "hidden": 4},
        "optim": {"batch": 8}, "loop": {"epochs": 1, "checkpoint_every_minutes": 0.0}, "runtime": {"threads": 1},
        "samples": 2})
    base = _yaml(tmp_path / "unet.yaml", {
        "data": {"real": "set-by-sweep", "real_n": 16}, "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"batch": 8}, "loop": {"epochs": 1, "checkpoint_every_minutes": 0.0}, "runtime": {"threads": 1}})
    sweep = _yaml(tmp_path / "sweep.yaml", {
        "name": "tiny", "model": "unet", "base": str(base), "vars": {"real": "x", "synthetic": "y"},
        "set": {"data.real": "${real}"},
        "grid": {"classes": {"data.classes": [7, 2]},
                 "mix": {"real + synthetic": {"data.synthetic": "${synthetic}", "data.synthetic_n": 16}}}})
    cfg = PipelineConfig(out=out, cohort=tmp_path / "unused", pgan=TrainStep(pgan), spade=TrainStep(spade),
                         sweep=sweep, size=64, branches=("full",), swd_images=32, masks=40, ranks=2,
                         threshold=float("inf"))  # keep all: a 1-kimg PGAN's masks are noise (σ = 0 corners → ∞)
    result = run_pipeline(cfg, "local")
    jobs = result["jobs"]
    assert jobs["prepare"] == "done" and all(jobs[s] == "ran" for s in (
        "pgan-full", "swd-full", "masks-full", "filter-full", "spade-full", "images-full"))
    kept = Store(out / "stores" / "kept-full").manifest
    assert kept.provenance["kept"] == 40 and kept.provenance["real_masks"] > 0
    synthetic = Store(out / "stores" / "synthetic-full").manifest
    assert synthetic.has_image and synthetic.splits["train"].n == 40
    assert synthetic.provenance["masks"] == str((out / "stores" / "kept-full").resolve())
    assert (out / "runs" / "pgan-full" / "snapshots" / "best").exists()
    members = json.loads((out / "sweep" / "sweep.json").read_text())["members"]
    assert len(members) == 2 and all(f"data.synthetic={out.resolve() / 'stores' / 'synthetic-full'}" in m["overrides"]
                                     for m in members)
    status = subprocess.run([*CLI, "sweep", "status", str(out / "sweep"), "--json"], capture_output=True, text=True,
                            timeout=120)
    assert [m["state"] for m in json.loads(status.stdout)["members"]] == ["done", "done"]
    again = run_pipeline(cfg, "local")["jobs"]
    assert set(again.values()) == {"done"}  # every step and the sweep are complete



def test_the_paper_pipeline_config_builds_both_branches_in_dependency_order(tmp_path):
    from dataclasses import replace

    from toolkit.cluster.pipeline import _uses_mpi, steps
    from toolkit.config import load

    cfg = load(PipelineConfig, REPO / "configs" / "pipeline" / "paper.yaml")
    local, slurm = steps(cfg, "local"), steps(cfg, "slurm")
    names = [s.name for s in local]
    assert len(names) == 13 and names[0] == "prepare"
    for step in local:  # every parent comes earlier
        assert all(names.index(parent) < names.index(step.name) for parent in step.after), step.name
    by_name = {s.name: s for s in slurm}
    assert by_name["images-reduced"].after == ("filter-reduced", "spade-reduced")
    assert by_name["filter-reduced"].job.reduced and not by_name["filter-full"].job.reduced
    assert "data.reduced=true" in by_name["pgan-reduced"].job.overrides
    # the v100 profile's 2 tasks: DDP training on SLURM, one process locally; MPI steps take cfg.ranks
    assert by_name["pgan-full"].tasks == 2 and by_name["pgan-full"].job.backend == "ddp"
    assert {s.name: s.tasks for s in local}["pgan-full"] == 1 and by_name["swd-full"].tasks == cfg.ranks == 4
    assert _uses_mpi(by_name["swd-full"].job) and not _uses_mpi(by_name["pgan-full"].job)
    # a profile with `dist: horovod`: the same trainings as Horovod jobs, whose tasks srun starts with PMIx
    horovod = _yaml(tmp_path / "v100-horovod.yaml",
                    {**yaml.safe_load((REPO / "slurm" / "profiles" / "v100.yaml").read_text()), "dist": "horovod"})
    by_name = {s.name: s for s in steps(replace(cfg, profile=str(horovod)), "slurm")}
    assert {by_name[f"{m}-{b}"].job.backend for m in ("pgan", "spade") for b in ("full", "reduced")} == {"horovod"}
    assert _uses_mpi(by_name["spade-full"].job) and by_name["spade-full"].tasks == 2
