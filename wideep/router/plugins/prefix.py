"""Approximate prefix-cache routing: the router remembers which blocks it sent where.

Nothing is confirmed by the engine, so PreRequest records every block of the prompt on the
chosen decode and prefill endpoints; a per-endpoint LRU (sized from vllm:cache_config_info
num_gpu_blocks, else lruCapacityPerServer) forgets like the engine's cache would.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from wideep.router.framework import DataProducer, PreRequest, Scorer
from wideep.router.prefix_hash import block_hashes, root_hash
from wideep.router.registry import PluginParams, register
from wideep.router.types import Endpoint, LLMRequest, StateKey


@dataclass
class PrefixMatch:
    hashes: list[int]
    block_size: int
    matched_blocks: dict[str, int] = field(default_factory=dict)   # endpoint name -> consecutive hits
    weighted: dict[str, float] | None = None   # precise: hits weighted by the medium they sit on


PREFIX_MATCH: StateKey[PrefixMatch] = StateKey("prefix-match")                  # approximate index
PRECISE_PREFIX_MATCH: StateKey[PrefixMatch] = StateKey("precise-prefix-match")  # engines' KV events


@dataclass
class PrefixParams(PluginParams):
    block_size_tokens: int = 16
    auto_tune: bool = False
    max_prefix_tokens_to_match: int = 131072
    lru_capacity_per_server: int = 31250
    match_length_weight: float = 0.0

    def validate(self):
        if self.block_size_tokens < 1:
            raise ValueError("blockSizeTokens must be >= 1")
        if self.max_prefix_tokens_to_match < 1 or self.lru_capacity_per_server < 1:
            raise ValueError("maxPrefixTokensToMatch and lruCapacityPerServer must be >= 1")
        if not 0.0 <= self.match_length_weight <= 1.0:
            raise ValueError("matchLengthWeight must be in [0, 1]")


class PrefixIndex:
    """hash -> endpoints holding it, plus an LRU of hashes per endpoint.

    Holders are an int bitmask (one bit per endpoint name), so walking a prompt's blocks is one
    big-int AND per block whatever the pool size; only endpoints that drop out are visited."""

    def __init__(self, default_capacity: int):
        self.default_capacity = default_capacity
        self.by_hash: dict[int, int] = {}
        self.lru: dict[str, OrderedDict[int, None]] = {}
        self.bit_of: dict[str, int] = {}
        self.name_of: dict[int, str] = {}      # bit index -> name

    def _bit(self, name: str) -> int:
        bit = self.bit_of.get(name)
        if bit is None:
            idx = len(self.bit_of)
            bit = self.bit_of[name] = 1 << idx
            self.name_of[idx] = name
        return bit

    def holders(self, h: int) -> set[str]:
        return self._names(self.by_hash.get(h, 0))

    def _names(self, mask: int) -> set[str]:
        out = set()
        while mask:
            low = mask & -mask
            out.add(self.name_of[low.bit_length() - 1])
            mask ^= low
        return out

    def lookup(self, hashes: list[int], names: set[str] | None = None) -> dict[str, int]:
        """Consecutive hits from block 0 per endpoint; stops at the first block nobody still has."""
        match: dict[str, int] = {}
        by_hash, name_of = self.by_hash, self.name_of
        active = -1          # all bits
        depth = 0
        for h in hashes:
            nxt = active & by_hash.get(h, 0)
            if nxt != active and depth:
                dropped = active & ~nxt
                while dropped:
                    low = dropped & -dropped
                    match[name_of[low.bit_length() - 1]] = depth
                    dropped ^= low
            active = nxt
            if not active:
                break
            depth += 1
        if active > 0:
            while active:
                low = active & -active
                match[name_of[low.bit_length() - 1]] = depth
                active ^= low
        if names is not None:
            match = {n: c for n, c in match.items() if n in names}
        return match

    def add(self, name: str, hashes: list[int], capacity: int | None) -> None:
        lru = self.lru.setdefault(name, OrderedDict())
        cap = capacity or self.default_capacity
        bit = self._bit(name)
        by_hash = self.by_hash
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
                by_hash[h] = by_hash.get(h, 0) | bit
        while len(lru) > cap:
            old, _ = lru.popitem(last=False)
            self._drop(old, bit)

    def _drop(self, h: int, bit: int) -> None:
        mask = self.by_hash.get(h, 0) & ~bit
        if mask:
            self.by_hash[h] = mask
        else:
            self.by_hash.pop(h, None)

    def forget(self, name: str) -> None:
        bit = self.bit_of.get(name)
        if bit is None:
            return
        for h in self.lru.pop(name, {}):
            self._drop(h, bit)


def prefix_score(match_blocks: int, total_blocks: int, block_size: int, w: float) -> float:
    """w*min(1, matchedTok/8192)^2 + (1-w)*matchBlocks/totalBlocks."""
    if total_blocks <= 0:
        return 0.0
    matched_tok = match_blocks * block_size
    return w * min(1.0, matched_tok / 8192) ** 2 + (1 - w) * match_blocks / total_blocks


class _ApproxPrefixCore(DataProducer, PreRequest):
    Params = PrefixParams
    DATA_KEY = PREFIX_MATCH

    def __init__(self, name, params):
        super().__init__(name, params)
        self.index = PrefixIndex(params.lru_capacity_per_server)

    def block_size(self, eps: list[Endpoint]) -> int:
        if self.params.auto_tune:
            for e in eps:
                if e.metrics.block_size:
                    return max(64, e.metrics.block_size)
        return self.params.block_size_tokens

    def produce(self, req: LLMRequest, eps):
        bs = self.block_size(eps)
        salt = str(req.body.get("cache_salt") or "")
        hashes = block_hashes(req.token_ids or [], bs, root_hash(req.model, salt), self.params.max_prefix_tokens_to_match)
        m = PrefixMatch(hashes=hashes, block_size=bs)
        m.matched_blocks = self.index.lookup(hashes)   # holders outside `eps` are never read
        req.data.put(self.DATA_KEY, m)

    def pre_request(self, req, result, headers):
        m = req.data.get(self.DATA_KEY)
        if m is None:
            return
        for r in result.profile_results.values():
            if r is not None and r.targets:
                ep = r.targets[0]
                self.index.add(ep.name, m.hashes, ep.metrics.num_gpu_blocks)


@register("approx-prefix-cache-producer")
class ApproxPrefixCacheProducer(_ApproxPrefixCore):
    pass


@register("prefix-cache-scorer")
class PrefixCacheScorer(_ApproxPrefixCore, Scorer):
    """Scores consecutive cached blocks; uses a configured approx-prefix-cache-producer if one
    exists, otherwise keeps its own index."""

    category = "affinity"
    bounded = True

    def __init__(self, name, params):
        super().__init__(name, params)
        self.producer: _ApproxPrefixCore | None = None

    def wire(self, plugins):
        for p in plugins.values():
            if isinstance(p, ApproxPrefixCacheProducer):
                self.producer = p

    def produce(self, req, eps):
        if self.producer is None:
            super().produce(req, eps)

    def pre_request(self, req, result, headers):
        if self.producer is None:
            super().pre_request(req, result, headers)

    def score_values(self, req, eps):
        m = req.data.get(self.DATA_KEY)
        hits = m.matched_blocks if m is not None else None
        if not hits:
            return [0.0] * len(eps)
        total = len(m.hashes)
        w = self.params.match_length_weight
        if w == 0.0:   # the default: matchBlocks / totalBlocks
            inv = 1.0 / total
            return [hits.get(e.name, 0) * inv for e in eps]
        by_count: dict[int, float] = {}
        out = []
        for e in eps:
            c = hits.get(e.name, 0)
            s = by_count.get(c)
            if s is None:
                s = by_count[c] = prefix_score(c, total, m.block_size, w)
            out.append(s)
        return out


def prefix_fractions(req: LLMRequest) -> dict[str, float] | None:
    """Per endpoint, the share of the prompt's blocks cached there, from whichever prefix producer
    ran (precise KV events preferred over the approximate index); None when none ran."""
    m = req.data.get(PRECISE_PREFIX_MATCH)
    if m is not None:
        total = len(m.hashes)
        weighted = m.weighted or m.matched_blocks
        return {n: v / total for n, v in weighted.items()} if total else {}
    m = req.data.get(PREFIX_MATCH)
    if m is not None:
        total = len(m.hashes)
        return {n: v / total for n, v in m.matched_blocks.items()} if total else {}
    return None
