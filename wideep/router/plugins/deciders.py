"""P/D deciders: should this request get a separate prefill leg (docs/protocols.md, "P/D disaggregation")?"""
from __future__ import annotations

from dataclasses import dataclass

from wideep.router.framework import PDDecider
from wideep.router.plugins.prefix import PRECISE_PREFIX_MATCH, PREFIX_MATCH
from wideep.router.registry import PluginParams, register
from wideep.router.types import Endpoint, LLMRequest


def cached_tokens_on(req: LLMRequest, ep: Endpoint) -> int:
    """Tokens of the prompt already cached on `ep`, as found by a prefix producer (0 if none ran)."""
    best = 0
    for key in (PREFIX_MATCH, PRECISE_PREFIX_MATCH):
        m = req.data.get(key)
        if m is not None:
            best = max(best, m.matched_blocks.get(ep.name, 0) * m.block_size)
    return best


@register("always-disagg-pd-decider")
class AlwaysDisaggDecider(PDDecider):
    def disaggregate(self, req: LLMRequest, decode: Endpoint) -> bool:
        return True


@dataclass
class PrefixPDParams(PluginParams):
    non_cached_tokens: int = 0   # 0 = never disaggregate
    prompt_tokens: int = 0

    def validate(self):
        if self.non_cached_tokens < 0 or self.prompt_tokens < 0:
            raise ValueError("nonCachedTokens and promptTokens must be >= 0")


@register("prefix-based-pd-decider")
class PrefixBasedDecider(PDDecider):
    """Disaggregate iff nonCachedTokens > 0, prompt >= promptTokens, and the part of the prompt the
    decode endpoint does not cache is at least nonCachedTokens."""

    Params = PrefixPDParams

    def disaggregate(self, req: LLMRequest, decode: Endpoint) -> bool:
        p = self.params
        if p.non_cached_tokens <= 0:
            return False
        prompt = req.num_prompt_tokens
        if prompt < p.prompt_tokens:
            return False
        return prompt - cached_tokens_on(req, decode) >= p.non_cached_tokens
