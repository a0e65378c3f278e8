"""A real `wideep serve` (tiny model, 2 DP ranks = one EP group, ports port+0/port+1) driven by the official openai client,
raw HTTP, prometheus_client's parser and a ZMQ SUB client."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from wideep.engine.api import BlockStored
from wideep.engine.block_hash import hash_prompt_blocks
from wideep.engine.kv_events import decode_batch
from wideep.utils.net import free_port_range

from server_harness import API_KEY, http, start_server, stop_server

BLOCK = 16


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """2 DP ranks that form one EP group (experts split, DP lockstep), as the wide-EP pods run."""
    side = free_port_range(2)
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("serve"), dp_size=2,
                       extra_args=["--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_both"}',
                                   "--enable-expert-parallel", "--data-parallel-rpc-port", str(free_port_range(1))],
                       env={"WIDEEP_KV_SIDE_CHANNEL_PORT": str(side), "VLLM_NIXL_ABORT_REQUEST_TIMEOUT": "30"})
    try:
        yield srv
    finally:
        stop_server(srv)


def client(server, rank=0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url(rank) + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def metrics(server, rank=0) -> dict[tuple[str, tuple], float]:
    status, _, body = http("GET", server.url(rank) + "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict, name: str, **labels) -> float:
    for (n, lab), v in m.items():
        if n == name and all(dict(lab).get(k) == val for k, val in labels.items()):
            return v
    raise KeyError(f"{name} {labels} not in metrics")


# ---- the OpenAI surface ---------------------------------------------------------------------------
def test_models_on_both_ranks_and_supervisor_health(server):
    for rank in range(2):
        models = client(server, rank).models.list()
        assert [m.id for m in models.data] == ["tiny"]
        status, _, body = http("GET", server.url(rank) + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        d = json.loads(body)["data"][0]
        assert d["object"] == "model" and d["owned_by"] == "vllm" and d["max_model_len"] == 512
        assert d["parent"] is None and d["root"]
        assert http("GET", server.url(rank) + "/health")[0] == 200
    status, _, body = http("GET", f"http://127.0.0.1:{server.supervisor_port}/health")
    assert status == 200 and json.loads(body)["down"] == []
    assert set(json.loads(body)["ranks"]) == {"0", "1"}
    status, _, body = http("GET", server.url(0) + "/version")
    assert status == 200 and "version" in json.loads(body)


@pytest.mark.parametrize("rank", [0, 1])
def test_completion_non_stream(server, rank):
    r = client(server, rank).completions.create(model="tiny", prompt="hello world the", max_tokens=7,
                                                temperature=0)
    assert r.object == "text_completion"
    c = r.choices[0]
    assert c.finish_reason == "length" and c.text and c.index == 0
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens == len(json.loads(http("POST", server.url(rank) + "/tokenize",
                                                        {"prompt": "hello world the"})[2])["tokens"])
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_completion_stream_shape_and_usage(server):
    stream = client(server).completions.create(model="tiny", prompt="one two three", max_tokens=6, stream=True,
                                               stream_options={"include_usage": True}, temperature=0)
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.object == "text_completion" for c in chunks)
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert len(content) == 6  # one chunk per generated step
    text = "".join(c.choices[0].text for c in content)
    full = client(server).completions.create(model="tiny", prompt="one two three", max_tokens=6, temperature=0)
    assert text == full.choices[0].text  # greedy: streamed text equals the non-streamed one
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stream_raw_sse_and_request_id(server):
    """Exact wire shape: data: lines, finish_reason on the last content chunk, usage chunk, [DONE]."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    status, headers, raw = http("POST", server.url(1) + "/v1/chat/completions", body,
                                headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "req-xyz"})
    assert status == 200 and headers["X-Request-Id"] == "req-xyz"
    assert headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["id"] == "chatcmpl-req-xyz" and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks[1:] if c["choices"]]
    assert len(content) == 3 and content[-1]["choices"][0]["finish_reason"] == "length"
    assert [c["usage"]["completion_tokens"] for c in content] == [1, 2, 3]  # continuous usage
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat_non_stream_and_stream(server):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = client(server, 1).chat.completions.create(model="tiny", messages=msgs, max_completion_tokens=5,
                                                  temperature=0, seed=1)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    chunks = list(client(server, 1).chat.completions.create(model="tiny", messages=msgs, max_tokens=5,
                                                           temperature=0, stream=True,
                                                           stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_token_id_prompt_stop_and_ignore_eos(server):
    ids = list(range(10, 40))
    r = client(server).completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0,
                                          extra_body={"ignore_eos": True, "min_tokens": 2})
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 5
    # A stop string taken from the greedy output ends the request there with stop_reason = the string.
    words = r.choices[0].text.split()
    stop = words[2]
    r2 = client(server).completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0, stop=[stop],
                                           extra_body={"ignore_eos": True})
    if stop not in words[:2]:
        assert r2.choices[0].finish_reason == "stop"
        assert r2.choices[0].model_extra["stop_reason"] == stop
        assert stop not in r2.choices[0].text and r2.usage.completion_tokens == 3


