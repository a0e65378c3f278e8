"""P/D end to end with real processes on loopback: a prefill `wideep serve` (kv_producer, DP=2), a
decode `wideep serve` (kv_consumer, DP=2, kv_load_failure_policy=fail) and `wideep sidecar`s in
front of the decode ranks, queried with the real openai client.

"Aggregated" output is the same request sent through the sidecar without the prefiller header, so
the decode rank computes the prompt itself (prefix caching is off on the decode server so the two
runs cannot share blocks).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from wideep.utils.net import free_port, free_port_range

BLOCK = 16
DP = 2
STARTUP_S = 600.0


def _http(url: str, body: dict | None = None, headers: dict | None = None, timeout: float = 60.0):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _usage(port: int) -> float:
    _, text = _http(f"http://127.0.0.1:{port}/metrics", timeout=30)
    m = re.search(r'^vllm:kv_cache_usage_perc\{[^}]*\} ([0-9.e+-]+)$', text, re.M)
    assert m, "no vllm:kv_cache_usage_perc in /metrics"
    return float(m.group(1))


def _wait_usage_zero(ports: list[int], limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        usage = {p: _usage(p) for p in ports}
        if all(u == 0 for u in usage.values()):
            return
        assert time.monotonic() < deadline, f"KV blocks still in use: {usage}"
        time.sleep(0.2)


def _wait_ready(procs: dict[str, subprocess.Popen], urls: list[str], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    pending = list(urls)
    while pending:
        for name, p in procs.items():
            assert p.poll() is None, f"{name} exited with {p.returncode}:\n{p.stdout.read().decode()[-3000:]}"
        try:
            if _http(pending[0], timeout=5)[0] == 200:
                pending.pop(0)
                continue
        except OSError:
            pass
        assert time.monotonic() < deadline, f"not ready in time: {pending}"
        time.sleep(0.5)


def _stop(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.terminate()
    for p in procs.values():
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


class Stack:
    def __init__(self, model_dir, tmp_path, serve_extra: list[str] | None = None, transport: str = "nixl"):
        self.model = str(model_dir)
        self.transport = transport
        self.serve_extra = serve_extra or []
        self.p_port, self.d_port, self.s_port, self.s2_port = (free_port_range(DP) for _ in range(4))
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_dir = tmp_path
        self.dead = free_port()   # a prefiller address nobody listens on

    def _serve(self, name: str, port: int, role: str, extra: list[str], env_extra: dict[str, str]):
        env = {**os.environ, "WIDEEP_KV_SIDE_CHANNEL_PORT": str(free_port_range(DP)),
               "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "WIDEEP_KV_SIDE_CHANNEL_LISTEN_HOST": "127.0.0.1",
               "UCX_NET_DEVICES": "lo", **env_extra}
        kv = {"kv_connector": "NixlConnector", "kv_role": role, "kv_load_failure_policy": "fail",
              "kv_connector_extra_config": {"transport": self.transport}}
        cmd = [sys.executable, "-m", "wideep", "serve", self.model, "--host", "127.0.0.1", "--port", str(port),
               "--data-parallel-size", str(DP), "--block-size", str(BLOCK), "--kv-cache-memory-bytes", "4M",
               "--max-model-len", "512", "--enforce-eager", "--kv-transfer-config", json.dumps(kv), *extra,
               *[a.replace("{rpc}", str(free_port())) for a in self.serve_extra]]
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def sidecar(self, name: str, port: int, *extra: str):
        cmd = [sys.executable, "-m", "wideep", "sidecar", "--host", "127.0.0.1", "--port", str(port),
               "--vllm-port", str(self.d_port), "--data-parallel-size", str(DP), *extra]
        self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def start(self):
        # A short producer timeout so the "nobody reads" path is observable within the test.
        self._serve("prefill", self.p_port, "kv_producer", [], {"VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "3"})
        self._serve("decode", self.d_port, "kv_consumer", ["--no-enable-prefix-caching"], {})
        allow = ",".join(f"127.0.0.1:{self.p_port + i}" for i in range(DP))
        self.sidecar("sidecar", self.s_port, "--prefiller-allowlist", allow + f",127.0.0.1:{self.dead}",
                     "--enable-prefiller-sampling")
        self.sidecar("sidecar-err", self.s2_port, "--prefiller-allowlist", "127.0.0.1", "--on-prefill-failure", "error")
        urls = [f"http://127.0.0.1:{p + i}/v1/models" for p in (self.p_port, self.d_port) for i in range(DP)]
        urls += [f"http://127.0.0.1:{p + i}/sidecar/stats" for p in (self.s_port, self.s2_port) for i in range(DP)]
        _wait_ready(self.procs, urls, STARTUP_S)

    def all_server_ports(self) -> list[int]:
        return [p + i for p in (self.p_port, self.d_port) for i in range(DP)]

    def sidecar_stats(self, port: int) -> dict:
        return json.loads(_http(f"http://127.0.0.1:{port}/sidecar/stats")[1])


def _nixl_or_skip() -> str:
    from wideep.kv_transfer.nixl import nixl_available
    if not nixl_available():
        pytest.skip("NIXL is not installed (pip install 'wideep[nixl]')")
    return "nixl"


# NIXL by default (what NixlConnector selects when installed); the TCP side channel is the opt-in twin.
@pytest.fixture(scope="module", params=["nixl", pytest.param("tcp", marks=pytest.mark.slow)])
def stack(request, tiny_model_dir, tmp_path_factory):
    transport = _nixl_or_skip() if request.param == "nixl" else "tcp"
    s = Stack(tiny_model_dir, tmp_path_factory.mktemp("pd"), transport=transport)
    try:
        s.start()
        yield s
    finally:
        _stop(s.procs)


def _client(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)


def _complete(port: int, prompt, stream: bool, headers: dict | None = None, max_tokens: int = 6) -> str:
    c = _client(port)
    kw = dict(model=c.models.list().data[0].id, prompt=prompt, max_tokens=max_tokens, temperature=0,
              extra_headers=headers or {})
    if not stream:
        r = c.completions.create(**kw)
        assert r.choices[0].finish_reason == "length"
        return r.choices[0].text
    text = ""
    for chunk in c.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            text += chunk.choices[0].text
    return text


@pytest.mark.parametrize("plen", [5, 40])
@pytest.mark.parametrize("stream", [False, True])
def test_pd_equals_aggregated_on_both_ranks(stack, plen, stream):
    for rank in range(DP):
        prompt = [(i * 53 + 17 * rank + plen) % 800 + 5 for i in range(plen)]
        port = stack.s_port + rank
        before = stack.sidecar_stats(port)
        hdr = {"x-prefiller-host-port": f"127.0.0.1:{stack.p_port + rank}"}
        pd = _complete(port, prompt, stream, hdr)
        agg = _complete(port, prompt, stream)
        assert pd == agg and pd
        after = stack.sidecar_stats(port)
        assert after["pd_requests"] == before["pd_requests"] + 1
        assert after["local_prefill_fallbacks"] == before["local_prefill_fallbacks"]
    # The decode ranks read the held blocks (policy fail: a failed read would have been an error).
    _wait_usage_zero(stack.all_server_ports(), limit_s=15)
    if stack.transport == "nixl":   # the reads went over NIXL, counted under vLLM's metric names
        for rank in range(DP):
            _, text = _http(f"http://127.0.0.1:{stack.d_port + rank}/metrics", timeout=30)
            m = re.search(r'^vllm:nixl_xfer_time_seconds_count\{[^}]*\} ([0-9.e+-]+)$', text, re.M)
            assert m and float(m.group(1)) >= 1, "no NIXL transfers in the decode rank's /metrics"


def test_pd_chat_with_prefiller_sampling(stack):
    c = _client(stack.s_port + 1)
    model = c.models.list().data[0].id
    hosts = ",".join(f"127.0.0.1:{stack.p_port + i}" for i in range(DP))
    msgs = [{"role": "user", "content": "tell me about the weather in the mountains today please"}]
    pd = c.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0,
                                   extra_headers={"x-prefiller-host-port": hosts})
    agg = c.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
    assert pd.choices[0].message.content == agg.choices[0].message.content
    _wait_usage_zero(stack.all_server_ports(), limit_s=15)


def test_prefill_host_down_falls_back_to_local_prefill(stack):
    prompt = list(range(30, 60))
    before = stack.sidecar_stats(stack.s_port)
    got = _complete(stack.s_port, prompt, False, {"x-prefiller-host-port": f"127.0.0.1:{stack.dead}"})
    assert got == _complete(stack.s_port, prompt, False)
    assert stack.sidecar_stats(stack.s_port)["local_prefill_fallbacks"] == before["local_prefill_fallbacks"] + 1
    _wait_usage_zero(stack.all_server_ports())


def test_prefill_host_down_with_error_policy_is_502(stack):
    status, body = _http(f"http://127.0.0.1:{stack.s2_port}/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3},
                         {"x-prefiller-host-port": f"127.0.0.1:{free_port()}"})
    assert status == 502
    err = json.loads(body)["error"]
    assert err["code"] == 502 and "prefill on 127.0.0.1:" in err["message"]
    _wait_usage_zero(stack.all_server_ports())


def test_prefiller_outside_allowlist_is_403(stack):
    status, body = _http(f"http://127.0.0.1:{stack.s_port}/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 3},
                         {"x-prefiller-host-port": "127.0.0.1:9"})
    assert status == 403
    err = json.loads(body)["error"]
    assert err["type"] == "PermissionDeniedError" and err["param"] == "x-prefiller-host-port"


def test_kv_read_failure_is_a_clear_error_and_frees_both_sides(stack):
    """Decode rank given params whose producer is gone (a restarted engine id): policy fail → 500."""
    prompt = list(range(100, 140))
    leg = {"prompt": prompt, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    status, body = _http(f"http://127.0.0.1:{stack.p_port}/v1/completions", leg)
    assert status == 200
    params = json.loads(body)["kv_transfer_params"]
    assert params["remote_engine_id"].endswith("_dp0") and _usage(stack.p_port) > 0
    bad = dict(params, remote_engine_id="restarted_dp0")
    status, body = _http(f"http://127.0.0.1:{stack.d_port}/v1/completions",
                         {"prompt": prompt, "max_tokens": 4, "kv_transfer_params": bad})
    assert status >= 500
    msg = json.loads(body)["error"]["message"]
    assert "KV read" in msg and "restarted" in msg
    # The consumer frees its blocks at once; the producer, never read, frees them at its 3 s timeout.
    _wait_usage_zero([stack.d_port + i for i in range(DP)], limit_s=5)
    _wait_usage_zero(stack.all_server_ports(), limit_s=15)


def test_unread_blocks_are_freed_after_the_producer_timeout(stack):
    status, body = _http(f"http://127.0.0.1:{stack.p_port + 1}/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 1,
                          "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}})
    assert status == 200 and json.loads(body)["kv_transfer_params"]["do_remote_prefill"] is True
    assert _usage(stack.p_port + 1) > 0
    _wait_usage_zero(stack.all_server_ports(), limit_s=15)


@pytest.mark.slow
def test_pd_with_expert_parallel_groups(tiny_model_dir, tmp_path):
    """Both roles as EP groups (DP=2 lockstep, experts split): P/D still equals aggregated on both ranks."""
    s = Stack(tiny_model_dir, tmp_path, ["--enable-expert-parallel", "--data-parallel-rpc-port", "{rpc}"])
    try:
        s.start()
        for rank in range(DP):
            prompt = [(i * 29 + rank) % 700 + 9 for i in range(37)]
            hdr = {"x-prefiller-host-port": f"127.0.0.1:{s.p_port + rank}"}
            assert _complete(s.s_port + rank, prompt, True, hdr) == _complete(s.s_port + rank, prompt, True)
            assert s.sidecar_stats(s.s_port + rank)["local_prefill_fallbacks"] == 0
        _wait_usage_zero(s.all_server_ports(), limit_s=15)
    finally:
        _stop(s.procs)


def test_pd_sampling_features_equal_aggregated(stack):
    """n with per-choice seeds, logprobs, penalties and min_p give the same result through P/D."""
    port = stack.s_port
    c = _client(port)
    kw = dict(model=c.models.list().data[0].id, prompt=[(i * 31) % 700 + 9 for i in range(40)], max_tokens=6,
              temperature=1.0, seed=11, n=2, logprobs=2, presence_penalty=0.5, frequency_penalty=0.3,
              extra_body={"repetition_penalty": 1.2, "min_p": 0.05})
    pd = c.completions.create(extra_headers={"x-prefiller-host-port": f"127.0.0.1:{stack.p_port}"}, **kw)
    agg = c.completions.create(**kw)
    assert [ch.text for ch in pd.choices] == [ch.text for ch in agg.choices]
    for a, b in zip(pd.choices, agg.choices):
        assert a.logprobs.tokens == b.logprobs.tokens
        assert a.logprobs.token_logprobs == pytest.approx(b.logprobs.token_logprobs, abs=1e-3)
    _wait_usage_zero(stack.all_server_ports(), limit_s=15)


@pytest.mark.slow
def test_pd_structured_output_equals_aggregated(tiny_byte_model_dir, tmp_path):
    """A JSON-schema request through P/D (the decode leg enforces the grammar from its first token)
    equals the aggregated one and validates. Fast siblings: the structured-output tests against one
    server and test_pd_sampling_features_equal_aggregated."""
    pytest.importorskip("xgrammar")
    import jsonschema

    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "b": {"type": "string", "maxLength": 6}},
              "required": ["a", "b"], "additionalProperties": False}
    s = Stack(tiny_byte_model_dir, tmp_path)
    try:
        s.start()
        for rank in range(DP):
            c = _client(s.s_port + rank)
            kw = dict(model=c.models.list().data[0].id, messages=[{"role": "user", "content": "the sea " * 10}],
                      max_tokens=60, temperature=1.0, seed=rank,
                      response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
            # Aggregated first, and once on the prefiller: each rank builds its grammar engine and compiles
            # the schema on its first constrained request, which must not eat the producer's short
            # (3 s here) hold timeout.
            agg = c.chat.completions.create(**kw).choices[0].message.content
            _client(s.p_port + rank).chat.completions.create(**kw)
            pd = c.chat.completions.create(extra_headers={"x-prefiller-host-port": f"127.0.0.1:{s.p_port + rank}"},
                                           **kw).choices[0].message.content
            assert pd == agg
            jsonschema.validate(json.loads(pd), schema)
            assert s.sidecar_stats(s.s_port + rank)["local_prefill_fallbacks"] == 0
        _wait_usage_zero(s.all_server_ports(), limit_s=15)
    finally:
        _stop(s.procs)
