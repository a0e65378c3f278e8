"""The plugins added for full wide-ep-lws / precise-routing / v0.5 coverage, against llm-d's configs."""
from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from aiohttp import web

from wideep.router.config import default_config_text, load_config_text
from wideep.router.datastore import Datastore
from wideep.router.director import Director
from wideep.router.plugins.prefix import PrefixMatch
from wideep.router.registry import ConfigError, create, snake
from wideep.router.scrape import metrics_from_text
from wideep.router.types import ProfileRunResult, SchedulingResult

from router_helpers import ep, request, serve_app

REV = "disaggregatedset.x-k8s.io/revision"


def with_prefix(req, hits: dict[str, int], total: int = 10):
    req.data["prefix-match"] = PrefixMatch(hashes=list(range(total)), block_size=16, matched_blocks=hits)
    return req


def names(eps):
    return sorted(e.name for e in eps)


# ---- prefix-cache-affinity-filter ------------------------------------------------------------------
def test_affinity_filter_keeps_endpoints_at_or_above_threshold():
    f = create("prefix-cache-affinity-filter", "f", None)
    assert f.params.affinity_threshold == 0.8
    eps = [ep("a"), ep("b"), ep("c")]
    assert names(f.filter(with_prefix(request(), {"a": 8, "b": 7}), eps)) == ["a"]        # 0.8 >= 0.8, 0.7 not
    assert names(f.filter(with_prefix(request(), {"a": 9, "c": 10}), eps)) == ["a", "c"]
    assert names(f.filter(with_prefix(request(), {"b": 3}), eps)) == ["a", "b", "c"]      # nobody sticky
    assert names(f.filter(request(), eps)) == ["a", "b", "c"]                             # no producer ran


def test_affinity_filter_drops_stickiness_when_ttft_penalty_too_high():
    # TTFT = inflightTokens / peakPrefillThroughput: 7170 tok / 3585 tok/s = 2000 ms on the holder
    f = create("prefix-cache-affinity-filter", "f", {"peakPrefillThroughput": 3585, "maxTTFTPenaltyMs": 1500})
    holder, idle = ep("holder", tokens=7170), ep("idle", tokens=0)
    req = with_prefix(request(), {"holder": 10})
    assert names(f.filter(req, [holder, idle])) == ["holder", "idle"] and f.ttft_escapes == 1   # 2000 > 1500
    holder.inflight_tokens = 3585                                                                # 1000 ms
    assert names(f.filter(req, [holder, idle])) == ["holder"]
    f2 = create("prefix-cache-affinity-filter", "f", {"peakPrefillThroughput": 3585})            # no limit
    holder.inflight_tokens = 10**7
    assert names(f2.filter(req, [holder, idle])) == ["holder"]


def test_affinity_filter_exploration_probability():
    f = create("prefix-cache-affinity-filter", "f", {"explorationProbability": 0.25})
    f.rng.seed(3)
    eps = [ep("a"), ep("b")]
    kept = Counter(len(f.filter(with_prefix(request(), {"a": 10}), eps)) for _ in range(2000))
    assert 0.2 < kept[2] / 2000 < 0.3 and kept[2] == f.explored
    with pytest.raises(ConfigError, match="explorationProbability"):
        create("prefix-cache-affinity-filter", "f", {"explorationProbability": 1.5})


def test_affinity_filter_reads_precise_weighted_matches():
    f = create("prefix-cache-affinity-filter", "f", {"affinityThreshold": 0.5})
    req = request()
    m = PrefixMatch(hashes=list(range(4)), block_size=64, matched_blocks={"a": 3, "b": 2})
    m.weighted = {"a": 3.0, "b": 1.6}    # b's blocks sit on CPU (0.8 each): 0.4 < 0.5
    req.data["precise-prefix-match"] = m
    assert names(f.filter(req, [ep("a"), ep("b"), ep("c")])) == ["a"]


