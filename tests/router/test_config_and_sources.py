"""EndpointPickerConfig loading and defaults; endpoint sources (flags, file, Kubernetes JSON)."""
from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest
from aiohttp import web

from wideep.router.config import default_config_text, load_config_file, load_config_text
from wideep.router.datastore import Datastore, load_endpoints_file, parse_endpoint_flag
from wideep.router.director import Director
from wideep.router.k8s import KubernetesSource, endpoints_from_pods, parse_pool
from wideep.router.registry import ConfigError

from router_helpers import ep, request, serve_app

DATA = Path(__file__).with_name("data")


def test_wide_ep_lws_routes_prefill_and_decode_legs_to_their_roles():
    cfg = load_config_text(default_config_text())
    assert set(cfg.profiles) == {"prefill", "decode"}
    assert [(s.plugin.type_name, s.weight) for s in cfg.profiles["prefill"].scorers] == [
        ("prefix-cache-scorer", 3.0), ("queue-scorer", 2.0), ("active-request-scorer", 2.0)]
    ds = Datastore()
    eps = [ep(f"p{i}", "prefill") for i in range(3)] + [ep(f"d{i}", "decode") for i in range(3)]
    ds.set_endpoints(eps)
    director = Director(cfg, ds)
    legs = Counter()
    for i in range(30):
        d = director.schedule(request(f"prompt {i} " * 30))
        decode, prefill = d.result.profile_results["decode"], d.result.profile_results["prefill"]
        assert d.result.primary_profile == "decode" and decode.targets[0].role == "decode"
        assert prefill.targets[0].role == "prefill"
        assert d.request_headers["x-prefiller-host-port"] == prefill.targets[0].address
        assert d.request_headers["x-gateway-destination-endpoint"] == decode.targets[0].address
        legs[decode.targets[0].name] += 1
        director.finish(d)
    assert len(legs) == 3        # active-request balancing + random ties spread the decode leg


def test_selective_pd_decode_only_for_short_prompts():
    cfg = load_config_text("""
plugins:
- {type: prefix-based-pd-decider, parameters: {nonCachedTokens: 64}}
- {type: disagg-profile-handler, parameters: {deciders: {prefill: prefix-based-pd-decider}}}
- {type: prefill-filter}
- {type: decode-filter}
schedulingProfiles:
- {name: prefill, plugins: [{pluginRef: prefill-filter}]}
- {name: decode, plugins: [{pluginRef: decode-filter}]}
""")
    ds = Datastore()
    ds.set_endpoints([ep("p", "prefill"), ep("d", "decode")])
    director = Director(cfg, ds)
    short = director.schedule(request("hi"))
    assert "prefill" not in short.result.profile_results and "x-prefiller-host-port" not in short.request_headers
    long = director.schedule(request("x" * 1000))
    assert long.request_headers["x-prefiller-host-port"] == ds.get("p").address


def test_prefill_profile_empty_falls_back_to_decode_only_and_counts():
    cfg = load_config_text(default_config_text())
    ds = Datastore()
    ds.set_endpoints([ep("d", "decode")])
    director = Director(cfg, ds)
    d = director.schedule(request("hello"))
    assert d.target.name == "d" and "x-prefiller-host-port" not in d.request_headers
    assert director.metrics.pd_fallbacks._value.get() == 1


def test_defaults_no_profiles_and_single_profile():
    cfg = load_config_text("plugins: [{type: queue-scorer}, {type: decode-filter}]")
    prof = cfg.profiles["default"]
    assert [f.type_name for f in prof.filters] == ["decode-filter"]
    assert prof.picker.type_name == "max-score-picker" and prof.picker.params.max_num_of_endpoints == 1
    assert cfg.handler.type_name == "single-profile-handler"
    assert [p.type_name for p in cfg.producers][0] == "token-producer"
    assert any(p.type_name == "inflight-load-producer" for p in cfg.pre_request)
    cfg = load_config_text("apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"
                           "plugins: [{name: q, type: queue-scorer}]\n"
                           "schedulingProfiles: [{name: only, plugins: [{pluginRef: q, weight: 2}]}]")
    assert cfg.profiles["only"].scorers[0].weight == 2.0


