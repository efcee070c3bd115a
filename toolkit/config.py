"""Typed, frozen dataclass configs from YAML: loading, ``--set a.b=v`` overrides, validation and saving.

Only the generic machinery lives here; each trainer defines its own frozen (module-level) dataclasses and calls
:func:`load`. YAML is read with ``yaml.safe_load`` alone, so python tags are refused. Every value is checked against its
field's annotation; every error is a :class:`ConfigError` naming the source and the key's dotted path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from toolkit.atomic import write_bytes

T = TypeVar("T")

# PyYAML follows YAML 1.1, which reads ``1e-4`` (no dot) as a string; float fields accept such numerals.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config file, override or mapping that does not fit its dataclass."""


def load(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read the YAML file at ``path``, apply ``--set``-style ``overrides`` (``a.b=v``) and build ``cls``."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:  # a ``!!python/...`` tag is a YAMLError under safe_load
        raise ConfigError(f"{path}: cannot read config: {exc}") from exc
    if not isinstance(data, (Mapping, type(None))):  # an empty file is an empty mapping
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_show(data)}")
    return from_dict(cls, apply_overrides(data or {}, overrides, cls=cls), source=str(path))


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
            value = yaml.safe_load(text)
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
    where = f"{source}: {path}: " if path else f"{source}: "
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def wrong() -> ConfigError:
        return ConfigError(f"{where}expected {_name(tp)}, got {_show(value)}")

    if tp is Any:
        return value
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
        return float(value)
    if tp is Path and isinstance(value, (str, Path)):
        return Path(value)
    if tp in (bool, int, str, float, Path):
        raise wrong()
    raise ConfigError(f"{where}unsupported annotation {_name(tp)}")


def _build(cls: type, data: Mapping[str, Any], path: str, source: str) -> Any:
    """Construct dataclass ``cls`` from a mapping: reject unknown keys, require fields without defaults."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
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
        tp = typing.get_type_hints(classes[0])[key]
    _convert(tp, value, ".".join(keys), source)


def _unknown(source: str, path: str, key: str, names: typing.Iterable[str]) -> ConfigError:
    close = difflib.get_close_matches(key, list(names), n=1)
    hint = f" (did you mean {_join(path, close[0])!r}?)" if close else ""
    return ConfigError(f"{source}: unknown key {_join(path, key)!r}{hint}")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
