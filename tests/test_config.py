"""toolkit.config: YAML → frozen dataclasses, ``--set`` overrides, errors that name the key path, atomic dump."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from toolkit import config
from toolkit.config import ConfigError


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class Train:
    epochs: int
    amp: bool = False
    widths: tuple[int, ...] = (8, 16)
    optim: Optim = field(default_factory=Optim)
    mode: Literal["pgan", "spade", "unet"] = "unet"
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    name: str | None
    out: Path
    train: Train
    seed: int = 0
    resume: Optim | None = None


FULL = """\
name: demo
out: runs/demo
seed: 3
train:
  epochs: 10
  amp: true
  widths: [4, 8, 16]
  optim:
    lr: 2.0e-4
    betas: [0.5, 0.99]
  mode: pgan
  tags: [a, b]
  weights: {dice: 1.0, ce: 0.5}
"""


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    path = tmp_path / "demo.yaml"
    path.write_text(FULL)
    return path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def error(cls, path: Path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(cls, path, overrides)
    return str(info.value)


def test_nested_yaml_round_trips_through_to_dict(demo):
    cfg = config.load(Run, demo)
    assert cfg.train.optim == Optim(lr=2e-4, betas=(0.5, 0.99))
    assert cfg.out == Path("runs/demo") and cfg.train.widths == (4, 8, 16) and cfg.train.mode == "pgan"
    assert cfg.resume is None and cfg.train.weights == {"dice": 1.0, "ce": 0.5}
    plain = config.to_dict(cfg)
    assert plain["out"] == "runs/demo" and plain["train"]["widths"] == [4, 8, 16]
    assert config.from_dict(Run, plain) == cfg
    assert config.to_dict(config.from_dict(Run, plain)) == plain


def test_defaults_fill_missing_optional_keys(tmp_path):
    cfg = config.load(Run, write(tmp_path, "name: x\nout: o\ntrain: {epochs: 1}\n"))
    assert cfg.train == Train(epochs=1) and cfg.seed == 0


def test_overrides_set_nested_keys_lists_floats_bools_and_null(demo):
    cfg = config.load(Run, demo, ["train.optim.lr=1e-4", "train.widths=[8,16]", "train.amp=false", "name=null",
                                  "seed=7", "train.weights.dice=2"])
    assert cfg.train.optim.lr == pytest.approx(1e-4) and isinstance(cfg.train.optim.lr, float)
    assert cfg.train.widths == (8, 16) and cfg.train.amp is False and cfg.name is None and cfg.seed == 7
    assert cfg.train.weights == {"dice": 2.0, "ce": 0.5}


def test_override_creates_an_absent_optional_section(demo):
    cfg = config.load(Run, demo, ["resume.lr=0.5"])
    assert cfg.resume == Optim(lr=0.5)


def test_float_field_accepts_yaml_1_1_exponent_without_dot(tmp_path):
    cfg = config.load(Optim, write(tmp_path, "lr: 1e-4\n"))
    assert cfg.lr == 1e-4
    assert "expected float, got 'fast'" in error(Optim, write(tmp_path, "lr: fast\n"))


def test_unknown_key_names_dotted_path_source_and_suggestion(demo):
    demo.write_text(FULL.replace("    lr:", "    lrr:"))
    assert error(Run, demo) == f"{demo}: unknown key 'train.optim.lrr' (did you mean 'train.optim.lr'?)"


def test_override_typo_is_reported_as_coming_from_set(demo):
    message = error(Run, demo, ["train.epochz=3"])
    assert message.startswith("--set: unknown key 'train.epochz'") and "did you mean 'train.epochs'" in message
    assert error(Run, demo, ["train.epochs=ten"]) == "--set: train.epochs: expected int, got 'ten'"
    assert "expected key.path=value" in error(Run, demo, ["train.epochs"])


@pytest.mark.parametrize(("line", "message"), [
    ("epochs: ten", "train.epochs: expected int, got 'ten'"),
    ("epochs: [1, 2]", "train.epochs: expected int, got [1, 2]"),
    ("epochs: 1.5", "train.epochs: expected int, got 1.5"),
    ("epochs: true", "train.epochs: expected int, got True"),
    ("epochs: 1\n  amp: 1", "train.amp: expected bool, got 1"),
    ("epochs: 1\n  amp: 'yes'", "train.amp: expected bool, got 'yes'"),
    ("epochs: 1\n  widths: [1, x]", "train.widths[1]: expected int, got 'x'"),
    ("epochs: 1\n  widths: 4", "train.widths: expected tuple[int, ...], got 4"),
    ("epochs: 1\n  mode: gan", "train.mode: expected Literal['pgan', 'spade', 'unet'], got 'gan'"),
    ("epochs: 1\n  optim: {betas: [0.5]}", "train.optim.betas: expected tuple[float, float], got [0.5]"),
    ("epochs: 1\n  weights: {dice: x}", "train.weights.dice: expected float, got 'x'"),
])
def test_wrong_types_name_path_expected_type_and_value(tmp_path, line, message):
    path = write(tmp_path, f"name: x\nout: o\ntrain:\n  {line}\n")
    assert error(Run, path) == f"{path}: {message}"


def test_missing_required_field_names_its_path(tmp_path):
    path = write(tmp_path, "name: x\nout: o\ntrain: {amp: true}\n")
    assert error(Run, path) == f"{path}: missing required key 'train.epochs'"


def test_tuple_of_ints_comes_from_a_yaml_list(tmp_path):
    cfg = config.load(Train, write(tmp_path, "epochs: 1\nwidths: [2, 4, 8, 16]\n"))
    assert cfg.widths == (2, 4, 8, 16) and isinstance(cfg.widths, tuple)


def test_configs_are_frozen(demo):
    cfg = config.load(Run, demo)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]


def test_dump_writes_yaml_that_loads_back_equal(demo, tmp_path):
    cfg = config.load(Run, demo, ["train.optim.lr=1e-10", "resume.lr=3"])
    out = tmp_path / "run" / "config.yaml"
    config.dump(cfg, out)
    assert config.load(Run, out) == cfg
    assert not [p for p in out.parent.iterdir() if p.name != "config.yaml"]  # no temporary left behind


def test_python_yaml_tags_are_refused(tmp_path):
    path = write(tmp_path, "name: !!python/object/apply:os.system ['echo pwned']\nout: o\ntrain: {epochs: 1}\n")
    assert "python/object" in error(Run, path)


def test_unreadable_or_non_mapping_files_are_config_errors(tmp_path):
    assert "cannot read config" in error(Run, tmp_path / "absent.yaml")
    assert "expected a mapping at the top level" in error(Run, write(tmp_path, "- 1\n- 2\n"))


def test_from_dict_and_apply_overrides_work_on_plain_dicts():
    data = {"epochs": 2}
    changed = config.apply_overrides(data, ["optim.lr=0.1"])
    assert data == {"epochs": 2} and changed == {"epochs": 2, "optim": {"lr": 0.1}}
    assert config.from_dict(Train, changed).optim.lr == 0.1
    with pytest.raises(ConfigError, match=r"^<dict>: unknown key 'epoch'"):
        config.from_dict(Train, {"epoch": 2})
