"""The pipeline end to end on the local executor with tiny configs: prepare from the cohort, every step's output, the
filter's choice checked against norms computed here, MPI steps on 2 ranks, the sweep over the synthetic store it made,
and a re-run that skips everything."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from toolkit.cluster.pipeline import PipelineConfig, TrainStep, run_pipeline
from toolkit.data.store import Store

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "toolkit.cli"]


def _yaml(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return path


def _split_rows(store, split):
    """{(subject, slice): label} of a store split, read straight from its shard files."""
    rows = {}
    for shard in json.loads((store / "manifest.json").read_text())["splits"][split]["shards"]:
        with h5py.File(store / shard["file"], "r") as f:
            rows.update(zip(zip(f["subject"].asstr()[:], f["slice"][:].tolist()), f["label"][:]))
    return rows


def _floored_norms(store, masks, min_std):
    """The z-score norms of ``masks`` against the non-empty training masks of ``store``, computed here: per pixel
    mean and population standard deviation (floored at ``min_std``), then ‖(x − μ)/σ‖₂."""
    real = np.stack(list(_split_rows(store, "train").values())).astype(np.float64)
    real = real[real.reshape(len(real), -1).any(1)]
    sigma = np.maximum(real.std(0), min_std)
    return np.sqrt((((masks - real.mean(0)) / sigma) ** 2).sum((1, 2)))


@pytest.fixture(scope="module")
def tiny_pipeline(cohort, tmp_path_factory):
    """A whole local pipeline with tiny configs, run once for this module: (its config, run_pipeline's result)."""
    if shutil.which("mpirun") is None:
        pytest.skip("needs OpenMPI's mpirun (make test installs openmpi-bin as root)")
    tmp_path = tmp_path_factory.mktemp("pipeline")
    out = tmp_path / "exp"
    pgan = _yaml(tmp_path / "pgan.yaml", {
        "data": {"store": "set-by-pipeline"}, "model": {"resolution": 64, "latent": 8, "fmap_base": 32, "fmap_max": 8},
        "schedule": {"total_kimg": 1, "lod_training_kimg": 1, "lod_transition_kimg": 1, "minibatch_repeats": 1,
                     "minibatch": {4: 16}, "tick_kimg": {4: 1}},
        "loop": {"checkpoint_every_minutes": 0.0}, "runtime": {"threads": 1}, "samples": 4})
    spade = _yaml(tmp_path / "spade.yaml", {
        "data": {"store": "set-by-pipeline"},
        "model": {"resolution": 64, "ngf": 2, "ndf": 4, "hidden": 4, "out_channels": 2},
        "optim": {"batch": 8}, "loop": {"epochs": 1, "checkpoint_every_minutes": 0.0}, "runtime": {"threads": 1},
        "samples": 2})
    base = _yaml(tmp_path / "unet.yaml", {
        "data": {"real": "set-by-sweep", "real_n": 16}, "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"batch": 8}, "loop": {"epochs": 1, "checkpoint_every_minutes": 0.0}, "runtime": {"threads": 1}})
    sweep = _yaml(tmp_path / "sweep.yaml", {
        "name": "tiny", "model": "unet", "base": str(base), "vars": {"real": "x", "synthetic": "y"},
        "set": {"data.real": "${real}"},
        "grid": {"classes": {"data.classes": [7, 2]},
                 "mix": {"real": {"data.synthetic": None},
                         "real + synthetic": {"data.synthetic": "${synthetic}", "data.synthetic_n": 8}}}})
    # A 1-kimg PGAN's masks are noise with stray labels where every real mask is background (σ = 0), so the strict
    # rule drops them all; σ floored at 0.5 ranks them instead (measured norms 330-533, median 452), and 485 keeps
    # most (the sweep needs 8) and drops some. A 1-kimg D scores every such mask below every real one, so the D-score
    # stage's quantile rule would keep none (which its job refuses); an absolute threshold below them all keeps them.
    cfg = PipelineConfig(out=out, cohort=cohort, pgan=TrainStep(pgan), spade=TrainStep(spade), sweep=sweep, size=64,
                         workers=2, branches=("full",), swd_images=32, masks=40, ranks=2, threshold=485.0,
                         min_std=0.5, filter=("zscore", "dscore"), dscore_threshold=-1e9, modality="t1ce,flair",
                         intensity="volume")  # the demo's store: two modalities, each volume standardised
    return cfg, run_pipeline(cfg, "local")


@pytest.mark.mpi
def test_local_pipeline_prepares_filters_and_runs_every_step_then_skips_them(tiny_pipeline, store_64):
    cfg, result = tiny_pipeline
    out = Path(cfg.out)
    jobs = result["jobs"]
    assert all(jobs[s] == "ran" for s in (
        "prepare", "pgan-full", "swd-full", "masks-full", "filter-zscore-full", "filter-full", "spade-full",
        "images-full"))
    # prepare ran on the cohort: the same slices as the session's store prepared from it with the same options
    for split in ("train", "val", "test"):
        mine, session = _split_rows(out / "store", split), _split_rows(store_64, split)
        assert mine.keys() == session.keys() and all(np.array_equal(mine[k], session[k]) for k in session)
    # the filter kept exactly the masks whose norm, computed here, is within the threshold
    masks = Store(out / "stores" / "masks-full").read("train")["label"]
    keep = _floored_norms(out / "store", masks.astype(np.float64), 0.5) <= 485.0
    assert len(masks) == 40 and 8 <= keep.sum() < 40, sorted(_floored_norms(out / "store", masks, 0.5))
    zscored = Store(out / "stores" / "zscore-full")
    assert zscored.manifest.provenance["kept"] == keep.sum() and zscored.manifest.provenance["real_masks"] > 0
    assert np.array_equal(zscored.read("train")["label"], masks[keep])
    # then the D-score stage: of those, exactly the rows its CSV marks kept, those scoring ≥ its threshold
    with open(out / "stores" / "kept-full" / "dscore.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = Store(out / "stores" / "kept-full")
    chain = kept.manifest.provenance
    d_keep = np.array([r["kept"] == "1" for r in rows])
    assert len(rows) == keep.sum() and chain["filter"] == "dscore" and chain["source"]["filter"] == "zscore"
    assert chain["threshold"] == -1e9 and chain["real_quantile"] is None
    assert np.array_equal(d_keep, np.array([float(r["score"]) for r in rows]) >= chain["threshold"])
    assert chain["kept"] == d_keep.sum() >= 8 and np.array_equal(kept.read("train")["label"], masks[keep][d_keep])
    synthetic = Store(out / "stores" / "synthetic-full").manifest
    assert synthetic.has_image and synthetic.splits["train"].n == d_keep.sum()
    assert synthetic.modalities == Store(out / "store").manifest.modalities == ("t1ce", "flair")
    assert synthetic.provenance["masks"] == str((out / "stores" / "kept-full").resolve())
    assert (out / "runs" / "pgan-full" / "snapshots" / "best").exists()
    members = json.loads((out / "sweep" / "sweep.json").read_text())["members"]
    mixed = [m for m in members if m["labels"]["mix"] == "real + synthetic"]
    assert len(members) == 4 and len(mixed) == 2
    assert all(f"data.synthetic={out.resolve() / 'stores' / 'synthetic-full'}" in m["overrides"] for m in mixed)
    status = subprocess.run([*CLI, "sweep", "status", str(out / "sweep"), "--json"], capture_output=True, text=True,
                            timeout=120)
    assert [m["state"] for m in json.loads(status.stdout)["members"]] == ["done"] * 4
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
    # every reduced step reads the reduced prefix, every full one the whole training split
    for b, flag in (("reduced", True), ("full", False)):
        assert f"data.reduced={str(flag).lower()}" in by_name[f"pgan-{b}"].job.overrides
        assert f"data.reduced={str(flag).lower()}" in by_name[f"spade-{b}"].job.overrides
        assert by_name[f"swd-{b}"].job.reduced is flag and by_name[f"filter-{b}"].job.reduced is flag
    # the paper: 250 SPADE epochs on the reduced set (before the pipeline's data keys, which no override may name)
    assert by_name["spade-reduced"].job.overrides[-3:] == ("loop.epochs=250", f"data.store={cfg.out}/store",
                                                           "data.reduced=true")
    assert not any("epochs" in o for o in by_name["spade-full"].job.overrides)
    assert by_name["prepare"].job.config.include == ("HGG/*",) and cfg.subjects == "HGG/*"  # the 210 HGG subjects
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


def test_filter_stages_chain_in_the_order_given_and_the_last_one_writes_the_kept_store():
    from dataclasses import replace

    from toolkit.cluster.pipeline import steps
    from toolkit.config import load

    cfg = replace(load(PipelineConfig, REPO / "configs" / "pipeline" / "paper.yaml"), filter=("zscore", "dscore"),
                  dscore_quantile=0.05)
    by_name = {s.name: s for s in steps(cfg, "slurm")}
    stores = Path(cfg.out) / "stores"
    for b in ("full", "reduced"):
        first, last = by_name[f"filter-zscore-{b}"], by_name[f"filter-{b}"]
        assert first.after == (f"masks-{b}",) and last.after == (f"filter-zscore-{b}",)
        assert (first.job.method, first.job.synthetic, first.job.out) == ("zscore", stores / f"masks-{b}",
                                                                          stores / f"zscore-{b}")
        assert (last.job.method, last.job.synthetic, last.job.out) == ("dscore", stores / f"zscore-{b}",
                                                                       stores / f"kept-{b}")
        assert first.job.threshold == 500.0 and last.job.threshold is None and last.job.real_quantile == 0.05
        assert first.tasks == last.tasks == cfg.ranks
        assert by_name[f"images-{b}"].job.masks == stores / f"kept-{b}"
    only_d = {s.name: s for s in steps(replace(cfg, filter=("dscore",)), "slurm")}
    assert only_d["filter-full"].job.method == "dscore" and only_d["filter-full"].job.synthetic == stores / "masks-full"
    assert not any(name.startswith("filter-zscore") for name in only_d)


@pytest.mark.parametrize("stages", [[], ["zscore", "zscore"], ["zscore", "sharpness"]])
def test_a_filter_list_that_is_empty_repeats_or_names_an_unknown_stage_is_refused(stages):
    from toolkit.config import ConfigError, load

    with pytest.raises(ConfigError, match="filter: expected distinct stages among"):
        load(PipelineConfig, REPO / "configs" / "pipeline" / "paper.yaml", [f"filter={json.dumps(stages)}"])


@pytest.mark.mpi
def test_demo_report_has_every_section_in_order_and_every_linked_figure_exists(tiny_pipeline):
    """The report's structure, not its numbers (those belong to the demo run): rendered from the tiny pipeline."""
    from toolkit.cluster.sweep import Sweep
    from toolkit.demo import _calibrate
    from toolkit.report.demo import render

    cfg, result = tiny_pipeline
    out = Path(cfg.out)
    text = render(out, header=["# report", ""], table=Sweep(out / "sweep").report(),
                  calibration=_calibrate(out, cfg.threshold, cfg.dscore_quantile), threshold=cfg.threshold,
                  min_std=cfg.min_std,
                  timings={**result["seconds"], "total": sum(result["seconds"].values())})
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.split(" ", 2)[1] for h in headings] == ["1.", "2.", "3.", "4.", "5.", "6.", "7."]
    links = re.findall(r"!\[[^]]*]\(([^)]+)\)", text)
    # PGAN's SWD curve and tick 0's sample grid (and the best tick's, where that is another), each filter's
    # calibration and dropped masks (the D-score stage's where it dropped any), SPADE's grid, Table 1's bars and the
    # segmentation figure of each real-only member (7 and 2 classes)
    improved = (out / "runs" / "pgan-full" / "snapshots" / "best").read_text().strip() != "tick-0000"
    d_dropped = Store(out / "stores" / "kept-full").manifest.provenance["dropped"] > 0
    assert len(links) == 9 + improved + d_dropped == len(set(links)), links
    assert all((out / link).is_file() for link in links), links
    assert "## 3. Filters: Z-score, then discriminator score" in text
    assert "figure missing" not in text
    assert "| real + synthetic |" in text and "| class-mean baseline |" in text
    assert "| class-mean baseline (flair) |" in text and "each volume scaled to a brain median of 1000" in text
    checks = [line for line in text.split("## 6.")[1].split("## 7.")[0].splitlines() if line.startswith("| U-Net")]
    # the 7-class member: Dice error and WT, TC, ET; the 2-class member: Dice error only
    assert len(checks) == 5 and all(line.rstrip().endswith(("| met |", "| **not met** |")) for line in checks)
    for step in ("pgan-full", "spade-full", "sweep"):
        assert f"| {step} |" in text