@pytest.mark.parametrize("text,needle", [
    ("plugins: [{type: no-such-plugin}]", "unknown type 'no-such-plugin'"),
    ("plugins: [{type: queue-scorer, parameters: {weight: 2}}]", "plugin 'queue-scorer'"),
    ("plugins: [{type: prefix-cache-scorer, parameters: {blockSizeTokens: 0}}]", "blockSizeTokens must be >= 1"),
    ("apiVersion: v9\nplugins: []", "apiVersion 'v9'"),
    ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a, plugins: [{pluginRef: nope}]}]", "pluginRef 'nope'"),
    ("plugins: [{type: queue-scorer}]\nschedulingProfiles: [{name: a}, {name: b}]", "need a profile handler"),
    ("plugins: [{type: queue-scorer}]\nbogusKey: 1", "unknown top-level key"),
    ("plugins: [{type: disagg-profile-handler, parameters: {deciders: {prefill: ghost}}}]", "'ghost' is not a configured decider"),
])
def test_bad_configs_fail_naming_the_problem(text, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config_text(text)


def test_example_configs_load():
    examples = sorted(Path(__file__).parents[2].joinpath("examples/router").glob("*.yaml"))
    assert examples
    for p in examples:
        if p.name.startswith("endpoints"):
            assert load_endpoints_file(p)
        else:
            load_config_file(p)


def test_endpoint_flag_and_file(tmp_path):
    e = parse_endpoint_flag("10.0.0.1:8001,role=prefill,name=pod-rank-1,label.zone=a")
    assert (e.address, e.role, e.name, e.rank, e.labels["zone"]) == ("10.0.0.1:8001", "prefill", "pod-rank-1", 1, "a")
    with pytest.raises(ValueError, match="role must be one of"):
        parse_endpoint_flag("10.0.0.1:8001,role=chef")
    f = tmp_path / "eps.yaml"
    f.write_text("- {address: '10.0.0.1:8000', name: d0, labels: {llm-d.ai/role: decode}}\n"
                 "- {address: '10.0.0.2:8000', labels: {llm-d.ai/role: prefill}, kvEvents: 'tcp://10.0.0.2:5557'}\n")
    eps = load_endpoints_file(f)
    assert [(x.name, x.role) for x in eps] == [("d0", "decode"), ("10.0.0.2:8000", "prefill")]
    assert eps[1].kv_events == "tcp://10.0.0.2:5557"
    f.write_text("- {address: nowhere}\n")
    with pytest.raises(ValueError, match=r"\[0\]: address must be 'ip:port'"):
        load_endpoints_file(f)


def test_kubernetes_parsing_recorded_json():
    pool = parse_pool(json.loads((DATA / "inferencepool.json").read_text()))
    assert pool.match_labels == {"llm-d.ai/guide": "wide-ep-lws"} and pool.target_ports == [8000, 8001]
    eps = endpoints_from_pods(json.loads((DATA / "pods.json").read_text()), pool)
    assert [(e.name, e.address, e.rank, e.role) for e in eps] == [
        ("wide-ep-decode-0-rank-0", "10.4.1.17:8000", 0, "decode"),
        ("wide-ep-decode-0-rank-1", "10.4.1.17:8001", 1, "decode"),
        ("wide-ep-prefill-0-rank-0", "10.4.2.9:8000", 0, "prefill"),
        ("wide-ep-prefill-0-rank-1", "10.4.2.9:8001", 1, "prefill"),
    ]   # not-ready, pending and terminating pods are left out


def test_kubernetes_source_against_a_loopback_api_server():
    """The REST client path: bearer token, InferencePool GET, pod list with labelSelector."""
    seen = []

    async def pool(request):
        seen.append((request.path, request.headers.get("Authorization")))
        return web.json_response(json.loads((DATA / "inferencepool.json").read_text()))

    async def pods(request):
        seen.append((request.path, request.query.get("labelSelector")))
        return web.json_response(json.loads((DATA / "pods.json").read_text()))

    async def main():
        app = web.Application()
        app.router.add_get("/apis/inference.networking.k8s.io/v1/namespaces/llm-d/inferencepools/wide-ep-lws", pool)
        app.router.add_get("/api/v1/namespaces/llm-d/pods", pods)
        runner, port = await serve_app(app)
        ds = Datastore()
        src = KubernetesSource(ds, "llm-d", pool_name="wide-ep-lws", api_server=f"http://127.0.0.1:{port}",
                               token="tok123")
        try:
            await src.start()
            return [e.name for e in ds.all()]
        finally:
            await src.stop()
            await runner.cleanup()

    names = asyncio.run(main())
    assert len(names) == 4 and names[0] == "wide-ep-decode-0-rank-0"
    assert seen[0] == ("/apis/inference.networking.k8s.io/v1/namespaces/llm-d/inferencepools/wide-ep-lws", "Bearer tok123")
    assert seen[1] == ("/api/v1/namespaces/llm-d/pods", "llm-d.ai/guide=wide-ep-lws")


def test_prometheus_parsing():
    from wideep.router.scrape import metrics_from_text

    m = metrics_from_text('# HELP x\nvllm:num_requests_waiting{model_name="m"} 3.0\n'
                          'vllm:num_requests_running{model_name="m"} 7\n'
                          'vllm:kv_cache_usage_perc{model_name="m"} 0.42\n'
                          'vllm:cache_config_info{block_size="64",engine="0",num_gpu_blocks="9000"} 1.0\n')
    assert (m.waiting, m.running, m.kv_usage, m.block_size, m.num_gpu_blocks) == (3, 7, 0.42, 64, 9000)
    assert metrics_from_text('vllm:gpu_cache_usage_perc 0.5\n').kv_usage == 0.5


def test_router_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, wideep.router.app, wideep.router.extproc, wideep.router.proxy, wideep.router.envoy, "
            "wideep.router.k8s, wideep.router.cli; from wideep.router.plugins import load_all; load_all(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