def test_kv_transfer_params_round_trip(server):
    """Prefill on rank 1 (do_remote_decode) returns NixlConnector params; decode on rank 0 pulls the blocks."""
    prompt = list(range(100, 100 + 3 * BLOCK + 3))
    p = client(server, 1).completions.create(
        model="tiny", prompt=prompt, max_tokens=1, temperature=0,
        extra_body={"max_completion_tokens": 1, "kv_transfer_params": {
            "do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
            "remote_block_ids": None, "remote_host": None, "remote_port": None}})
    params = p.model_extra["kv_transfer_params"]
    assert params["do_remote_prefill"] is True and params["do_remote_decode"] is False
    assert params["remote_block_ids"] and params["remote_engine_id"] and params["remote_port"]
    d = client(server, 0).completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                             extra_body={"kv_transfer_params": params})
    assert d.usage.completion_tokens == 4 and d.choices[0].finish_reason == "length"
    ref = client(server, 0).completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0)
    assert d.choices[0].text == ref.choices[0].text


def test_tokenize_detokenize(server):
    status, _, body = http("POST", server.url(0) + "/tokenize", {"model": "tiny", "prompt": "hello world"})
    tok = json.loads(body)
    assert status == 200 and tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    status, _, body = http("POST", server.url(0) + "/detokenize",
                           {"model": "tiny", "tokens": tok["tokens"]})
    assert status == 200 and "hello world" in json.loads(body)["prompt"]


