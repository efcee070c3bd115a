"""`pipeline plan`: the paper pipeline's plan (250 reduced SPADE epochs, the reduced SWD set, the HGG cohort), its
dependencies against `steps()`, resources from the profile, done / queued states as `pipeline run` decides them, the
JSON keys of DESIGN §3 — and that planning submits nothing, writes nothing and never asks SLURM without job ids."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import submitit

from toolkit.cluster import slurmctl
from toolkit.cluster.pipeline import PipelineConfig, TrainStep, run_pipeline, steps
from toolkit.cluster.plan import plan, table
from toolkit.config import ConfigError, from_dict, load

REPO = Path(__file__).resolve().parents[2]
PAPER = REPO / "configs" / "pipeline" / "paper.yaml"
CLI = [sys.executable, "-m", "toolkit.cli"]
ROLES = ("t1", "t1ce", "t2", "flair", "seg")


def _brats2018(root: Path, hgg: int, lgg: int) -> Path:
    """A BraTS 2018 layout of empty files (discovery reads names only): ``hgg`` HGG/ and ``lgg`` LGG/ subjects."""
    for grade, count in (("HGG", hgg), ("LGG", lgg)):
        for i in range(count):
            folder = root / grade / f"Brats18_{grade}_{i:03d}_1"
            folder.mkdir(parents=True)
            for role in ROLES:
                (folder / f"{folder.name}_{role}.nii.gz").touch()
    return root


def _no_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any SLURM command or submitit executor fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"the plan called SLURM or submitit: {args}")

    monkeypatch.setattr(slurmctl, "_run", refuse)
    monkeypatch.setattr(slurmctl, "job_states", refuse)
    monkeypatch.setattr(submitit, "AutoExecutor", refuse)


@pytest.fixture(scope="module")
def paper(tmp_path_factory) -> tuple[PipelineConfig, dict]:
    """The paper pipeline (its own out folder) over a BraTS 2018 layout of 210 HGG and 75 LGG subjects, planned on
    slurm with the v100 profile while SLURM and submitit refuse every call: (config, plan)."""
    root = tmp_path_factory.mktemp("plan")
    cfg = replace(load(PipelineConfig, PAPER), out=root / "exp", cohort=_brats2018(root / "brats18", 210, 75))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _no_slurm(monkeypatch)
        doc = plan(cfg, "slurm")
    return cfg, doc


def _by_name(doc: dict) -> dict[str, dict]:
    return {step["name"]: step for step in doc["steps"]}


def test_the_paper_plan_trains_the_reduced_spade_250_epochs_and_scores_the_reduced_pgan_on_the_reduced_set(paper):
    cfg, doc = paper
    by = _by_name(doc)
    assert by["spade-reduced"]["config"]["loop"]["epochs"] == 250 and by["spade-full"]["config"]["loop"]["epochs"] == 50
    for model in ("pgan", "spade"):
        assert by[f"{model}-reduced"]["config"]["data"]["reduced"] is True
        assert by[f"{model}-full"]["config"]["data"]["reduced"] is False
        assert by[f"{model}-full"]["config"]["data"]["store"] == str(cfg.out / "store")
    assert by["swd-reduced"]["job"]["reduced"] is True and by["swd-full"]["job"]["reduced"] is False
    assert "reduced prefix repeated to 16384" in by["swd-reduced"]["what"]
    assert by["filter-reduced"]["job"]["reduced"] is True and by["filter-full"]["job"]["reduced"] is False
    assert by["prepare"]["config"] is None and by["swd-full"]["config"] is None
    # the paper's cohort: the 210 HGG subjects, 210 × 155 = 32,550 slices, 26,040 for training, 5,208 reduced
    assert doc["subjects"] == "HGG/*" and by["prepare"]["job"]["config"]["include"] == ["HGG/*"]
    assert doc["rows"]["train"] == 26040 and doc["rows"]["reduced"] == 5208 and "210 subjects" in doc["rows"]["source"]


def test_the_plan_s_dependencies_are_those_of_steps_and_the_sweep_waits_for_every_branch(paper):
    cfg, doc = paper
    expected = [(s.name, list(s.after)) for s in steps(cfg, "slurm")]
    assert [(s["name"], s["after"]) for s in doc["steps"]] == [*expected, ("sweep", ["images-full", "images-reduced"])]
    assert all(s["state"] == "to run" and s["job_id"] is None for s in doc["steps"])


def test_resources_come_from_the_profile_and_gpu_hours_are_estimated_for_every_step(paper, tmp_path):
    cfg, doc = paper
    by = _by_name(doc)
    expected = {"nodes": 1, "tasks_per_node": 2, "tasks": 2, "gpus": 2, "time_limit_min": 1440, "mpi": False}
    assert {k: by["pgan-full"]["resources"][k] for k in expected} == expected
    assert by["swd-full"]["resources"]["tasks"] == 4 and by["swd-full"]["resources"]["mpi"] is True
    assert by["sweep"]["resources"]["array"] == 21 and by["sweep"]["job"]["members"] == 21
    assert doc["gpu"] == "V100" and doc["gpu_hours_without"] == []
    hours = {s["name"]: s["estimate_gpu_hours"] for s in doc["steps"]}
    assert hours["prepare"] == hours["filter-full"] == 0.0
    assert all(hours[name] > 0 for name in ("pgan-full", "spade-full", "swd-full", "masks-full", "images-full",
                                            "sweep"))
    # the reduced SPADE: a fifth of the pairs for five times the epochs (the cohort estimate drops no empty slices)
    assert hours["spade-reduced"] == pytest.approx(hours["spade-full"] * 5208 * 250 / (26040 * 50))
    assert doc["gpu_hours"] == pytest.approx(sum(hours.values()))
    # the 2-node profile doubles tasks and GPUs, and the table shows nodes × tasks
    two_nodes = plan(replace(cfg, profile="v100-2node"), "slurm")
    resources = _by_name(two_nodes)["spade-full"]["resources"]
    assert (resources["nodes"], resources["tasks"], resources["gpus"]) == (2, 4, 4)
    assert " 2×2 " in table(two_nodes)
    # the augmentation extras add 12 members to the sweep's array, and their GPU-hours
    augmented = _by_name(plan(replace(cfg, sweep_with=("augmentation",)), "slurm"))["sweep"]
    assert augmented["resources"]["array"] == augmented["job"]["members"] == 33
    assert augmented["estimate_gpu_hours"] > hours["sweep"]
    text = table(doc)
    assert "spade-reduced" in text and "250 epochs, reduced prefix" in text and "GPU-hours (estimate)" in text


def test_planning_writes_nothing_and_a_local_plan_has_no_gpu_estimate(paper):
    cfg, _ = paper
    assert not Path(cfg.out).exists()  # no .pipeline/, no store: the plan only read
    local = plan(replace(cfg, profile="local"), "local")
    assert local["gpu_hours"] is None and all(s["resources"]["time_limit_min"] is None for s in local["steps"])
    assert _by_name(local)["pgan-full"]["resources"]["tasks"] == 1 and not Path(cfg.out).exists()


def test_done_and_queued_steps_as_pipeline_run_decides_them(paper, monkeypatch):
    cfg, _ = paper
    out = Path(cfg.out)
    try:
        (out / "runs" / "pgan-full" / "snapshots").mkdir(parents=True)
        (out / "runs" / "pgan-full" / "DONE").write_text("{}")
        (out / "runs" / "pgan-full" / "snapshots" / "best").write_text("tick-0003\n")
        (out / ".pipeline").mkdir(mode=0o700)
        (out / ".pipeline" / "jobs.json").write_text(json.dumps(
            {"prepare": "done", "pgan-reduced": "101", "spade-reduced": "102", "sweep": "103"}))
        asked = []
        monkeypatch.setattr(slurmctl, "job_states",
                            lambda ids: asked.append(sorted(ids)) or {"101": "PENDING", "102": "COMPLETED"})
        by = _by_name(plan(cfg, "slurm"))
        assert asked == [["101", "102"]]  # once, and only about the jobs recorded for steps
        assert by["pgan-full"]["state"] == by["swd-full"]["state"] == "done"
        assert (by["pgan-reduced"]["state"], by["pgan-reduced"]["job_id"]) == ("queued", "101")
        assert by["spade-reduced"]["state"] == "to run" and by["prepare"]["state"] == "to run"  # no store yet

        def down(ids):
            raise RuntimeError("scontrol: controller down")

        monkeypatch.setattr(slurmctl, "job_states", down)
        by = _by_name(plan(cfg, "slurm"))
        assert by["pgan-reduced"]["state"] == "unknown" and by["pgan-full"]["state"] == "done"
        _no_slurm(monkeypatch)  # on local, recorded ids are never looked up (as `pipeline run` on local)
        assert _by_name(plan(cfg, "local"))["pgan-reduced"]["state"] == "to run"
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)


def test_per_branch_overrides_are_typed_and_may_not_name_the_pipeline_s_data_keys():
    doc = {"out": "x", "cohort": "c", "pgan": {"config": "p.yaml"}, "spade": {"config": "s.yaml"}, "sweep": "w.yaml"}
    cfg = from_dict(PipelineConfig, {**doc, "spade": {"config": "s.yaml", "branches": {"reduced": ["loop.epochs=9"]}}})
    assert cfg.spade.overrides("reduced", Path("st"))[:1] == ("loop.epochs=9",) and cfg.pgan.branches == {}
    assert "loop.epochs=9" not in cfg.spade.overrides("full", Path("st"))
    for branches, message in (({"half": ["a=1"]}, "not among"), ({"reduced": ["data.reduced=false"]}, "pipeline"),
                              ({"reduced": ["epochs"]}, "key.path=value"), ({"reduced": "loop.epochs=9"}, "tuple")):
        with pytest.raises(ConfigError, match=message):
            from_dict(PipelineConfig, {**doc, "spade": {"config": "s.yaml", "branches": branches}})
    with pytest.raises(ConfigError, match=r"unknown key 'spade\.brnches'"):
        from_dict(PipelineConfig, {**doc, "spade": {"config": "s.yaml", "brnches": {}}})
    with pytest.raises(ConfigError, match="subjects"):
        from_dict(PipelineConfig, {**doc, "subjects": " "})
    assert TrainStep(Path("p.yaml")).overrides("full", Path("st")) == ("data.store=st", "data.reduced=false")


def test_the_demo_pipeline_still_builds():
    from toolkit.demo import DemoConfig, pipeline_config

    cfg = pipeline_config(DemoConfig(out=Path("demo-out")))
    assert cfg.subjects is None and [s.name for s in steps(cfg)][:2] == ["prepare", "pgan-full"]
    assert steps(cfg)[0].job.config.include == ()


def test_a_spade_config_whose_outputs_miss_the_modalities_is_refused_before_anything_runs(tmp_path):
    from toolkit.demo import DemoConfig, pipeline_config

    cfg = pipeline_config(DemoConfig(out=tmp_path / "demo", modality="t1ce"))  # configs/demo-spade.yaml makes two
    with pytest.raises(ValueError, match=r"demo-spade\.yaml: model\.out_channels is 2, but the pipeline's modality "
                                         r"'t1ce' gives the store 1 image channels: set model\.out_channels: 1"):
        run_pipeline(cfg, "local")
    assert not (tmp_path / "demo" / "store").exists()


def test_pipeline_plan_json_on_the_command_line(paper):
    cfg, _ = paper
    done = subprocess.run([*CLI, "pipeline", "plan", str(PAPER), "--cluster", "slurm", "--json", "--set",
                           f"out={cfg.out}", "--set", f"cohort={cfg.cohort}"], capture_output=True, text=True,
                          timeout=300, env={"PATH": "/nonexistent", "PYTHONDONTWRITEBYTECODE": "1"})  # no sbatch
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # one JSON object on stdout and nothing else
    assert {"steps", "gpu_hours"} <= set(doc)
    for step in doc["steps"]:
        assert {"name", "after", "resources", "state", "config", "estimate_gpu_hours"} <= set(step), step["name"]
    assert _by_name(doc)["spade-reduced"]["config"]["loop"]["epochs"] == 250
    assert not Path(cfg.out).exists()
