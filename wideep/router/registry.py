"""Typed plugin registry: `type` name in the config -> plugin class with a parameters dataclass.

Parameters arrive in llm-d's camelCase (`blockSizeTokens`); each plugin declares a `Params`
dataclass in snake_case and the registry converts, type-checks and rejects unknown keys, so a
typo fails at start-up with the plugin's name in the message.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Callable

from wideep.errors import ConfigError
from wideep.typed_config import coerce

__all__ = ["ConfigError", "Plugin", "PluginParams", "create", "parse_params", "register"]


@dataclasses.dataclass
class PluginParams:
    """Base of every plugin's parameters dataclass; validate() checks cross-field rules (ValueError)."""

    def validate(self) -> None:
        pass


NoParams = PluginParams


class Plugin:
    """Base of every plugin. A plugin may play several roles (scorer + pre-request + producer)."""

    type_name: str = ""
    Params: type = NoParams

    def __init__(self, name: str, params: Any):
        self.name = name
        self.params = params

    def wire(self, plugins: dict[str, "Plugin"]) -> None:
        """Called once all plugins exist, to find collaborators (e.g. a producer a scorer reads)."""

    async def start(self, ctx: Any) -> None:
        """Start background work (ZMQ subscribers); called inside the router's event loop with the
        router context (`ctx.datastore` lists the endpoints)."""

    async def stop(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


REGISTRY: dict[str, type[Plugin]] = {}


def register(type_name: str) -> Callable[[type[Plugin]], type[Plugin]]:
    def deco(cls: type[Plugin]) -> type[Plugin]:
        if type_name in REGISTRY:
            raise RuntimeError(f"plugin type {type_name} registered twice")
        REGISTRY[type_name] = cls
        cls.type_name = type_name
        return cls
    return deco


def snake(name: str) -> str:
    """camelCase -> snake_case, acronyms kept whole: maxTTFTPenaltyMs -> max_ttft_penalty_ms."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def parse_params(cls: type, raw: dict[str, Any] | None, where: str) -> Any:
    """The plugin's Params from llm-d's camelCase mapping, by wideep's typed-config rules."""
    raw = raw or {}
    path = where
    if not isinstance(raw, dict):
        raise ConfigError(path, f"must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        fname = snake(key)
        if fname not in fields:
            known = ", ".join(camel(f) for f in fields) or "none"
            raise ConfigError(path, f"unknown parameter {key!r} (known: {known})")
        kwargs[fname] = coerce(hints[fname], value, f"{path}.{key}")
    params = cls(**kwargs)
    try:
        params.validate()
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return params


def create(type_name: str, name: str, raw_params: dict[str, Any] | None) -> Plugin:
    _load_builtin_plugins()
    cls = REGISTRY.get(type_name)
    where = f"plugin {name!r} (type {type_name})"
    if cls is None:
        raise ConfigError(f"plugin {name!r}: unknown type {type_name!r}; known types: {', '.join(sorted(REGISTRY))}")
    params = parse_params(cls.Params, raw_params, where)
    try:
        return cls(name, params)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _load_builtin_plugins() -> None:
    from wideep.router.plugins import load_all

    load_all()
