"""Built-in proxy end to end: real fake-vLLM processes, real HTTP, the real openai client."""
from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from router_helpers import RouterThread, post, router_options, start_backends

PD_CONFIG_ROLES = {"p0": "prefill", "p1": "prefill", "d0": "decode", "d1": "decode"}


@pytest.fixture(scope="module")
def pd_backends():
    bs = start_backends(list(PD_CONFIG_ROLES))
    yield {b.name: b for b in bs}
    for b in bs:
        b.kill()


def test_wide_ep_default_config_routes_decode_with_prefill_header(pd_backends):
    eps = [f"{b.address},role={PD_CONFIG_ROLES[n]},name={n}" for n, b in pd_backends.items()]
    with RouterThread(router_options(endpoints=eps)) as rt:
        port = rt.router.opts.proxy_port
        served = set()
        for i in range(6):
            st, hdr, body = post(port, {"model": "fake/model", "prompt": f"question {i} " * 20, "max_tokens": 3})
            assert st == 200, body
            served.add(hdr["x-backend-name"])
        assert served <= {"d0", "d1"} and served          # decode leg goes to decode endpoints
        seen = pd_backends["d0"].stats()["seen"] + pd_backends["d1"].stats()["seen"]
        prefill_addrs = {pd_backends["p0"].address, pd_backends["p1"].address}
        assert seen and all(s["x-prefiller-host-port"] in prefill_addrs for s in seen)
        # streaming through the real openai client: every token chunk arrives, in order
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        chunks = list(client.completions.create(model="fake/model", prompt="hi there", max_tokens=12, stream=True))
        assert len(chunks) == 12 and all(c.choices[0].text.strip().startswith("w") for c in chunks)
        chat = client.chat.completions.create(model="fake/model", messages=[{"role": "user", "content": "yo"}],
                                              max_tokens=4)
        assert chat.choices[0].message.content.count("w") == 4
        # router's own metrics
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{rt.router.opts.metrics_port}/metrics").read().decode()
        assert "wideep_router_scheduling_duration_seconds_count" in text
        assert 'wideep_router_picks_total{endpoint="d0",profile="decode"}' in text or \
               'wideep_router_picks_total{endpoint="d1",profile="decode"}' in text


PREFIX_CONFIG = """
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: prefix-cache-scorer
  parameters: {blockSizeTokens: 16}
- type: active-request-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: active-request-scorer, weight: 1}
"""


def test_prefix_affinity_long_shared_prefix_sticks():
    bs = start_backends(["a", "b", "c"])
    try:
        eps = [f"{b.address},name={b.name}" for b in bs]
        with RouterThread(router_options(endpoints=eps, config_text=PREFIX_CONFIG)) as rt:
            port = rt.router.opts.proxy_port
            groups = {}
            for g in range(3):
                prefix = f"system prompt of group {g}: " + "lorem ipsum dolor " * 80
                for i in range(4):
                    st, hdr, _ = post(port, {"model": "m", "prompt": prefix + f" question {i}", "max_tokens": 1})
                    assert st == 200
                    groups.setdefault(g, []).append(hdr["x-backend-name"])
            for g, names in groups.items():
                assert len(set(names)) == 1, groups     # every request of a group hits one endpoint
    finally:
        for b in bs:
            b.kill()


def test_killed_backend_leaves_pool_and_no_request_fails():
    bs = start_backends(["a", "b"])
    try:
        eps = [f"{b.address},name={b.name}" for b in bs]
        with RouterThread(router_options(endpoints=eps, staleness_s=0.5,
                                         config_text="plugins: [{type: random-picker}]")) as rt:
            port = rt.router.opts.proxy_port
            names = {post(port, {"model": "m", "prompt": "x", "max_tokens": 1})[1]["x-backend-name"] for _ in range(20)}
            assert names == {"a", "b"}
            bs[0].kill()
            time.sleep(2 * 0.5)                       # two staleness periods
            assert [e.name for e in rt.router.datastore.ready()] == ["b"]
            results = [post(port, {"model": "m", "prompt": "x", "max_tokens": 1}) for _ in range(20)]
            assert all(st == 200 and h["x-backend-name"] == "b" for st, h, _ in results)
    finally:
        for b in bs:
            b.kill()


def test_no_live_endpoint_503_and_saturated_429():
    from wideep.utils.net import free_port

    dead = f"127.0.0.1:{free_port()}"
    with RouterThread(router_options(endpoints=[dead])) as rt:
        st, hdr, body = post(rt.router.opts.proxy_port, {"model": "m", "prompt": "x"})
        assert st == 503
        err = json.loads(body)["error"]
        assert err["code"] == 503 and "no ready endpoint" in err["message"]
        assert err["type"] == "ServiceUnavailableError" and {k.lower(): v for k, v in hdr.items()}["retry-after"] == "1"   # an outage, not throttling

    (b,) = start_backends(["slow"], ttft=1.5)
    cfg = ("featureGates: [flowControl]\nflowControl: {maxQueueSize: 0, maxInflightPerEndpoint: 1}\n"
           "plugins: [{type: queue-scorer}]\n")
    try:
        with RouterThread(router_options(endpoints=[b.address], config_text=cfg)) as rt:
            port = rt.router.opts.proxy_port
            first = {}
            t = threading.Thread(target=lambda: first.update(r=post(port, {"model": "m", "prompt": "x", "max_tokens": 1})))
            t.start()
            deadline = time.monotonic() + 10
            while rt.router.datastore.all()[0].inflight_requests == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            st, hdr, body = post(port, {"model": "m", "prompt": "y", "max_tokens": 1})
            assert st == 429
            assert hdr["x-llm-d-request-dropped-reason"] == "rejected-saturated"
            assert json.loads(body)["error"]["type"] == "RateLimitError"
            t.join(20)
            assert first["r"][0] == 200
    finally:
        b.kill()


def test_filter_leaving_nothing_is_429():
    (b,) = start_backends(["d"])
    cfg = "plugins: [{type: prefill-filter}]\n"
    try:
        with RouterThread(router_options(endpoints=[f"{b.address},role=decode"], config_text=cfg)) as rt:
            st, hdr, _ = post(rt.router.opts.proxy_port, {"model": "m", "prompt": "x"})
            assert st == 429 and hdr["x-llm-d-request-dropped-reason"] == "rejected-saturated"
    finally:
        b.kill()