# ---- lora-affinity-scorer ------------------------------------------------------------------------
def test_lora_info_scraped_newest_sample_wins():
    m = metrics_from_text(
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 100.0\n'
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql, chat",waiting_lora_adapters="math"} 200.0\n')
    assert (m.running_lora, m.waiting_lora, m.max_lora) == (frozenset({"sql", "chat"}), frozenset({"math"}), 2)


def test_lora_affinity_scores_active_free_waiting_full():
    s = create("lora-affinity-scorer", "l", None)

    def lora(name, running=(), waiting=(), max_lora=2):
        e = ep(name)
        e.metrics.running_lora, e.metrics.waiting_lora, e.metrics.max_lora = frozenset(running), frozenset(waiting), max_lora
        return e

    eps = [lora("active", running=["sql", "x"]), lora("free", running=["x"]),
           lora("waiting", running=["x"], waiting=["sql"]), lora("full", running=["x", "y"])]
    got = {e.name: v for e, v in s.score(request(model="sql"), eps).items()}
    assert got == {"active": 1.0, "free": 0.8, "waiting": 0.6, "full": 0.0}


# ---- no-hit-lru-scorer ---------------------------------------------------------------------------
def test_no_hit_lru_spreads_cold_requests_least_recently_used_first():
    s = create("no-hit-lru-scorer", "n", None)
    a, b, c = ep("a"), ep("b"), ep("c")

    def cold_pick(target):
        req = with_prefix(request(), {})
        sc = {e.name: v for e, v in s.score(req, [a, b, c]).items()}
        s.pre_request(req, SchedulingResult("p", {"p": ProfileRunResult([target])}), {})
        return sc

    assert cold_pick(a) == {"a": 1.0, "b": 1.0, "c": 1.0}          # nobody used yet
    assert cold_pick(b) == {"a": 0.0, "b": 1.0, "c": 1.0}          # a used: below the never-used
    assert cold_pick(c) == {"a": 0.5, "b": 0.0, "c": 1.0}          # a older than b
    assert cold_pick(a) == {"a": 1.0, "b": 0.5, "c": 0.0}          # all used: oldest 1 .. newest 0
    warm = with_prefix(request(), {"b": 4})
    assert set(s.score(warm, [a, b, c]).values()) == {0.5}          # warm: neutral, prefix scorer decides
    s.pre_request(warm, SchedulingResult("p", {"p": ProfileRunResult([c])}), {})
    assert list(s.lru) == ["b", "c", "a"]                            # warm picks do not touch the LRU


def test_no_hit_lru_in_a_profile_round_robins_cold_traffic():
    cfg = load_config_text("plugins: [{type: prefix-cache-scorer}, {type: no-hit-lru-scorer}]")
    ds = Datastore()
    ds.set_endpoints([ep(f"e{i}") for i in range(4)])
    director = Director(cfg, ds)
    picks = [director.schedule(request(f"cold prompt number {i} " * 8)).target.name for i in range(8)]
    assert Counter(picks) == {"e0": 2, "e1": 2, "e2": 2, "e3": 2}


# ---- deprecated v0.5 handlers ----------------------------------------------------------------------
S5 = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- {type: pd-profile-handler, parameters: {threshold: THRESH, hashBlockSize: 5, primaryPort: PORT}}
- {type: prefill-header-handler}
- {type: prefix-cache-scorer, parameters: {blockSizeTokens: 4}}
- {type: prefill-filter}
- {type: decode-filter}
- {type: random-picker}
schedulingProfiles:
- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: random-picker}]}
- {name: decode, plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer}]}
"""


def test_pd_profile_handler_threshold_rule():
    h = create("pd-profile-handler", "h", {"threshold": 100, "hashBlockSize": 5})
    d = ep("d")
    # (1 - hit%) * len(promptBytes) >= threshold
    assert h.wants_prefill(request("x" * 100), "d")                               # 1.0 * 100
    assert not h.wants_prefill(request("x" * 99), "d")
    assert h.wants_prefill(with_prefix(request("x" * 400), {"d": 7}), "d")        # 0.3 * 400 = 120
    assert not h.wants_prefill(with_prefix(request("x" * 400), {"d": 8}), "d")    # 0.2 * 400 = 80
    assert d.name == "d"


def test_s5_config_always_disaggregates_with_threshold_zero_and_primary_port():
    cfg = load_config_text(S5.replace("THRESH", "0").replace("PORT", "8000"))
    ds = Datastore()
    dec = ep("dec-rank-3", "decode", address="10.1.0.5:8003")
    pre = ep("pre-rank-1", "prefill", address="10.1.0.9:8001")
    ds.set_endpoints([dec, pre])
    d = Director(cfg, ds).schedule(request("hi"))
    assert d.request_headers["x-prefiller-host-port"] == "10.1.0.9:8001"
    assert d.request_headers["x-data-parallel-host-port"] == "10.1.0.5:8003"     # the rank itself
    assert d.request_headers["x-gateway-destination-endpoint"] == "10.1.0.5:8000"  # the pod's primary port
    assert d.target_address == "10.1.0.5:8000" and d.target is dec


def test_s5_threshold_skips_prefill_for_short_prompts_and_no_primary_port():
    cfg = load_config_text(S5.replace("THRESH", "50").replace("PORT", "0"))
    ds = Datastore()
    ds.set_endpoints([ep("d", "decode", address="10.1.0.5:8003"), ep("p", "prefill")])
    director = Director(cfg, ds)
    short = director.schedule(request("tiny"))
    assert "x-prefiller-host-port" not in short.request_headers and "x-data-parallel-host-port" not in short.request_headers
    assert short.request_headers["x-gateway-destination-endpoint"] == "10.1.0.5:8003"
    assert "x-prefiller-host-port" in director.schedule(request("y" * 60)).request_headers


def test_data_parallel_profile_handler():
    cfg = load_config_text("plugins: [{type: data-parallel-profile-handler, parameters: {primaryPort: 8200}}, "
                           "{type: queue-scorer}]\nschedulingProfiles: [{name: dp, plugins: [{pluginRef: queue-scorer}]}]")
    ds = Datastore()
    ds.set_endpoints([ep("pod-rank-2", address="10.2.0.1:8002", waiting=0), ep("pod-rank-3", address="10.2.0.1:8003", waiting=9)])
    d = Director(cfg, ds).schedule(request())
    assert d.destination == "10.2.0.1:8200" and d.request_headers["x-data-parallel-host-port"] == "10.2.0.1:8002"
    with pytest.raises(ConfigError, match="primaryPort"):
        create("data-parallel-profile-handler", "h", {"primaryPort": 70000})


# ---- disaggregatedset-rollout-screener -----------------------------------------------------------
def rev_ep(name, role, rev):
    e = ep(name, role)
    if rev is not None:
        e.labels[REV] = rev
    return e


def test_rollout_screener_single_or_no_revision_keeps_everything():
    s = create("disaggregatedset-rollout-screener", "s", None)
    eps = [rev_ep("p", "prefill", "5"), rev_ep("d", "decode", "5"), rev_ep("x", "decode", None)]
    assert names(s.screen(request(), eps)) == ["d", "p", "x"]
    assert names(s.screen(request(), [ep("a"), ep("b")])) == ["a", "b"]


def test_rollout_screener_keeps_newest_complete_revision():
    s = create("disaggregatedset-rollout-screener", "s", None)
    old = [rev_ep("p1", "prefill", "1"), rev_ep("d1", "decode", "1"), rev_ep("d1b", "decode", "1")]
    new_half = [rev_ep("d2", "decode", "2")]                       # no prefill of rev 2 yet
    assert names(s.screen(request(), old + new_half)) == ["d1", "d1b", "p1"]
    new = new_half + [rev_ep("p2", "prefill", "2")]
    assert names(s.screen(request(), old + new + [rev_ep("x", "decode", None)])) == ["d2", "p2"] and s.current == "2"
    # hash-like revisions: the one with most endpoints; currentRevision pins
    hashed = [rev_ep("a1", "prefill", "abc"), rev_ep("a2", "decode", "abc"), rev_ep("a3", "decode", "abc"),
              rev_ep("b1", "prefill", "fff"), rev_ep("b2", "decode", "fff")]
    assert names(s.screen(request(), hashed)) == ["a1", "a2", "a3"]
    pinned = create("disaggregatedset-rollout-screener", "s", {"currentRevision": "fff"})
    assert names(pinned.screen(request(), hashed)) == ["b1", "b2"]


def test_rollout_screener_in_director_keeps_both_legs_on_one_revision():
    cfg = load_config_text(default_config_text())
    assert [s.type_name for s in cfg.screeners] == ["disaggregatedset-rollout-screener"]
    ds = Datastore()
    ds.set_endpoints([rev_ep("p1", "prefill", "1"), rev_ep("d1", "decode", "1"),
                      rev_ep("p2", "prefill", "2"), rev_ep("d2", "decode", "2")])
    director = Director(cfg, ds)
    for i in range(10):
        d = director.schedule(request(f"q{i}"))
        assert {d.target.name, d.result.profile_results["prefill"].targets[0].name} == {"p2", "d2"}
        director.finish(d)


# ---- the exact wide-ep-lws config of llm-d's guide ------------------------------------------------
WIDE_EP_LWS = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disaggregatedset-rollout-screener
  parameters: {disaggregatedSetName: wide-ep}
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always-disagg-pd-decider}}
- type: prefill-filter
- type: decode-filter
- type: prefix-cache-scorer
- type: queue-scorer
- type: active-request-scorer
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-scorer, weight: 3},
            {pluginRef: queue-scorer, weight: 2}, {pluginRef: active-request-scorer, weight: 2}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: active-request-scorer}]
"""


