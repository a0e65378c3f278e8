"""Profile handlers: which profiles run for a request, and which result is primary."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from wideep.router.framework import PDDecider, PreRequest, ProfileHandler, profile_failed
from wideep.router.registry import ConfigError, Plugin, PluginParams, register
from wideep.router.types import SchedulingResult

log = logging.getLogger(__name__)

PREFILLER_HEADER = "x-prefiller-host-port"


@register("single-profile-handler")
class SingleProfileHandler(ProfileHandler):
    """Runs the one profile; an empty result is a 429 (ResourceExhausted in llm-d)."""

    def pick(self, req, profiles, results):
        if results:
            return {}
        return dict(profiles)

    def process_results(self, req, results):
        name = next(iter(results))
        if results[name] is None:
            raise profile_failed(name)
        return SchedulingResult(primary_profile=name, profile_results=results)


@dataclass
class DisaggParams(PluginParams):
    profiles: dict = field(default_factory=dict)   # {decode: name, prefill: name, encode: name}
    deciders: dict = field(default_factory=dict)   # {prefill: decider plugin name}
    stage_order: str = "decode-first"

    def validate(self):
        bad = set(self.profiles) - {"decode", "prefill", "encode"}
        if bad:
            raise ValueError(f"profiles: unknown stage(s) {sorted(bad)}; use decode, prefill, encode")
        bad = set(self.deciders) - {"prefill", "encode"}
        if bad:
            raise ValueError(f"deciders: unknown stage(s) {sorted(bad)}; use prefill, encode")
        if self.stage_order != "decode-first":
            raise ValueError(f"stageOrder {self.stage_order!r} is not supported; use decode-first")


@register("disagg-profile-handler")
class DisaggProfileHandler(ProfileHandler, PreRequest):
    """Decode first (primary); then the prefill profile if the decider says the prompt is worth
    disaggregating given what the chosen decode endpoint already caches. Sets x-prefiller-host-port."""

    Params = DisaggParams

    def __init__(self, name, params):
        super().__init__(name, params)
        self.decode_profile = params.profiles.get("decode", "decode")
        self.prefill_profile = params.profiles.get("prefill", "prefill")
        self.decider = None
        self.fallbacks = 0   # prefill profile found nothing: served decode-only (counted, logged)

    def wire(self, plugins: dict[str, Plugin]) -> None:
        ref = self.params.deciders.get("prefill")
        if ref is not None:
            dec = plugins.get(ref)
            if not isinstance(dec, PDDecider):
                raise ConfigError(f"plugin {self.name!r}: deciders.prefill {ref!r} is not a configured decider plugin")
            self.decider = dec

    def pick(self, req, profiles, results):
        if self.decode_profile not in profiles:
            raise ConfigError(f"plugin {self.name!r}: no scheduling profile named {self.decode_profile!r}")
        if self.decode_profile not in results:
            return {self.decode_profile: profiles[self.decode_profile]}
        decode = results[self.decode_profile]
        if decode is None or self.prefill_profile in results or self.prefill_profile not in profiles:
            return {}
        if self.decider is not None and not self.decider.disaggregate(req, decode.targets[0]):
            return {}
        return {self.prefill_profile: profiles[self.prefill_profile]}

    def process_results(self, req, results):
        if results.get(self.decode_profile) is None:
            raise profile_failed(self.decode_profile)
        if self.prefill_profile in results and results[self.prefill_profile] is None:
            self.fallbacks += 1
            log.warning("request %s: prefill profile found no endpoint; serving decode-only", req.request_id)
            results = {k: v for k, v in results.items() if k != self.prefill_profile}
        return SchedulingResult(primary_profile=self.decode_profile, profile_results=results)

    def pre_request(self, req, result, headers):
        pre = result.profile_results.get(self.prefill_profile)
        if pre is not None and pre.targets:
            headers[PREFILLER_HEADER] = pre.targets[0].address
