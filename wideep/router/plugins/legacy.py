"""v0.5-era (llm-d-inference-scheduler v0.5) plugins, still accepted so old configs keep working.

* `pd-profile-handler{threshold, hashBlockSize, primaryPort}`: decode first, then prefill iff
  `(1 - hit%) * len(promptBytes) >= threshold` (threshold 0 = always), hit% being the share of
  the prompt's blocks the chosen decode endpoint caches per the configured prefix producer.
* `data-parallel-profile-handler{primaryPort}`: one profile; the request goes to the pod's primary
  port and `x-data-parallel-host-port` names the rank's own ip:port (the sidecar forwards there).
* `prefill-header-handler`, `disagg-headers-handler`: the PreRequest that sets x-prefiller-host-port.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from wideep.router.framework import PreRequest, ProfileHandler, profile_failed
from wideep.router.plugins.prefix import prefix_fractions
from wideep.router.plugins.profile_handlers import PREFILLER_HEADER
from wideep.router.registry import ConfigError, PluginParams, register
from wideep.router.types import SchedulingResult

log = logging.getLogger(__name__)

DATA_PARALLEL_HEADER = "x-data-parallel-host-port"


def _primary_port_override(result: SchedulingResult, primary_port: int) -> None:
    if primary_port:
        result.destination_override = f"{result.target.host}:{primary_port}"


def _set_dp_header(result: SchedulingResult, primary_port: int, headers: dict[str, str]) -> None:
    if primary_port:
        headers[DATA_PARALLEL_HEADER] = result.target.address


def _check_port(p: int) -> None:
    if not 0 <= p <= 65535:
        raise ValueError("primaryPort must be a TCP port (0 = off)")


@dataclass
class PDParams(PluginParams):
    threshold: int = 0              # bytes of uncached prompt that make a prefill leg worth it
    hash_block_size: int = 16       # v0.5's prefix block size; the prefix producer's own size is used
    primary_port: int = 0
    decode_profile: str = "decode"
    prefill_profile: str = "prefill"

    def validate(self):
        if self.threshold < 0:
            raise ValueError("threshold must be >= 0")
        if self.hash_block_size < 1:
            raise ValueError("hashBlockSize must be >= 1")
        _check_port(self.primary_port)


@register("pd-profile-handler")
class PDProfileHandler(ProfileHandler, PreRequest):
    """Deprecated v0.5 P/D handler (see module docstring); decode is primary."""

    Params = PDParams

    def __init__(self, name, params):
        super().__init__(name, params)
        self.fallbacks = 0

    def wants_prefill(self, req, decode_name: str) -> bool:
        hit = (prefix_fractions(req) or {}).get(decode_name, 0.0)
        return (1.0 - min(1.0, hit)) * len(req.prompt_bytes) >= self.params.threshold

    def pick(self, req, profiles, results):
        dp, pp = self.params.decode_profile, self.params.prefill_profile
        if dp not in profiles:
            raise ConfigError(f"plugin {self.name!r}: no scheduling profile named {dp!r}")
        if dp not in results:
            return {dp: profiles[dp]}
        decode = results[dp]
        if decode is None or pp in results or pp not in profiles:
            return {}
        if not self.wants_prefill(req, decode.targets[0].name):
            return {}
        return {pp: profiles[pp]}

    def process_results(self, req, results):
        dp, pp = self.params.decode_profile, self.params.prefill_profile
        if results.get(dp) is None:
            raise profile_failed(dp)
        if pp in results and results[pp] is None:
            self.fallbacks += 1
            log.warning("request %s: prefill profile found no endpoint; serving decode-only", req.request_id)
            results = {k: v for k, v in results.items() if k != pp}
        res = SchedulingResult(primary_profile=dp, profile_results=results)
        _primary_port_override(res, self.params.primary_port)
        return res

    def pre_request(self, req, result, headers):
        pre = result.profile_results.get(self.params.prefill_profile)
        if pre is not None and pre.targets:
            headers[PREFILLER_HEADER] = pre.targets[0].address
        _set_dp_header(result, self.params.primary_port, headers)


@dataclass
class DPParams(PluginParams):
    primary_port: int = 8000

    def validate(self):
        _check_port(self.primary_port)


@register("data-parallel-profile-handler")
class DataParallelProfileHandler(ProfileHandler, PreRequest):
    """Deprecated v0.5 handler for one profile over DP ranks behind one pod port (see module docstring)."""

    Params = DPParams

    def pick(self, req, profiles, results):
        if len(profiles) != 1:
            raise ConfigError(f"plugin {self.name!r}: data-parallel-profile-handler needs exactly one "
                              f"scheduling profile, got {len(profiles)}")
        return {} if results else dict(profiles)

    def process_results(self, req, results):
        name = next(iter(results))
        if results[name] is None:
            raise profile_failed(name)
        res = SchedulingResult(primary_profile=name, profile_results=results)
        _primary_port_override(res, self.params.primary_port)
        return res

    def pre_request(self, req, result, headers):
        _set_dp_header(result, self.params.primary_port, headers)


@dataclass
class PrefillHeaderParams(PluginParams):
    prefill_profile: str = "prefill"


@register("prefill-header-handler")
class PrefillHeaderHandler(PreRequest):
    """Sets x-prefiller-host-port from the prefill profile's pick (v0.5 pairs it with pd-profile-handler)."""

    Params = PrefillHeaderParams

    def pre_request(self, req, result, headers):
        pre = result.profile_results.get(self.params.prefill_profile)
        if pre is not None and pre.targets:
            headers[PREFILLER_HEADER] = pre.targets[0].address


@register("disagg-headers-handler")
class DisaggHeadersHandler(PrefillHeaderHandler):
    pass
