"""Typed, frozen dataclass configs from YAML: loading, ``--set a.b=v`` overrides, validation and saving.

Only the generic machinery lives here; each trainer defines its own frozen (module-level) dataclasses and calls
:func:`load`. YAML is read with :class:`UniqueKeyLoader`: ``yaml.SafeLoader`` (so python tags are refused) that
also refuses a repeated key. Every value is checked against its field's annotation; every error is a
:class:`ConfigError` naming the source and the key's dotted path.

Bounds are part of the annotation: ``batch: PositiveInt`` (``Annotated[int, Range(ge=1)]``); see :class:`Range` and
the aliases below. A float field refuses NaN and ±infinity unless its Range says ``inf=True`` (NaN never passes).
Modules declaring such fields import the aliases at run time (not under ``TYPE_CHECKING``): the loader evaluates the
annotations with ``typing.get_type_hints(..., include_extras=True)``, which needs the names and keeps ``Annotated``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml

from toolkit.atomic import write_bytes

T = TypeVar("T")

# PyYAML follows YAML 1.1, which reads ``1e-4`` (no dot) as a string; float fields accept such numerals.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config file, override or mapping that does not fit its dataclass."""


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of an int or float field, checked whenever a value is loaded: ``Annotated[int, Range(ge=1)]``.

    ``ge``/``gt`` bound from below, ``le``/``lt`` from above (inclusive / exclusive). ``inf`` lets a float field also
    take infinity within those bounds (``.inf`` in YAML, ``inf`` on a command line); NaN never passes.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    inf: bool = False

    def admits(self, number: float) -> bool:
        """Whether ``number`` lies within the bounds (finiteness is the converter's check)."""
        return ((self.ge is None or number >= self.ge) and (self.gt is None or number > self.gt)
                and (self.le is None or number <= self.le) and (self.lt is None or number < self.lt))

    def describe(self, base: type, article: bool = True) -> str:
        """What a valid value is, in words: ``an int ≥ 1``, ``a float in [0, 1)``, ``a float ≥ 0 or infinity``."""
        kind = ("an " if base is int else "a ") * article + base.__name__
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:  # an interval: [0, 1), (0, 1], …
            text = f"{kind} in {'(' if self.ge is None else '['}{low:g}, {high:g}{')' if self.le is None else ']'}"
        else:
            ops = (("≥", self.ge), (">", self.gt), ("≤", self.le), ("<", self.lt))
            text = " ".join([kind, *(f"{op} {bound:g}" for op, bound in ops if bound is not None)])
        return text + " or infinity" * self.inf


PositiveInt = Annotated[int, Range(ge=1)]  # counts that must not be empty: batch, epochs, ranks, image sizes, …
NonNegativeInt = Annotated[int, Range(ge=0)]  # counts where 0 means none or off; seeds
PositiveFloat = Annotated[float, Range(gt=0)]  # learning rates, epsilons, memory, times
NonNegativeFloat = Annotated[float, Range(ge=0)]  # loss weights, floors; 0 means off
Decay = Annotated[float, Range(ge=0, lt=1)]  # Adam's betas, an EMA's decay
Threshold = Annotated[float, Range(ge=0, inf=True)]  # a cut-off on a non-negative score; infinity cuts nothing


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping that gives one key twice (``line`` is 1-based, of the repeat)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(None, None, f"duplicate key {key!r} (first given on line {first.line + 1})", again)
        self.key, self.line = key, again.line + 1

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}"


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping repeating a key, where PyYAML would keep the last value silently.

    Keys merged in with ``<<: *anchor`` may still be overridden by the mapping's own keys: that is what merging is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: SafeConstructor's own error names it
            if seen is not key_node:
                raise DuplicateKeyError(key, seen.start_mark, key_node.start_mark)
        return super().construct_mapping(node, deep)


