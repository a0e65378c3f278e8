"""Gateway mode with the real Envoy binary: Envoy -> wideep ext_proc -> ORIGINAL_DST backend."""
from __future__ import annotations

import json

import grpc
import openai
import pytest

from router_helpers import RouterThread, post, router_options, start_backends

pytest.importorskip("envoy.service.ext_proc.v3.external_processor_pb2")

ROLES = {"p0": "prefill", "d0": "decode", "d1": "decode"}
# decode profile prefers the endpoint labelled pick=yes, so the test knows wideep's decision
CONFIG = """
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: disagg-profile-handler
  parameters: {deciders: {prefill: always}}
- {name: always, type: always-disagg-pd-decider}
- type: prefill-filter
- type: decode-filter
- {name: chosen, type: label-selector-filter, parameters: {matchLabels: {pick: "yes"}}}
- type: queue-scorer
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: chosen}, {pluginRef: queue-scorer}]
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    bs = {b.name: b for b in start_backends(list(ROLES))}
    eps = [f"{b.address},role={ROLES[n]},name={n}" + (",label.pick=yes" if n == "d1" else "")
           for n, b in bs.items()]
    opts = router_options(endpoints=eps, config_text=CONFIG, mode="envoy",
                          workdir=str(tmp_path_factory.mktemp("envoy")))
    try:
        with RouterThread(opts) as rt:
            yield rt, bs
    finally:
        for b in bs.values():
            b.kill()


def test_envoy_routes_by_wideep_decision_streaming_intact(gateway):
    rt, bs = gateway
    port = rt.router.opts.proxy_port
    for i in range(4):
        st, hdr, body = post(port, {"model": "fake/model", "prompt": f"hello {i}", "max_tokens": 2})
        assert st == 200, body
        assert hdr["x-backend-name"] == "d1"
    seen = bs["d1"].stats()["seen"]
    assert seen[-1]["x-prefiller-host-port"] == bs["p0"].address
    assert seen[-1]["x-gateway-destination-endpoint"] == bs["d1"].address
    assert bs["d0"].stats()["requests"] == 0
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="fake/model", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=10, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 10 and chunks[-1].usage.completion_tokens == 10
    # a large body (> 128 KB) survives the buffer-and-resend path
    st, hdr, body = post(port, {"model": "fake/model", "prompt": "w " * 200_000, "max_tokens": 1})
    assert st == 200 and json.loads(body)["usage"]["prompt_tokens"] == 200_000


def test_envoy_immediate_response_429_when_filters_leave_nothing(gateway):
    rt, bs = gateway
    for e in rt.router.datastore.all():
        if e.name == "d1":
            e.labels["pick"] = "no"
    try:
        st, hdr, body = post(rt.router.opts.proxy_port, {"model": "m", "prompt": "x"})
        assert st == 429 and hdr["x-llm-d-request-dropped-reason"] == "rejected-saturated"
        assert json.loads(body)["error"]["code"] == 429
    finally:
        for e in rt.router.datastore.all():
            if e.name == "d1":
                e.labels["pick"] = "yes"


def test_grpc_health_services(gateway):
    from wideep.router.grpc_health import SERVING, decode_response, encode_request

    rt, _ = gateway
    with grpc.insecure_channel(f"127.0.0.1:{rt.router.opts.grpc_health_port}") as ch:
        check = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=encode_request,
                               response_deserializer=decode_response)
        for svc in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert check(svc, timeout=5) == SERVING
        with pytest.raises(grpc.RpcError) as ei:
            check("nope", timeout=5)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
