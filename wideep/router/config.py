"""EndpointPickerConfig (llm-d.ai/v1alpha1 or inference.networking.x-k8s.io/v1alpha1) -> live plugins.

Defaults follow llm-d's EndpointPickerConfig: no profiles -> one `default` profile with every filter, scorer and
picker; one profile -> single-profile-handler; no picker -> max-score-picker (1 endpoint);
token-producer (estimate) and inflight-load-producer are injected when not listed; pre-request,
producer and response plugins are wired just by being listed.

wideep extensions (optional top-level keys, ignored by llm-d's loader is NOT assumed, so they are
separate from `plugins`): `flowControl` and `saturationDetector` (see flow_control.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from wideep.router import framework as fw
from wideep.router.registry import ConfigError, Plugin, PluginParams, create, parse_params

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
TOP_KEYS = {"apiVersion", "kind", "featureGates", "plugins", "schedulingProfiles", "dataLayer",
            "flowControl", "saturationDetector", "data"}


@dataclass
class SaturationParams(PluginParams):
    queue_depth_threshold: int = 5
    kv_cache_util_threshold: float = 0.8


@dataclass
class FlowControlParams(PluginParams):
    max_queue_size: int = 128             # requests waiting per pool before 429
    queue_timeout_s: float = 30.0         # a queued request gives up with 429 after this
    max_inflight_per_endpoint: int = 0    # router-side cap (0 = metrics-based saturation only)

    def validate(self):
        if self.max_queue_size < 0 or self.queue_timeout_s <= 0 or self.max_inflight_per_endpoint < 0:
            raise ValueError("maxQueueSize >= 0, queueTimeoutS > 0, maxInflightPerEndpoint >= 0 required")


@dataclass
class PickerConfig:
    plugins: dict[str, Plugin]
    handler: fw.ProfileHandler
    profiles: dict[str, fw.Profile]
    producers: list[fw.DataProducer]
    screeners: list[fw.Screener]
    pre_request: list[fw.PreRequest]
    response_hooks: list[fw.ResponseHooks]
    feature_gates: list[str] = field(default_factory=list)
    flow_control: FlowControlParams = field(default_factory=FlowControlParams)
    saturation: SaturationParams = field(default_factory=SaturationParams)
    source: str = ""

    @property
    def flow_control_enabled(self) -> bool:
        return "flowControl" in self.feature_gates

    def scheduler(self) -> fw.Scheduler:
        return fw.Scheduler(self.handler, self.profiles)


def default_config_text() -> str:
    return resources.files("wideep.router").joinpath("configs/wide-ep-lws.yaml").read_text()


def load_config_file(path: str | Path) -> PickerConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"--config {p}: file not found")
    return load_config_text(p.read_text(), source=str(p))


def load_config_text(text: str, source: str = "<config-text>") -> PickerConfig:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected an EndpointPickerConfig mapping")
    try:
        cfg = build(doc)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    cfg.source = source
    return cfg


def _list(doc: dict, key: str) -> list:
    v = doc.get(key) or []
    if not isinstance(v, list):
        raise ConfigError(f"{key} must be a list")
    return v


def build(doc: dict[str, Any]) -> PickerConfig:
    api = doc.get("apiVersion", API_VERSIONS[0])
    if api not in API_VERSIONS:
        raise ConfigError(f"apiVersion {api!r} is not supported; use one of {', '.join(API_VERSIONS)}")
    if doc.get("kind", "EndpointPickerConfig") != "EndpointPickerConfig":
        raise ConfigError(f"kind {doc.get('kind')!r}: expected EndpointPickerConfig")
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise ConfigError(f"unknown top-level key(s) {sorted(unknown)}; known: {sorted(TOP_KEYS)}")

    plugins: dict[str, Plugin] = {}
    for i, spec in enumerate(_list(doc, "plugins")):
        if not isinstance(spec, dict) or "type" not in spec:
            raise ConfigError(f"plugins[{i}]: needs a 'type'")
        bad = set(spec) - {"name", "type", "parameters"}
        if bad:
            raise ConfigError(f"plugins[{i}]: unknown key(s) {sorted(bad)}; use name, type, parameters")
        name = spec.get("name") or spec["type"]
        if name in plugins:
            raise ConfigError(f"plugins[{i}]: duplicate plugin name {name!r}")
        plugins[name] = create(spec["type"], name, spec.get("parameters"))

    # injected producers
    if not any(p.type_name == "token-producer" for p in plugins.values()):
        plugins = {"token-producer": create("token-producer", "token-producer", None), **plugins}
    if not any(p.type_name == "inflight-load-producer" for p in plugins.values()):
        plugins["inflight-load-producer"] = create("inflight-load-producer", "inflight-load-producer", None)

    profiles = _build_profiles(_list(doc, "schedulingProfiles"), plugins)

    handlers = [p for p in plugins.values() if isinstance(p, fw.ProfileHandler)]
    if len(handlers) > 1:
        raise ConfigError(f"more than one profile handler: {', '.join(p.name for p in handlers)}")
    if handlers:
        handler = handlers[0]
    elif len(profiles) == 1:
        handler = create("single-profile-handler", "single-profile-handler", None)
        plugins[handler.name] = handler
    else:
        raise ConfigError(f"{len(profiles)} scheduling profiles need a profile handler plugin "
                          "(e.g. disagg-profile-handler)")
    for p in plugins.values():
        p.wire(plugins)

    producers = [p for p in plugins.values() if isinstance(p, fw.DataProducer)]
    producers.sort(key=lambda p: 0 if p.type_name == "token-producer" else 1)
    feature_gates = _list(doc, "featureGates")
    return PickerConfig(
        plugins=plugins, handler=handler, profiles=profiles, producers=producers,
        screeners=[p for p in plugins.values() if isinstance(p, fw.Screener)],
        pre_request=[p for p in plugins.values() if isinstance(p, fw.PreRequest)],
        response_hooks=[p for p in plugins.values() if isinstance(p, fw.ResponseHooks)],
        feature_gates=[str(g) for g in feature_gates],
        flow_control=parse_params(FlowControlParams, doc.get("flowControl"), "flowControl"),
        saturation=parse_params(SaturationParams, doc.get("saturationDetector"), "saturationDetector"),
    )


def _default_picker() -> fw.Picker:
    return create("max-score-picker", "max-score-picker", {"maxNumOfEndpoints": 1})  # type: ignore[return-value]


def _build_profiles(specs: list, plugins: dict[str, Plugin]) -> dict[str, fw.Profile]:
    if not specs:
        prof = fw.Profile("default")
        for p in plugins.values():
            if isinstance(p, fw.Filter):
                prof.filters.append(p)
            elif isinstance(p, fw.Scorer):
                prof.scorers.append(fw.ScoredPlugin(p, 1.0))
            elif isinstance(p, fw.Picker) and prof.picker is None:
                prof.picker = p
        prof.picker = prof.picker or _default_picker()
        return {"default": prof}
    profiles: dict[str, fw.Profile] = {}
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict) or not spec.get("name"):
            raise ConfigError(f"schedulingProfiles[{i}]: needs a 'name'")
        name = spec["name"]
        if name in profiles:
            raise ConfigError(f"schedulingProfiles[{i}]: duplicate profile name {name!r}")
        prof = fw.Profile(name)
        for j, ref in enumerate(spec.get("plugins") or []):
            where = f"schedulingProfiles[{name}].plugins[{j}]"
            if not isinstance(ref, dict) or "pluginRef" not in ref:
                raise ConfigError(f"{where}: needs a 'pluginRef'")
            plugin = plugins.get(ref["pluginRef"])
            if plugin is None:
                raise ConfigError(f"{where}: pluginRef {ref['pluginRef']!r} names no plugin in 'plugins'")
            weight = ref.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"{where}: weight must be a number >= 0, got {weight!r}")
            if isinstance(plugin, fw.Filter):
                prof.filters.append(plugin)
            elif isinstance(plugin, fw.Scorer):
                prof.scorers.append(fw.ScoredPlugin(plugin, float(weight)))
            elif isinstance(plugin, fw.Picker):
                if prof.picker is not None:
                    raise ConfigError(f"{where}: profile {name!r} has two pickers")
                prof.picker = plugin
            else:
                raise ConfigError(f"{where}: plugin {plugin.name!r} ({plugin.type_name}) is not a filter, "
                                  "scorer or picker; list it under 'plugins' only")
        prof.picker = prof.picker or _default_picker()
        profiles[name] = prof
    return profiles
