"""Sweep files and Table 1 without a cluster: the grid's product, variables, early config errors, the local executor
running members, status from run directories, the report (bold best per column, mean ± sd, missing cells)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit.cluster.sweep import Sweep, load_spec, members
from toolkit.config import ConfigError
from toolkit.report.tables import table1

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "toolkit.cli"]


def test_the_paper_sweep_has_21_members_with_the_papers_mixes():
    spec = load_spec(REPO / "configs" / "sweeps" / "table1.yaml", variables=("real=/data/real",))
    rows = members(spec)
    assert len(rows) == 21 and len({r["name"] for r in rows}) == 21
    mixes = {(r["labels"]["mix"], r["labels"]["classes"]) for r in rows}
    assert ("26040 real + 8960 synthetic", "4") in mixes and ("5208 real + 20832 synthetic", "2") in mixes
    reduced = next(r for r in rows if r["labels"]["mix"] == "5208 real + 4792 synthetic")["overrides"]
    assert "data.real=/data/real" in reduced and "data.synthetic=stores/synthetic-reduced" in reduced
    assert "data.real_n=5208" in reduced and "data.synthetic_n=4792" in reduced
    assert not any("augment" in o for r in rows for o in r["overrides"])  # the paper's 21 use no augmentation


def test_the_augmentation_extras_add_four_augmented_rows_and_an_unknown_group_is_refused():
    path = REPO / "configs" / "sweeps" / "table1.yaml"
    rows = members(load_spec(path, extras=("augmentation",)))
    assert len(rows) == 33
    augmented = [r for r in rows if r["labels"]["mix"].endswith("+ augmentation")]
    assert len(augmented) == 12 and len({r["labels"]["mix"] for r in augmented}) == 4
    for row in augmented:
        augment = next(o for o in row["overrides"] if o.startswith("augment="))
        assert yaml.safe_load(augment.removeprefix("augment="))["rotation"] == {"p": 0.5, "degrees": 15}
    with_synthetic = next(r for r in augmented if r["labels"]["mix"] == "5208 real + 20832 synthetic + augmentation")
    assert "data.synthetic=stores/synthetic-reduced" in with_synthetic["overrides"]
    with pytest.raises(ConfigError, match=r"no extras group 'flips'.*augmentation"):
        load_spec(path, extras=("flips",))


def _write_sweep(path, base, **extra):
    doc = {"name": "t", "model": "unet", "base": str(base), "evaluate": "test",
           "grid": {"classes": {"data.classes": [7, 2]}, "mix": {"a": {"data.real_n": 16}, "b": {"data.real_n": 8}}},
           "report": {"columns": "classes", "rows": "mix"}, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def base(tmp_path, store_64):
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"real": str(store_64), "classes": 7}, "model": {"widths": [4, 8, 16, 32], "bridge": 32},
        "optim": {"batch": 8}, "loop": {"epochs": 1, "checkpoint_every_minutes": 0.0, "log_every_steps": 1},
        "runtime": {"threads": 1}}))
    return path


def test_repeats_seeds_and_a_typo_fail_before_submission(tmp_path, base):
    spec = load_spec(_write_sweep(tmp_path / "s.yaml", base, repeats=2))
    rows = members(spec)
    assert len(rows) == 8 and sorted({r["seed"] for r in rows}) == [0, 1]
    with pytest.raises(ConfigError, match=r"optim\.bacth"):
        load_spec(_write_sweep(tmp_path / "bad.yaml", base, set={"optim.bacth": 4}))
    with pytest.raises(ConfigError, match="unknown variable"):
        load_spec(_write_sweep(tmp_path / "var.yaml", base, set={"data.real": "${nowhere}"}))


def test_local_sweep_runs_reports_and_resumes(tmp_path, base, figure):
    spec = _write_sweep(tmp_path / "s.yaml", base)
    out = tmp_path / "sweep"
    done = subprocess.run([*CLI, "sweep", "submit", str(spec), "--cluster", "local", "--out", str(out),
                           "--set", "loop.checkpoint_every_steps=1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    status = json.loads(subprocess.run([*CLI, "sweep", "status", str(out), "--json"], capture_output=True, text=True,
                                       timeout=120).stdout)["members"]
    assert [r["state"] for r in status] == ["done"] * 4 and all(r["epoch"] == 1 for r in status)
    report = subprocess.run([*CLI, "sweep", "report", str(out), "--json"], capture_output=True, text=True, timeout=120)
    cells = json.loads(report.stdout)["cells"]
    values = {(row, col): json.loads((out / "runs" / m["name"] / "eval-test.json").read_text())["dice_error_percent"]
              for m in json.loads((out / "sweep.json").read_text())["members"]
              for row, col in [(m["labels"]["mix"], m["labels"]["classes"])]}
    assert {(r, c): cell["mean"] for r, cols in cells.items() for c, cell in cols.items()} == values
    assert (out / "table1.md").exists()
    chart = figure(out / "table1.png")  # one bar series per column (classes 7, 2), in tab10's first two colours
    assert (chart.width, chart.height) == (240, 256) and len(chart.panels) == 1 and len(chart.panels[0]) == 1
    assert chart.classes(chart.panels[0][0], below=3) == {0, 1}
    # a member that lost its run directory is resubmitted by resume, and only it
    first = json.loads((out / "sweep.json").read_text())["members"]
    shutil.rmtree(out / "runs" / first[1]["name"])
    assert Sweep(out).status()[1]["state"] == "not started"
    assert len(Sweep(out).resume()) == 1
    after = json.loads((out / "sweep.json").read_text())["members"]
    assert [len(m["jobs"]) for m in after] == [1, 2, 1, 1]
    assert [r["state"] for r in Sweep(out).status()] == ["done"] * 4
    assert len(Sweep(out).evaluate("val")) == 4  # every finished member scored on another split, as an array
    for member in after:
        scored = json.loads((out / "runs" / member["name"] / "eval-val.json").read_text())
        # the member's best model scored again: what its own validation logged at its best epoch
        logged = [line for line in map(json.loads, (out / "runs" / member["name"] / "metrics.jsonl").read_text()
                                       .splitlines()) if "val_dice_error_percent" in line]
        best = min(logged, key=lambda line: line["val_dice_error_percent"])
        assert scored["split"] == "val"
        assert scored["dice_error_percent"] == pytest.approx(best["val_dice_error_percent"], rel=1e-6)
        assert scored["per_class_dice"] == pytest.approx([best[f"val_dice_{c}"] for c in range(
            len(scored["per_class_dice"]))], abs=1e-9)


def test_table1_bolds_the_best_of_each_column_and_shows_spread_and_gaps(tmp_path):
    results = [{"mix": "real", "classes": "7", "value": 30.0}, {"mix": "real", "classes": "7", "value": 34.0},
               {"mix": "mixed", "classes": "7", "value": 20.0}, {"mix": "real", "classes": "2", "value": 10.0}]
    doc = table1(results, rows="mix", columns="classes", row_order=["real", "mixed"], column_order=["7", "2"],
                 out=tmp_path / "t", title="demo")
    lines = doc["markdown"].splitlines()
    assert "| real | 32.00 ± 2.83 | **10.00** |" in lines
    assert "| mixed | **20.00** | – |" in lines
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "real,7,32.0,2.8284271247461903,2"


def test_bad_sweep_file_or_unreachable_slurm_fail_cleanly_and_write_nothing(tmp_path, base):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [\n")
    done = subprocess.run([*CLI, "sweep", "submit", str(bad), "--out", str(tmp_path / "a")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and "bad.yaml: not valid YAML" in done.stderr and not (tmp_path / "a").exists()
    spec = _write_sweep(tmp_path / "s.yaml", base)
    env = {**os.environ, "SLURM_CONF": str(tmp_path / "no-such-slurm.conf")}
    done = subprocess.run([*CLI, "sweep", "submit", str(spec), "--cluster", "slurm", "--out", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "no SLURM controller" in done.stderr and not (tmp_path / "b").exists()