def test_exact_wide_ep_lws_config_loads_with_every_listed_plugin():
    cfg = load_config_text(WIDE_EP_LWS)
    assert {p.type_name for p in cfg.plugins.values()} >= {
        "disaggregatedset-rollout-screener", "always-disagg-pd-decider", "disagg-profile-handler", "prefill-filter",
        "decode-filter", "prefix-cache-scorer", "queue-scorer", "active-request-scorer"}
    ds = Datastore()
    ds.set_endpoints([ep("p", "prefill"), ep("d", "decode")])
    d = Director(cfg, ds).schedule(request("hello"))
    assert d.target.name == "d" and d.request_headers["x-prefiller-host-port"] == ds.get("p").address


def test_precise_routing_prefill_profile_sticks_then_balances_by_tokens():
    cfg = load_config_text("""
plugins:
- {type: approx-prefix-cache-producer, parameters: {blockSizeTokens: 4}}
- {type: prefix-cache-affinity-filter, parameters: {peakPrefillThroughput: 3585}}
- {type: token-load-scorer}
- {type: prefill-filter}
schedulingProfiles:
- {name: prefill, plugins: [{pluginRef: prefill-filter}, {pluginRef: prefix-cache-affinity-filter}, {pluginRef: token-load-scorer}]}
""")
    ds = Datastore()
    a, b, c = ep("a", "prefill", tokens=50_000), ep("b", "prefill", tokens=40_000), ep("c", "prefill", tokens=0)
    ds.set_endpoints([a, b, c])
    director = Director(cfg, ds)
    body = b'{"model": "m", "prompt": "' + b"the same long system prompt " * 20 + b'"}'
    first = director.parse_request(body, {}, "/v1/completions")
    for p in cfg.producers:
        p.produce(first, [a, b, c])
    for target in (a, b):   # both hold the prompt's blocks
        cfg.plugins["approx-prefix-cache-producer"].index.add(target.name, first.data["prefix-match"].hashes, None)
    d = director.schedule(director.parse_request(body, {}, "/v1/completions"))
    assert d.target is b   # sticky set {a, b} (c has no cache though it is idle), b has fewer tokens