def safe_load_text(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` with :class:`UniqueKeyLoader`; a YAML error is a :class:`ConfigError` naming
    ``source`` (and the line)."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except yaml.YAMLError as exc:  # a ``!!python/...`` tag too
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc


def load(cls: type[T], path: str | Path, overrides: Sequence[str] = (), *, overrides_source: str = "--set") -> T:
    """Read the YAML file at ``path``, apply ``--set``-style ``overrides`` (``a.b=v``) and build ``cls``.

    An error in an override is blamed on ``overrides_source`` (e.g. a sweep file and member), one in the file on it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    data = safe_load_text(text, str(path))
    if not isinstance(data, (Mapping, type(None))):  # an empty file is an empty mapping
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_show(data)}")
    return from_dict(cls, apply_overrides(data or {}, overrides, overrides_source, cls=cls), source=str(path))


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], source: str = "--set",
                    cls: type | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``a.b=v`` set (``v`` parsed as YAML; missing mappings created on the way).

    With ``cls``, each key path and value is first checked against it, so a typo is blamed on ``source``, not the file.
    """
    result = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        keys = key.strip().split(".")
        if not sep or not all(keys):
            raise ConfigError(f"{source}: expected key.path=value, got {item!r}")
        try:
            value = yaml.load(text, Loader=UniqueKeyLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source} {item}: value is not valid YAML: {exc}") from exc
        if cls is not None:
            _check_override(cls, keys, value, source)
        node = result
        for i, part in enumerate(keys[:-1]):
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise ConfigError(f"{source}: {'.'.join(keys[:i + 1])} is {_show(node[part])}, not a mapping")
            node = node[part]
        node[keys[-1]] = value
    return result


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build the dataclass ``cls`` from ``data``, recursively, converting and checking every value by its annotation."""
    return _convert(cls, data, "", source)


def parse_number(tp: Any, text: str) -> Any:
    """A command-line string as the int or float annotation ``tp`` (``PositiveInt``, ``Threshold``, ``float``…),
    checked like a config value of that type; a :class:`ConfigError` says what was expected."""
    base = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
    value: Any = text  # if no kind reads it: reported as not an int / float
    for kind in (int, float) if base is float else (int,):  # int first, so that the message shows -1, not -1.0
        with contextlib.suppress(ValueError):
            value = kind(text)
            break
    return _convert(tp, value, "", "")


def to_dict(config: Any) -> Any:
    """Plain YAML-safe data for a config: dataclasses → dicts, tuples → lists, paths → strings."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {key: to_dict(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(value) for value in config]
    return str(config) if isinstance(config, Path) else config


def dump(config: Any, path: str | Path) -> None:
    """Atomically write ``config`` as YAML that :func:`load` reads back to an equal config."""
    write_bytes(path, yaml.safe_dump(to_dict(config), sort_keys=False).encode())


def _convert(tp: Any, value: Any, path: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (lists → tuples, str → Path, …)."""
    where = "".join(f"{part}: " for part in (source, path) if part)
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong() -> ConfigError:
        expected = _range(tp).describe(args[0]) if origin is Annotated else _name(tp)
        return ConfigError(f"{where}expected {expected}, got {_show(value)}")

    if tp is Any:
        return value
    if origin is Annotated:
        bounds = _range(tp)
        if args[0] not in (int, float):
            raise ConfigError(f"{where}unsupported annotation {_name(tp)}: a Range bounds an int or a float")
        infinite = bounds.inf and isinstance(value, float) and math.isinf(value)
        try:
            number = value if infinite else _convert(args[0], value, path, source)
        except ConfigError:
            raise wrong() from None  # one message: the type and its bounds
        if not bounds.admits(number):
            raise wrong()
        return number
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path, source)
            except ConfigError:
                if len(args) == 2 and type(None) in args:  # plain ``X | None``: X's message is the clearer one
                    raise
        raise wrong()
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise wrong()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, (Mapping, tp)):
            raise wrong()
        return value if isinstance(value, tp) else _build(tp, value, path, source)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise wrong()
        fixed = origin is tuple and Ellipsis not in args  # tuple[A, B] rather than tuple[A, ...] or list[A]
        if fixed and len(value) != len(args):
            raise wrong()
        kinds = args if fixed else [args[0] if args else Any] * len(value)
        items = [_convert(k, v, f"{path}[{i}]", source) for i, (k, v) in enumerate(zip(kinds, value))]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong()
        key_type, item = args if args else (Any, Any)
        # keys are checked like values (int keys such as resolutions stay strict: no "4" for 4)
        return {_convert(key_type, k, path, source): _convert(item, v, _join(path, str(k)), source)
                for k, v in value.items()}
    if tp in (bool, int, str) and type(value) is tp:  # strict: no 0/1 for bools, no True or 1.0 for ints
        return value
    if tp is float and (type(value) in (int, float) or (isinstance(value, str) and _FLOAT.fullmatch(value.strip()))):
        if not math.isfinite(float(value)):  # .nan, .inf, or a numeral too large for a float
            raise ConfigError(f"{where}expected a finite float, got {_show(value)}")
        return float(value)
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if tp in (bool, int, str, float, Path):
        raise wrong()
    raise ConfigError(f"{where}unsupported annotation {_name(tp)}")


def _build(cls: type, data: Mapping[str, Any], path: str, source: str) -> Any:
    """Construct dataclass ``cls`` from a mapping: reject unknown keys, require fields without defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls, include_extras=True)  # keeps Annotated (the Range)
    for key in data:
        if key not in fields:
            raise _unknown(source, path, key, fields)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name), source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {_join(path, name)!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:  # e.g. a check in __post_init__
        raise ConfigError(f"{source}: {path or cls.__name__}: {exc}") from exc


def _check_override(cls: type, keys: list[str], value: Any, source: str) -> None:
    """Walk ``keys`` through the dataclass fields of ``cls``; check the value once the final field is reached."""
    tp: Any = cls
    for i, key in enumerate(keys):
        options = [tp, *typing.get_args(tp)] if typing.get_origin(tp) in (Union, types.UnionType) else [tp]
        classes = [c for c in options if dataclasses.is_dataclass(c)]
        if not classes:
            return  # below a dict/list/scalar: from_dict checks the rest
        fields = {f.name for f in dataclasses.fields(classes[0]) if f.init}
        if key not in fields:
            raise _unknown(source, ".".join(keys[:i]), key, fields)
        tp = typing.get_type_hints(classes[0], include_extras=True)[key]
    _convert(tp, value, ".".join(keys), source)


def _unknown(source: str, path: str, key: str, names: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f" (did you mean {_join(path, close[0])!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {_join(path, key)!r}{hint}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _range(tp: Any) -> Range:
    """The one :class:`Range` of an ``Annotated`` annotation."""
    bounds = [mark for mark in typing.get_args(tp)[1:] if isinstance(mark, Range)]
    if len(bounds) != 1:
        raise ConfigError(f"unsupported annotation {tp}: expected exactly one Range")
    return bounds[0]


def _name(tp: Any) -> str:
    """An annotation as the messages spell it: ``tuple[int ≥ 1, ...]``, ``Literal['a', 'b']``, ``float | None``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _range(tp).describe(args[0], article=False)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin in (Union, types.UnionType):
        return " | ".join(_name(a) for a in args)
    if origin is not None and args:
        return f"{origin.__name__}[{', '.join('...' if a is Ellipsis else _name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
