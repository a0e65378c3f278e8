"""One typed-config mechanism: a plain mapping (YAML, JSON, keyword arguments) becomes a dataclass.

Every surface that takes structured configuration uses `build` (deploy spec, bench workload, router
plugin parameters, engine arguments, KV transfer config), so they share one set of rules:
- an unknown field is an error naming its path;
- int: an integer, or a float with no fractional part (100.0); never a bool, never a string;
- float: any number but a bool;  bool: true/false only;
- str: any scalar (numbers keep their spelling, booleans become "true"/"false");
- X | None: None, or what X accepts;  Literal[...]: one of the listed values;
- list[T], dict[str, T]: each item by T's rule;  a nested dataclass: a mapping, built recursively.
Errors are ConfigError("path.to.field", "must be <type>, got <value>").
A dataclass may map alternative key spellings with a class attribute `ALIASES = {"alias": "field"}`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from wideep.errors import ConfigError

__all__ = ["ConfigError", "build", "coerce", "describe", "to_plain"]


def build(cls: type, data: Any, path: str = "") -> Any:
    """Instance of dataclass `cls` from mapping `data` (None: all defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", f"must be a mapping, got {_show(data)}")
    aliases = getattr(cls, "ALIASES", None) or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        where = f"{path}.{key}" if path else str(key)
        if name not in fields:
            raise ConfigError(where, f"unknown field: unknown key {key!r} (known: {', '.join(sorted(fields))})")
        kwargs[name] = coerce(hints[name], value, where)
    return cls(**kwargs)


def coerce(hint: Any, value: Any, path: str) -> Any:
    """`value` checked and converted to type `hint` (see the module docstring for the rules)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return build(hint, value, path)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce(option, value, path)
            except ConfigError as exc:
                if exc.field != path:  # the value had this option's shape and failed inside: say where
                    raise
                continue
        raise ConfigError(path, f"must be {describe(hint)}, got {_show(value)}")
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise ConfigError(path, f"must be {describe(hint)}, got {_show(value)}")
    if origin is list or hint is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"must be a list, got {_show(value)}")
        item = args[0] if args else Any
        return [coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {_show(value)}")
        item = args[1] if args else Any
        return {str(k): coerce(item, v, f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, f"must be {describe(bool)}, got {_show(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(path, f"must be {describe(int)}, got {_show(value)}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(path, f"must be {describe(float)}, got {_show(value)}")
    if hint is str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ConfigError(path, f"must be {describe(str)}, got {_show(value)}")
    return value


def describe(hint: Any) -> str:
    """What a value of type `hint` looks like, in words (for error messages)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) or origin is dict or hint is dict:
        return "a mapping"
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)]
        return " or ".join(words) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list or hint is list:
        return "a list"
    return {bool: "bool (true or false)", int: "int", float: "float", str: "str"}.get(hint, str(hint))


def to_plain(obj: Any) -> Any:
    """Dataclasses (nested) as plain dicts/lists, the inverse of `build` for YAML/JSON output."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
