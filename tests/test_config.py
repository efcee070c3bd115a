"""toolkit.config: YAML → frozen dataclasses, ``--set`` overrides, errors that name the key path, atomic dump."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

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


# --- bounds (config.Range), finite floats, repeated keys ---


@dataclass(frozen=True)
class Bounded:
    batch: config.PositiveInt = 8
    n: config.NonNegativeInt | None = None
    widths: tuple[config.PositiveInt, ...] = (8,)
    lr: config.PositiveFloat = 1e-3
    beta: config.Decay = 0.9
    cut: config.Threshold = 1.0
    weights: dict[str, config.NonNegativeFloat] = field(default_factory=dict)
    scale: float = 1.0
    optim: Optim = field(default_factory=Optim)


@pytest.mark.parametrize(("line", "message"), [
    ("batch: 0", "batch: expected an int ≥ 1, got 0"),
    ("batch: -8", "batch: expected an int ≥ 1, got -8"),
    ("batch: ten", "batch: expected an int ≥ 1, got 'ten'"),
    ("batch: 2.0", "batch: expected an int ≥ 1, got 2.0"),
    ("n: -5", "n: expected an int ≥ 0, got -5"),
    ("widths: [8, 0]", "widths[1]: expected an int ≥ 1, got 0"),
    ("widths: 8", "widths: expected tuple[int ≥ 1, ...], got 8"),
    ("lr: 0", "lr: expected a float > 0, got 0"),
    ("lr: .nan", "lr: expected a float > 0, got nan"),
    ("beta: 1.0", "beta: expected a float in [0, 1), got 1.0"),
    ("cut: -1", "cut: expected a float ≥ 0 or infinity, got -1"),
    ("cut: .nan", "cut: expected a float ≥ 0 or infinity, got nan"),
    ("cut: -.inf", "cut: expected a float ≥ 0 or infinity, got -inf"),
    ("weights: {dice: -1}", "weights.dice: expected a float ≥ 0, got -1"),
])
def test_out_of_range_values_name_source_path_bounds_and_value(tmp_path, line, message):
    path = write(tmp_path, line + "\n")
    assert error(Bounded, path) == f"{path}: {message}"


@pytest.mark.parametrize(("key", "text", "value"), [
    ("batch", "1", 1), ("n", "0", 0), ("n", "null", None), ("lr", "1e-12", 1e-12), ("beta", "0", 0.0),
    ("cut", "0", 0.0), ("cut", ".inf", float("inf")), ("weights", "{dice: 0}", {"dice": 0.0}),
])
def test_bounds_admit_their_edges_none_and_opted_in_infinity(tmp_path, key, text, value):
    assert getattr(config.load(Bounded, write(tmp_path, f"{key}: {text}\n")), key) == value


def test_defaults_written_out_load_back_within_their_bounds(tmp_path):
    config.dump(Bounded(), tmp_path / "c.yaml")
    assert config.load(Bounded, tmp_path / "c.yaml") == Bounded()


@pytest.mark.parametrize("text", [".nan", ".NaN", ".inf", "-.inf", "1e400"])
def test_non_finite_floats_are_refused_in_plain_float_fields(tmp_path, text):
    for line, key in ((f"scale: {text}", "scale"), (f"optim: {{betas: [0.5, {text}]}}", "optim.betas[1]")):
        message = error(Bounded, write(tmp_path, line + "\n"))
        assert f": {key}: expected a finite float, got " in message


def test_nan_spelled_as_a_word_is_not_a_float(tmp_path):
    assert error(Bounded, write(tmp_path, "scale: nan\n")).endswith("scale: expected float, got 'nan'")


def test_out_of_range_override_is_blamed_on_its_source(tmp_path):
    path = write(tmp_path, "batch: 4\n")
    assert error(Bounded, path, ["batch=0"]) == "--set: batch: expected an int ≥ 1, got 0"
    assert error(Bounded, path, ["lr=.nan"]) == "--set: lr: expected a float > 0, got nan"
    with pytest.raises(ConfigError) as info:
        config.load(Bounded, path, ["n=-1"], overrides_source="sweep.yaml: member a")
    assert str(info.value) == "sweep.yaml: member a: n: expected an int ≥ 0, got -1"
    assert config.load(Bounded, path, ["cut=.inf", "n=3"]).cut == float("inf")


@pytest.mark.parametrize(("bounds", "base", "words"), [
    (config.Range(ge=1), int, "an int ≥ 1"),
    (config.Range(gt=0), float, "a float > 0"),
    (config.Range(le=5), int, "an int ≤ 5"),
    (config.Range(ge=0.5), float, "a float ≥ 0.5"),
    (config.Range(ge=0, lt=1), float, "a float in [0, 1)"),
    (config.Range(gt=0, le=1), float, "a float in (0, 1]"),
    (config.Range(ge=0, inf=True), float, "a float ≥ 0 or infinity"),
])
def test_range_describes_its_bounds(bounds, base, words):
    assert bounds.describe(base) == words


def test_range_on_a_non_number_is_an_unsupported_annotation():
    @dataclass(frozen=True)
    class Odd:
        name: Annotated[str, config.Range(ge=1)] = "x"

    with pytest.raises(ConfigError, match="unsupported annotation"):
        config.from_dict(Odd, {"name": "y"})


@pytest.mark.parametrize(("tp", "text", "result"), [
    (config.PositiveInt, "3", 3),
    (config.Threshold, "inf", float("inf")),
    (config.NonNegativeFloat, "0", 0.0),
    (float, "2.5", 2.5),
])
def test_parse_number_reads_command_line_values(tp, text, result):
    value = config.parse_number(tp, text)
    assert value == result and type(value) is type(result)


@pytest.mark.parametrize(("tp", "text", "message"), [
    (config.PositiveInt, "0", "expected an int ≥ 1, got 0"),
    (config.PositiveInt, "1.5", "expected an int ≥ 1, got '1.5'"),
    (config.Threshold, "nan", "expected a float ≥ 0 or infinity, got nan"),
    (config.Threshold, "-1", "expected a float ≥ 0 or infinity, got -1"),
    (float, "nan", "expected a finite float, got nan"),
    (float, "1e400", "expected a finite float, got inf"),
])
def test_parse_number_refuses_out_of_range_and_non_finite_values(tp, text, message):
    with pytest.raises(ConfigError) as info:
        config.parse_number(tp, text)
    assert str(info.value) == message


def test_repeated_key_is_refused_naming_file_line_and_key(tmp_path):
    path = write(tmp_path, "name: x\nout: o\ntrain:\n  epochs: 1\n  amp: true\n  epochs: 2\n")
    assert error(Run, path) == f"{path}: not valid YAML: line 6: duplicate key 'epochs' (first given on line 4)"
    path = write(tmp_path, "seed: 1\nname: x\nseed: 1\nout: o\ntrain: {epochs: 1}\n")  # even with an equal value
    assert error(Run, path) == f"{path}: not valid YAML: line 3: duplicate key 'seed' (first given on line 1)"


def test_one_key_in_different_mappings_is_not_a_repeat(tmp_path):
    cfg = config.load(Run, write(tmp_path, "name: x\nout: o\ntrain: {epochs: 1, optim: {lr: 1}}\nresume: {lr: 2}\n"))
    assert cfg.train.optim.lr == 1.0 and cfg.resume.lr == 2.0


def test_repeated_keys_are_found_at_any_depth_and_in_lists():
    for text, line in (("a:\n  - {x: 1}\n  - {x: 1, y: 2, x: 3}\n", 3), ("a: {b: {c: 1,\n  c: 2}}\n", 2)):
        with pytest.raises(ConfigError, match=rf"^src: not valid YAML: line {line}: duplicate key 'x|c'"):
            config.safe_load_text(text, "src")


def test_merged_keys_may_be_overridden_by_the_mapping_itself():
    doc = config.safe_load_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", "src")
    assert doc["other"] == {"x": 3, "y": 2}


def test_repeated_key_in_an_override_value_is_refused(demo):
    message = error(Run, demo, ["train.weights={dice: 1, dice: 2}"])
    assert message.startswith("--set train.weights={dice: 1, dice: 2}: value is not valid YAML") and \
        "duplicate key 'dice'" in message


def test_the_unique_key_loader_is_still_a_safe_loader():
    with pytest.raises(ConfigError, match=r"^src: not valid YAML: .*python/object"):
        config.safe_load_text("x: !!python/object/apply:os.system ['true']\n", "src")
