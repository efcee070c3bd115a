"""Bad values (issue #13): out-of-range, non-finite and repeated config values are refused before anything is
written, with an error naming the file (or ``--set``, or the option) and the key.

Each bad value goes through the real loading path: a copy of a shipped config with the value written in, the same
config with the value as a ``--set`` override, a sweep member, and for some the real ``tumorsynth`` process.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toolkit import config as configs
from toolkit.cli import build_parser
from toolkit.cluster.executors import Profile, load_profile
from toolkit.cluster.pipeline import PipelineConfig
from toolkit.cluster.sweep import load_spec
from toolkit.config import ConfigError
from toolkit.train.pgan import PGANRunConfig
from toolkit.train.spade import SPADERunConfig
from toolkit.train.unet import UNetRunConfig

REPO = Path(__file__).resolve().parents[2]
UNET, PIPELINE = REPO / "configs" / "demo.yaml", REPO / "configs" / "pipeline" / "paper.yaml"

# (shipped config, its class, key path, the bad value as YAML text, what a valid value is)
BAD = [
    (UNET, UNetRunConfig, "optim.batch", "0", "an int ≥ 1"),
    (UNET, UNetRunConfig, "optim.batch", "-8", "an int ≥ 1"),
    (UNET, UNetRunConfig, "loop.epochs", "-1", "an int ≥ 1"),
    (UNET, UNetRunConfig, "optim.lr", ".nan", "a float > 0"),
    (UNET, UNetRunConfig, "data.classes", "0", "an int ≥ 2"),
    (UNET, UNetRunConfig, "data.workers", "-3", "an int ≥ 0"),
    (UNET, UNetRunConfig, "data.real_n", "-5", "an int ≥ 0"),
    (PIPELINE, PipelineConfig, "threshold", ".nan", "a float ≥ 0 or infinity"),
    (PIPELINE, PipelineConfig, "ranks", "0", "an int ≥ 1"),
    (PIPELINE, PipelineConfig, "masks", "-1", "an int ≥ 1"),
]
IDS = [f"{key}={text}" for _, _, key, text, _ in BAD]


def with_value(source: Path, key: str, value: object, out: Path) -> Path:
    """A copy of the YAML file ``source`` with ``key`` (a dotted path) set to ``value``, written to ``out``."""
    doc = yaml.safe_load(source.read_text())
    *parents, last = key.split(".")
    node = doc
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def refusal(cls: type, path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        configs.load(cls, path, overrides)
    return str(info.value)


def cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "toolkit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize(("source", "cls", "key", "text", "expected"), BAD, ids=IDS)
def test_bad_value_in_a_config_file_is_refused_naming_the_file_and_key(tmp_path, source, cls, key, text, expected):
    value = yaml.safe_load(text)
    path = with_value(source, key, value, tmp_path / "bad.yaml")
    assert refusal(cls, path) == f"{path}: {key}: expected {expected}, got {value!r}"


@pytest.mark.parametrize(("source", "cls", "key", "text", "expected"), BAD, ids=IDS)
def test_bad_value_as_a_set_override_is_refused_naming_set_and_the_key(source, cls, key, text, expected):
    value = yaml.safe_load(text)
    assert refusal(cls, source, (f"{key}={text}",)) == f"--set: {key}: expected {expected}, got {value!r}"


def test_bad_value_in_a_sweep_member_is_refused_before_submission(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "bad", "model": "unet", "base": str(UNET),
        "grid": {"batch": {"good": {"optim.batch": 8}, "zero": {"optim.batch": 0}}}}))
    with pytest.raises(ConfigError, match=r"optim\.batch: expected an int ≥ 1, got 0$"):
        load_spec(sweep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.yaml"]


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "unet", "-c", "{bad}", "--run-dir", "run"], "{bad}: optim.batch: expected an int ≥ 1, got 0"),
    (["train", "unet", "-c", "{repeated}", "--run-dir", "run"],
     "{repeated}: not valid YAML: line {line}: duplicate key 'batch' (first given on line {first})"),
    (["pipeline", "run", PIPELINE, "--set", "out=out", "--set", "masks=-1"], "--set: masks: expected an int ≥ 1"),
    (["filter", "zscore", "--real", "real", "--synthetic", "synthetic", "--out", "out", "--threshold", "nan"],
     "argument --threshold: expected a float or infinity, got nan"),
    (["generate", "masks", "run", "--n", "-1", "--out", "out"], "argument --n: expected an int ≥ 1, got -1"),
    (["prepare", "cohort", "out", "--workers", "-3"], "argument --workers: expected an int ≥ 1, got -3"),
], ids=["file", "repeated-key", "pipeline", "filter-threshold", "generate-n", "prepare-workers"])
def test_cli_refuses_a_bad_value_with_exit_2_naming_it_and_writes_nothing(tmp_path, argv, message):
    bad = with_value(UNET, "optim.batch", 0, tmp_path / "bad.yaml")
    text = UNET.read_text()
    repeated = tmp_path / "repeated.yaml"
    batch = next(line for line in text.splitlines() if line.startswith("  batch: "))
    repeated.write_text(text.replace(f"{batch}\n", f"{batch}\n  batch: 3\n"))
    first = text.splitlines().index(batch) + 1
    names = {"bad": bad, "repeated": repeated, "line": first + 1, "first": first}
    before = sorted(tmp_path.iterdir())
    result = cli(*(str(a).format(**names) for a in argv), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message.format(**names) in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 300 and "Traceback" not in result.stderr
    assert sorted(tmp_path.iterdir()) == before  # no run directory, store or output folder


def test_repeated_key_in_a_config_is_refused_naming_file_line_and_key(tmp_path):
    lines = UNET.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  lr: "))
    path = tmp_path / "repeated.yaml"
    path.write_text("\n".join([*lines[:at + 1], lines[at], *lines[at + 1:]]) + "\n")
    assert refusal(UNetRunConfig, path) == (f"{path}: not valid YAML: line {at + 2}: duplicate key 'lr' "
                                            f"(first given on line {at + 1})")


def test_repeated_key_in_a_profile_is_refused_naming_file_line_and_key(tmp_path):
    text = (REPO / "slurm" / "profiles" / "local.yaml").read_text()
    path = tmp_path / "twice.yaml"
    path.write_text(text + "mem_gb: 64\n")
    first = text.splitlines().index("mem_gb: 2") + 1
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert str(info.value) == (f"{path}: not valid YAML: line {len(text.splitlines()) + 1}: duplicate key 'mem_gb' "
                               f"(first given on line {first})")


def test_filter_threshold_nan_is_refused_and_infinity_keeps_all():
    """∞ is a legitimate threshold (every norm, also an infinite one, is ≤ ∞: nothing is dropped); NaN, which every
    comparison fails, is not."""
    assert math.isinf(configs.load(PipelineConfig, PIPELINE, ["threshold=.inf"]).threshold)
    assert "threshold: expected a float ≥ 0 or infinity, got nan" in refusal(PipelineConfig, PIPELINE,
                                                                              ("threshold=.nan",))
    argv = ["filter", "zscore", "--real", "r", "--synthetic", "s", "--out", "o"]
    assert math.isinf(build_parser().parse_args([*argv, "--threshold", "inf"]).threshold)
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*argv, "--threshold", "nan"])
    assert info.value.code == 2


def shipped() -> list[Path]:
    return sorted([*(REPO / "configs").rglob("*.yaml"), *(REPO / "slurm" / "profiles").glob("*.yaml")])


RUN_CONFIGS = {"pgan": PGANRunConfig, "spade": SPADERunConfig, "unet": UNetRunConfig}


@pytest.mark.parametrize("path", shipped(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads_and_its_values_and_defaults_are_in_range(path):
    kind = path.relative_to(REPO).parts[-2]
    if kind == "sweeps":  # load_spec also loads every member's config
        names = set(re.findall(r"\$\{(\w+)\}", path.read_text()))
        spec = load_spec(path, variables=tuple(f"{n}=set-by-test" for n in names))
        assert spec.grid
        return
    if kind == "profiles":
        cls: type = Profile
    elif kind == "pipeline":
        cls = PipelineConfig
    else:
        cls = next((c for name, c in RUN_CONFIGS.items() if name in path.stem), UNetRunConfig)
    cfg = configs.load(cls, path)
    # every value, the defaults included, goes through the checks again
    assert configs.from_dict(cls, configs.to_dict(cfg), source=str(path)) == cfg
