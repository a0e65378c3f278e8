"""Every plugin against llm-d's formulas."""
from __future__ import annotations

import base64
import random
import struct
from collections import Counter

import pytest
import xxhash

from wideep.router.framework import Profile, ScoredPlugin
from wideep.router.prefix_hash import block_hashes, chain_block, root_hash
from wideep.router.registry import ConfigError, create
from wideep.router.types import ProfileRunResult, SchedulingResult

from router_helpers import ep, request


def scores(plugin, eps, req=None):
    return {e.name: round(s, 6) for e, s in plugin.score(req or request(), eps).items()}


def test_queue_scorer_min_max():
    s = create("queue-scorer", "q", None)
    assert scores(s, [ep("a", waiting=0), ep("b", waiting=5), ep("c", waiting=10)]) == {"a": 1.0, "b": 0.5, "c": 0.0}
    assert scores(s, [ep("a", waiting=3), ep("b", waiting=3)]) == {"a": 1.0, "b": 1.0}


def test_running_requests_size_scorer():
    s = create("running-requests-size-scorer", "r", None)
    assert scores(s, [ep("a", running=2), ep("b", running=6)]) == {"a": 1.0, "b": 0.0}


def test_kv_cache_utilization_scorer():
    s = create("kv-cache-utilization-scorer", "k", None)
    assert scores(s, [ep("a", kv=0.25), ep("b", kv=1.0)]) == {"a": 0.75, "b": 0.0}


def test_load_aware_scorer():
    s = create("load-aware-scorer", "l", None)
    assert scores(s, [ep("a", waiting=0), ep("b", waiting=64), ep("c", waiting=500)]) == {"a": 0.5, "b": 0.25, "c": 0.0}


def test_active_request_scorer():
    s = create("active-request-scorer", "a", {"idleThreshold": 1, "maxBusyScore": 0.5})
    assert scores(s, [ep("a", inflight=1), ep("b", inflight=2), ep("c", inflight=4)]) == {"a": 1.0, "b": 0.25, "c": 0.0}