# ---- token-producer vllm.url ---------------------------------------------------------------------
def test_token_producer_params():
    assert create("token-producer", "t", {"vllm": {"url": "http://x:8000"}}).params.mode == "vllm"
    assert create("token-producer", "t", None).params.mode == "estimate"
    assert create("token-producer", "t", {"vllm": {"url": ""}}).params.mode == "vllm"   # "" = a pool endpoint
    with pytest.raises(ConfigError, match="vllm.url"):
        create("token-producer", "t", {"vllm": {"url": "ftp://x"}})
    with pytest.raises(ConfigError, match="unknown key"):
        create("token-producer", "t", {"vllm": {"uri": "http://x"}})
    assert snake("maxTTFTPenaltyMs") == "max_ttft_penalty_ms"


def test_token_producer_vllm_mode_against_a_loopback_server():
    """/tokenize for completions; chat tries render (404 here: wideep serve has none) then /tokenize
    {"messages"}; a dead server falls back to the estimate; a render answer is used when present."""
    calls = []

    async def tokenize(request):
        body = await request.json()
        calls.append(("tokenize", sorted(body)))
        if body.get("model") != "m":
            return web.json_response({"error": {"message": "model", "type": "NotFoundError"}}, status=404)
        toks = [len(w) for w in (body.get("prompt") or " ".join(m["content"] for m in body["messages"])).split()]
        return web.json_response({"tokens": toks, "count": len(toks), "max_model_len": 4096, "token_strs": None})

    async def render(request):
        calls.append(("render", None))
        return web.json_response({"prompt_token_ids": [7, 7, 7]})

    async def main():
        results = {}
        for with_render in (False, True):
            app = web.Application()
            app.router.add_post("/tokenize", tokenize)
            if with_render:
                app.router.add_post("/v1/chat/completions/render", render)
            runner, port = await serve_app(app)
            tp = create("token-producer", "tp", {"vllm": {"url": f"http://127.0.0.1:{port}"}})
            try:
                r1, r2, r3 = request("aa bbb c"), request("hello there", chat=True), request("hello there", chat=True)
                for r in (r1, r2, r3):
                    await tp.produce_async(r, [])
                    tp.produce(r, [])
                results[with_render] = (r1.token_ids, r2.token_ids, r3.token_ids)
            finally:
                await tp.stop()
                await runner.cleanup()
        # nothing listens now: estimate
        tp = create("token-producer", "tp", {"vllm": {"url": f"http://127.0.0.1:{port}", "timeoutMs": 500}})
        r = request("abcdefgh")
        await tp.produce_async(r, [])
        tp.produce(r, [])
        await tp.stop()
        results["dead"] = (r.token_ids, tp.remote.failures)
        # url "" = ask a candidate endpoint
        return results

    res = asyncio.run(main())
    assert res[False] == ([2, 3, 1], [5, 5], [5, 5])
    assert res[True] == ([2, 3, 1], [7, 7, 7], [7, 7, 7])
    # server 1 (no render): tokenize, render 404 -> tokenize, tokenize (render remembered missing);
    # server 2: tokenize, render, render
    assert calls == [("tokenize", ["model", "prompt"]), ("tokenize", ["messages", "model"]),
                     ("tokenize", ["messages", "model"]),
                     ("tokenize", ["model", "prompt"]), ("render", None), ("render", None)]
    from wideep.router.tokenize import estimate_token_ids
    assert res["dead"] == (estimate_token_ids(b"abcdefgh"), 1)


