"""Affinity plugins beyond the prefix scorer: stick to a prefix-cache holder unless that costs too
much TTFT, prefer endpoints with the request's LoRA adapter, spread cold requests least-recently-used."""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from wideep.router.framework import Filter, PreRequest, Scorer
from wideep.router.plugins.prefix import prefix_fractions
from wideep.router.registry import PluginParams, register
from wideep.router.types import StateKey


@dataclass
class AffinityFilterParams(PluginParams):
    affinity_threshold: float = 0.8          # prefix score an endpoint needs to be "sticky"
    max_ttft_penalty_ms: float = 0.0         # 0 = never give up stickiness for TTFT
    peak_prefill_throughput: float = 0.0     # tokens/s one endpoint prefills; 0 = no TTFT estimate
    exploration_probability: float = 0.0     # chance to ignore stickiness and keep everyone

    def validate(self):
        if not 0.0 <= self.affinity_threshold <= 1.0:
            raise ValueError("affinityThreshold must be in [0, 1]")
        if not 0.0 <= self.exploration_probability <= 1.0:
            raise ValueError("explorationProbability must be in [0, 1]")
        if self.max_ttft_penalty_ms < 0 or self.peak_prefill_throughput < 0:
            raise ValueError("maxTTFTPenaltyMs and peakPrefillThroughput must be >= 0")


@register("prefix-cache-affinity-filter")
class PrefixCacheAffinityFilter(Filter):
    """Keeps only the endpoints whose prefix score is >= affinityThreshold (the sticky set), so a
    token-load scorer after it balances among cache holders only. Everyone is kept when nobody is
    sticky, on an exploration draw, or when the sticky set's best TTFT estimate
    (inflightTokens / peakPrefillThroughput) is more than maxTTFTPenaltyMs worse than the pool's."""

    Params = AffinityFilterParams

    def __init__(self, name, params):
        super().__init__(name, params)
        self.rng = random.Random()
        self.explored = 0
        self.ttft_escapes = 0

    @staticmethod
    def ttft_ms(inflight_tokens: int, peak: float) -> float:
        return inflight_tokens / peak * 1000.0

    def filter(self, req, eps):
        p = self.params
        fractions = prefix_fractions(req)
        if not fractions:
            return eps
        sticky = [e for e in eps if fractions.get(e.name, 0.0) >= p.affinity_threshold]
        if not sticky or len(sticky) == len(eps):
            return eps
        if p.exploration_probability > 0 and self.rng.random() < p.exploration_probability:
            self.explored += 1
            return eps
        if p.max_ttft_penalty_ms > 0 and p.peak_prefill_throughput > 0:
            best_sticky = min(self.ttft_ms(e.inflight_tokens, p.peak_prefill_throughput) for e in sticky)
            best_all = min(self.ttft_ms(e.inflight_tokens, p.peak_prefill_throughput) for e in eps)
            if best_sticky - best_all > p.max_ttft_penalty_ms:
                self.ttft_escapes += 1
                return eps
        return sticky


@register("lora-affinity-scorer")
class LoraAffinityScorer(Scorer):
    """The request's `model` as a LoRA adapter, against vllm:lora_requests_info: 1.0 when it is
    already running there, 0.8 when a free adapter slot could load it, 0.6 when it is only waiting
    there, 0 when the endpoint's slots are full."""

    category = "affinity"
    bounded = True

    @staticmethod
    def lora_score(model: str, m) -> float:
        if model in m.running_lora:
            return 1.0
        if len(m.running_lora) + len(m.waiting_lora) < m.max_lora:
            return 0.8
        if model in m.waiting_lora:
            return 0.6
        return 0.0

    def score_values(self, req, eps):
        model = req.model
        return [self.lora_score(model, e.metrics) for e in eps]


@dataclass
class NoHitLRUParams(PluginParams):
    lru_size: int = 1024                # endpoints remembered (more than any pool)

    def validate(self):
        if self.lru_size < 1:
            raise ValueError("lruSize must be >= 1")


NO_HIT_KEY: StateKey[bool] = StateKey("no-hit-lru-cold")   # the request hit no cached prefix anywhere


@register("no-hit-lru-scorer")
class NoHitLRUScorer(Scorer, PreRequest):
    """Cold requests (no endpoint caches any of the prompt's blocks, per the prefix producers) go to
    the endpoint that received a cold request least recently: never-used endpoints score 1, the rest
    rank from 1 (oldest) down to 0 (most recent). Warm requests get a neutral 0.5 everywhere, so the
    prefix scorer decides. Cold picks are recorded at PreRequest."""

    Params = NoHitLRUParams

    def __init__(self, name, params):
        super().__init__(name, params)
        self.lru: OrderedDict[str, None] = OrderedDict()   # oldest first

    def is_cold(self, req) -> bool:
        fractions = prefix_fractions(req)
        return not fractions or not any(v > 0 for v in fractions.values())

    def score(self, req, eps):
        cold = self.is_cold(req)
        req.data.put(NO_HIT_KEY, cold)
        if not cold:
            return dict.fromkeys(eps, 0.5)
        used = [e for e in eps if e.name in self.lru]
        out = {e: 1.0 for e in eps if e.name not in self.lru}
        if used:
            rank = {n: i for i, n in enumerate(self.lru)}
            used.sort(key=lambda e: rank[e.name])
            # oldest used = 1 when every candidate was used, else just below the never-used ones
            n = len(used)
            span = n if out else n - 1
            for i, e in enumerate(used):
                out[e] = (n - 1 - i) / span if span else 1.0
        return out

    def pre_request(self, req, result, headers):
        if not req.data.get(NO_HIT_KEY):
            return
        for r in result.profile_results.values():
            if r is not None and r.targets:
                name = r.targets[0].name
                self.lru.pop(name, None)
                self.lru[name] = None
        while len(self.lru) > self.params.lru_size:
            self.lru.popitem(last=False)