def test_token_load_scorer():
    s = create("token-load-scorer", "t", None)
    assert scores(s, [ep("a", tokens=0), ep("b", tokens=4194304 // 4), ep("c", tokens=10**8)]) == {"a": 1.0, "b": 0.75, "c": 0.0}


def test_session_affinity_scorer_and_header():
    s = create("session-affinity-scorer", "s", None)
    a, b = ep("a"), ep("b")
    tok = base64.b64encode(b"b").decode()
    assert scores(s, [a, b], request(headers={"x-session-token": tok})) == {"a": 0.0, "b": 1.0}
    assert scores(s, [a, b], request(headers={"x-session-token": "%%%"})) == {"a": 0.0, "b": 0.0}
    headers = {}
    s.on_response_headers(request(), SchedulingResult("p", {"p": ProfileRunResult([a])}), headers)
    assert base64.b64decode(headers["x-session-token"]) == b"a"


def test_role_filters():
    eps = [ep("p", "prefill"), ep("d", "decode"), ep("both", "both"), ep("pd", "prefill-decode"), ep("none")]
    names = lambda f: sorted(e.name for e in create(f, f, None).filter(request(), eps))
    assert names("decode-filter") == ["both", "d", "none", "pd"]
    assert names("prefill-filter") == ["both", "p", "pd"]


def test_label_selector_and_by_label():
    eps = [ep("a"), ep("b"), ep("c")]
    eps[0].labels.update(zone="x", tier="gold")
    eps[1].labels.update(zone="y")
    f = create("label-selector-filter", "f", {"matchLabels": {"zone": "x"}})
    assert [e.name for e in f.filter(request(), eps)] == ["a"]
    f = create("label-selector-filter", "f", {"matchExpressions": [
        {"key": "zone", "operator": "In", "values": ["x", "y"]}, {"key": "tier", "operator": "DoesNotExist"}]})
    assert [e.name for e in f.filter(request(), eps)] == ["b"]
    f = create("by-label", "f", {"label": "zone", "validValues": ["y"], "allowsNoLabel": True})
    assert [e.name for e in f.filter(request(), eps)] == ["b", "c"]
    with pytest.raises(ConfigError, match="operator"):
        create("label-selector-filter", "f", {"matchExpressions": [{"key": "k", "operator": "Near"}]})


def test_max_score_picker_random_among_ties():
    p = create("max-score-picker", "p", None)
    a, b, c = ep("a"), ep("b"), ep("c")
    assert p.pick(request(), [(a, 1.0), (b, 3.0), (c, 2.0)]) == [b]
    random.seed(1)
    wins = Counter(p.pick(request(), [(a, 1.0), (b, 1.0), (c, 0.5)])[0].name for _ in range(400))
    assert set(wins) == {"a", "b"} and min(wins.values()) > 100
    p2 = create("max-score-picker", "p", {"maxNumOfEndpoints": 2})
    assert p2.pick(request(), [(a, 1.0), (b, 3.0), (c, 2.0)]) == [b, c]


def test_random_and_weighted_random_picker():
    a, b, c = ep("a"), ep("b"), ep("c")
    random.seed(2)
    r = create("random-picker", "r", None)
    assert len({r.pick(request(), [(a, 0), (b, 0), (c, 0)])[0].name for _ in range(100)}) == 3
    w = create("weighted-random-picker", "w", None)
    wins = Counter(w.pick(request(), [(a, 3.0), (b, 1.0), (c, 0.0)])[0].name for _ in range(4000))
    assert "c" not in wins                       # zero weight never beats a positive one
    assert 0.68 < wins["a"] / 4000 < 0.82        # A-Res: P(a) = 3/4


def test_chained_xxhash_blocks_match_spec():
    toks = list(range(40))
    h0 = xxhash.xxh64_intdigest(b"m" + b"salt")
    assert root_hash("m", "salt") == h0
    inner = xxhash.xxh64_intdigest(struct.pack("<16I", *toks[:16]))
    h1 = xxhash.xxh64_intdigest(struct.pack("<Q", inner) + struct.pack("<Q", h0))
    hs = block_hashes(toks, 16, h0)
    assert hs[0] == h1 and len(hs) == 2                     # only full blocks
    assert hs[1] == chain_block(h1, toks[16:32])
    assert block_hashes(toks, 16, h0, max_tokens=20) == [h1]  # maxPrefixTokensToMatch cap


def test_prefix_cache_scorer_records_and_scores():
    s = create("prefix-cache-scorer", "px", {"blockSizeTokens": 4})
    tp = create("token-producer", "tp", None)
    a, b = ep("a"), ep("b")
    shared = "S" * 160                       # 40 estimate tokens = 10 blocks
    r1 = request(shared + "first")
    tp.produce(r1, [a, b]); s.produce(r1, [a, b])
    assert scores(s, [a, b], r1) == {"a": 0.0, "b": 0.0}
    s.pre_request(r1, SchedulingResult("p", {"p": ProfileRunResult([a])}), {})
    r2 = request(shared + "another tail!")  # 10 shared blocks of 43 tokens -> 10 full blocks
    tp.produce(r2, [a, b]); s.produce(r2, [a, b])
    m = r2.data["prefix-match"]
    assert m.matched_blocks == {"a": 10}
    assert scores(s, [a, b], r2) == {"a": round(10 / len(m.hashes), 6), "b": 0.0}
    # matchLengthWeight: w*min(1, tok/8192)^2 + (1-w)*blocks/total
    s2 = create("prefix-cache-scorer", "px2", {"blockSizeTokens": 4, "matchLengthWeight": 0.5})
    from wideep.router.plugins.prefix import prefix_score
    assert prefix_score(10, 20, 4, 0.5) == pytest.approx(0.5 * (40 / 8192) ** 2 + 0.5 * 0.5)
    assert s2.params.match_length_weight == 0.5


def test_prefix_index_lru_eviction():
    from wideep.router.plugins.prefix import PrefixIndex

    idx = PrefixIndex(default_capacity=3)
    idx.add("a", [1, 2, 3], None)
    idx.add("a", [4], None)                  # evicts 1
    assert idx.lookup([1, 2, 3], {"a"}) == {}
    assert idx.lookup([2, 3, 4], {"a"}) == {"a": 3}
    idx.add("b", [2, 3], capacity=10)
    assert idx.lookup([2, 3, 4], {"a", "b"}) == {"a": 3, "b": 2}


def test_deciders():
    always = create("always-disagg-pd-decider", "d", None)
    assert always.disaggregate(request(), ep("d"))
    never = create("prefix-based-pd-decider", "d", None)
    assert not never.disaggregate(request("x" * 4000), ep("d"))
    dec = create("prefix-based-pd-decider", "d", {"nonCachedTokens": 100, "promptTokens": 200})
    d = ep("d")
    short = request("x" * 400)                # 100 estimate tokens < promptTokens
    assert not dec.disaggregate(short, d)
    long = request("x" * 1600)                # 400 tokens
    assert dec.disaggregate(long, d)
    from wideep.router.plugins.prefix import PrefixMatch
    long.data["prefix-match"] = PrefixMatch(hashes=[0] * 25, block_size=16, matched_blocks={"d": 20})  # 320 cached
    assert not dec.disaggregate(long, d)      # 400 - 320 = 80 < 100


def test_inflight_load_producer():
    p = create("inflight-load-producer", "i", None)
    d, pf = ep("d"), ep("p")
    r = request("x" * 400)
    res = SchedulingResult("decode", {"decode": ProfileRunResult([d]), "prefill": ProfileRunResult([pf])})
    p.pre_request(r, res, {})
    assert (d.inflight_requests, pf.inflight_requests, d.inflight_tokens) == (1, 1, 100)
    p.on_response_body(r, res, b"x", False)
    assert d.inflight_requests == 1
    p.on_response_body(r, res, b"", True)
    assert (d.inflight_requests, pf.inflight_requests, d.inflight_tokens) == (0, 0, 0)


def test_profile_weighted_sum_clamped():
    from wideep.router.framework import Scorer

    class Const(Scorer):
        def __init__(self, v):
            super().__init__("const", None)
            self.v = v

        def score(self, req, eps): return {e: self.v for e in eps}
    a = ep("a")
    prof = Profile("p", scorers=[ScoredPlugin(Const(2.0), 3.0), ScoredPlugin(Const(-1.0), 5.0), ScoredPlugin(Const(0.5), 2.0)],
                   picker=create("max-score-picker", "m", None))
    assert prof.run(request(), [a]).scores == {"a": 3.0 + 0.0 + 1.0}


def test_bad_parameters_fail_naming_plugin():
    with pytest.raises(ConfigError, match=r"plugin 'q' .*unknown parameter 'bogus'"):
        create("queue-scorer", "q", {"bogus": 1})
    with pytest.raises(ConfigError, match=r"blockSizeTokens.*must be int"):
        create("prefix-cache-scorer", "p", {"blockSizeTokens": "sixteen"})
    with pytest.raises(ConfigError, match=r"unknown type 'nope'"):
        create("nope", "n", None)