def test_token_producer_without_url_asks_a_candidate_endpoint():
    seen = []

    async def tokenize(request):
        seen.append(request.host)
        return web.json_response({"tokens": [1, 2, 3], "count": 3})

    async def main():
        app = web.Application()
        app.router.add_post("/tokenize", tokenize)
        runner, port = await serve_app(app)
        tp = create("token-producer", "tp", {"mode": "vllm"})
        try:
            r = request("x y z")
            await tp.produce_async(r, [ep("e", address=f"127.0.0.1:{port}")])
            return r.token_ids
        finally:
            await tp.stop()
            await runner.cleanup()

    assert asyncio.run(main()) == [1, 2, 3] and len(seen) == 1


def test_endpoint_role_attributes_follow_label_assignment():
    from wideep.router.types import ROLE_LABEL, Endpoint

    e = Endpoint(name="x", address="1.2.3.4:8000")
    assert (e.role, e.can_decode, e.can_prefill) == (None, True, False)
    e.labels = {ROLE_LABEL: "prefill"}
    assert (e.role, e.can_decode, e.can_prefill) == ("prefill", False, True)
    ds = Datastore()
    ds.set_endpoints([e])
    ds.set_endpoints([Endpoint(name="x", address="1.2.3.4:8000", labels={ROLE_LABEL: "both"})])
    assert ds.get("x") is e and (e.can_decode, e.can_prefill) == (True, True)   # refreshed in place