# ---- bad input -------------------------------------------------------------------------------------
BAD = [
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": "nope", "prompt": "hi"}, 404, "model", "does not exist"),
    ({"model": "tiny", "prompt": "hi " * 600}, 400, "prompt", "maximum context length"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 5000}, 400, "max_tokens", "maximum context length"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    ({"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature", ">= 0"),
    ({"model": "tiny", "prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"model": "tiny", "prompt": "hi", "top_k": -2}, 400, "top_k", "top_k"),
    ({"model": "tiny", "prompt": "hi", "n": 0}, 400, "n", ">= 1"),
    ({"model": "tiny", "prompt": "hi", "stream": "yes"}, 400, "stream", "boolean"),
    ({"model": "tiny", "prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"model": "tiny", "prompt": [1, -3]}, 400, "prompt", "token ids"),
    ({"model": "tiny", "prompt": [999999]}, 400, "prompt", "out of range"),
    ({"model": "tiny"}, 400, "prompt", "required"),
    ({"model": "tiny", "prompt": "hi", "stop": [1]}, 400, "stop", "stop"),
    ({"model": "tiny", "prompt": "hi", "seed": 1.5}, 400, "seed", "integer"),
    ({"model": "tiny", "prompt": "hi", "kv_transfer_params": [1]}, 400, "kv_transfer_params", "object"),
]


@pytest.mark.parametrize("body,status,param,text", BAD, ids=[f"{b[1]}-{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_completion_input(server, body, status, param, text):
    got, headers, raw = http("POST", server.url(0) + "/v1/completions", body,
                             headers={"Authorization": f"Bearer {API_KEY}"})
    assert got == status, raw
    err = json.loads(raw)["error"]
    assert err["param"] == param and text in err["message"], err
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status


BAD_CHAT = [
    ({"model": "tiny", "messages": []}, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9999},
     "max_completion_tokens"),
]


@pytest.mark.parametrize("body,param", BAD_CHAT)
def test_bad_chat_input(server, body, param):
    got, _, raw = http("POST", server.url(1) + "/v1/chat/completions", body,
                       headers={"Authorization": f"Bearer {API_KEY}"})
    assert got == 400 and json.loads(raw)["error"]["param"] == param, raw


def test_api_key(server):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 1}
    assert http("POST", server.url(0) + "/v1/completions", body)[0] == 401
    got, _, raw = http("POST", server.url(0) + "/v1/completions", body, headers={"Authorization": "Bearer wrong"})
    assert got == 401 and json.loads(raw)["error"]["code"] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url(1) + "/v1", api_key="wrong", max_retries=0).models.list()
    assert http("GET", server.url(0) + "/health")[0] == 200  # probes need no key


# ---- metrics and KV events -------------------------------------------------------------------------
def test_metrics_parse_and_move(server):
    before = metrics(server, 1)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
        metric(before, name, model_name="tiny", engine="1")
    info = [lab for (n, lab) in before if n == "vllm:cache_config_info"][0]
    assert dict(info)["block_size"] == str(BLOCK) and int(dict(info)["num_gpu_blocks"]) > 0
    client(server, 1).completions.create(model="tiny", prompt="a b c d", max_tokens=5)
    after = metrics(server, 1)
    for name, delta in (("vllm:generation_tokens_total", 5), ("vllm:e2e_request_latency_seconds_count", 1),
                        ("vllm:time_to_first_token_seconds_count", 1), ("vllm:inter_token_latency_seconds_count", 4)):
        assert metric(after, name, engine="1") - metric(before, name, engine="1") == delta, name
    assert (metric(after, "vllm:request_success_total", finished_reason="length", engine="1")
            - metric(before, "vllm:request_success_total", finished_reason="length", engine="1")) == 1
    assert metric(after, "vllm:prompt_tokens_total", engine="1") > metric(before, "vllm:prompt_tokens_total", engine="1")
    assert metric(after, "vllm:prefix_cache_queries_total", engine="1") > 0


def test_kv_events_agree_with_engine_cache(server):
    """BlockStored events on port base+rank carry the prompt's full blocks, chained, with the engine's
    hashes; the same prompt again is a prefix-cache hit of exactly those blocks."""
    rank = 1
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    sub.connect(f"tcp://127.0.0.1:{server.kv_events_port + rank}")
    try:
        time.sleep(0.5)  # let the subscription reach the publisher
        prompt = list(range(1000, 1000 + 4 * BLOCK + 5))
        client(server, rank).completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
        stored: list[BlockStored] = []
        deadline = time.time() + 10
        want = hash_prompt_blocks(prompt, BLOCK)
        while time.time() < deadline and len([h for e in stored for h in e.block_hashes]) < len(want):
            if sub.poll(500):
                topic, seq, payload = sub.recv_multipart()
                assert topic == b"kv@test@tiny" and len(seq) == 8
                ts, events, dp = decode_batch(payload)
                assert dp == rank
                stored += [e for e in events if isinstance(e, BlockStored)]
        hashes = [h for e in stored for h in e.block_hashes]
        assert hashes[:len(want)] == want
        assert stored[0].parent_block_hash is None and stored[0].block_size == BLOCK
        tokens = [t for e in stored for t in e.token_ids]
        assert tokens[:4 * BLOCK] == prompt[:4 * BLOCK]
        hits0 = metric(metrics(server, rank), "vllm:prefix_cache_hits_total", engine=str(rank))
        client(server, rank).completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
        hits1 = metric(metrics(server, rank), "vllm:prefix_cache_hits_total", engine=str(rank))
        assert hits1 - hits0 == 4 * BLOCK
    finally:
        ctx.destroy(linger=0)


# ---- client disconnects ----------------------------------------------------------------------------
def test_100_midstream_disconnects_free_their_blocks(server):
    rank = 0

    def usage():
        m = metrics(server, rank)
        return metric(m, "vllm:kv_cache_usage_perc", engine="0"), metric(m, "vllm:num_requests_running", engine="0")

    base_usage, _ = usage()

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "tiny", "prompt": f"w{i} " * 40, "max_tokens": 300, "stream": True, "ignore_eos": True}
        async with session.post(server.url(rank) + "/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {API_KEY}"}) as resp:
            assert resp.status == 200, await resp.text()
            n = 0
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    n += 1
                    if n >= 2:
                        break   # leave mid-stream: the connection is closed without reading the rest
        # the context exit releases (closes) the connection since the body was not fully read

    async def run():
        conn = aiohttp.TCPConnector(limit=20, force_close=True)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
            for start in range(0, 100, 20):
                await asyncio.gather(*(one(s, i) for i in range(start, start + 20)))

    asyncio.run(run())
    deadline = time.time() + 30
    while time.time() < deadline:
        u, running = usage()
        if u <= base_usage and running == 0:
            break
        time.sleep(0.2)
    assert (u, running) == (base_usage, 0), f"kv usage {u} (baseline {base_usage}), running {running}"
    m = metrics(server, rank)
    assert metric(m, "vllm:request_success_total", finished_reason="abort", engine="0") >= 100
