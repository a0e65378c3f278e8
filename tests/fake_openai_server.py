"""Tiny fake OpenAI-compatible streaming server (loopback only, self-terminating).
Emulates: TTFT = ttft_base + prompt_tokens*prefill_per_tok ; then one token every --itl seconds.
Tokens are words 'wN' separated by spaces (one token per SSE chunk, or --tokens-per-chunk).
Shared by the bench and router tests (and benchmarks/router.py).
Bench flags: --fail-every N answers every Nth request with --fail-status and an OpenAI error body;
--disconnect-every N drops the connection of every Nth stream after --disconnect-after tokens.
Router flags: every response carries `x-backend-name: <--name>`; GET /stats returns the counters and
the request headers the router added (x-prefiller-host-port, x-gateway-destination-endpoint)."""
import argparse
import asyncio
import json
import os
import random
import time
from aiohttp import web

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, default=18000)
p.add_argument("--model", default="fake/model")
p.add_argument("--ttft", type=float, default=0.02)
p.add_argument("--prefill-per-tok", type=float, default=0.00002)
p.add_argument("--itl", type=float, default=0.01)
p.add_argument("--max-seconds", type=float, default=240)
p.add_argument("--tokens-per-chunk", type=int, default=1)
p.add_argument("--fail-every", type=int, default=0)
p.add_argument("--fail-status", type=int, default=504)
p.add_argument("--disconnect-every", type=int, default=0)
p.add_argument("--disconnect-after", type=int, default=3)
p.add_argument("--name", default="backend")
a = p.parse_args()
STATS = {"requests": 0, "running": 0, "gen_tokens": 0, "prompt_tokens": 0}
SEEN = []
ID = {"x-backend-name": a.name}

def ntok(text):
    return len(text.split())

def prompt_text(body, chat):
    if chat:
        msgs = body.get("messages", [])
        out = []
        for m in msgs:
            c = m.get("content", "")
            if isinstance(c, list):
                c = " ".join(x.get("text", "") for x in c if isinstance(x, dict))
            out.append(c)
        return " ".join(out)
    pr = body.get("prompt", "")
    return pr if isinstance(pr, str) else " ".join(map(str, pr))

async def gen(request, chat):
    body = await request.json()
    SEEN.append({k: request.headers.get(k) for k in ("x-prefiller-host-port", "x-gateway-destination-endpoint")})
    pt = ntok(prompt_text(body, chat))
    n = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
    stream = bool(body.get("stream"))
    usage_in_stream = bool((body.get("stream_options") or {}).get("include_usage"))
    rid = f"cmpl-{random.getrandbits(48):x}"
    created = int(time.time())
    model = body.get("model", a.model)
    obj = "chat.completion.chunk" if chat else "text_completion"
    STATS["requests"] += 1; STATS["running"] += 1; STATS["prompt_tokens"] += pt
    nth = STATS["requests"]
    try:
        if a.fail_every and nth % a.fail_every == 0:
            return web.json_response({"error": {"message": f"injected failure {a.fail_status}", "type": "server_error",
                                                "param": None, "code": a.fail_status}}, status=a.fail_status,
                                     headers=ID)
        drop = bool(a.disconnect_every and nth % a.disconnect_every == 0)
        await asyncio.sleep(a.ttft + pt * a.prefill_per_tok)
        words = [f"w{random.randrange(4000)}" for _ in range(n)]
        usage = {"prompt_tokens": pt, "completion_tokens": n, "total_tokens": pt + n}
        if not stream:
            await asyncio.sleep(a.itl * max(0, n - 1))
            text = " ".join(words)
            STATS["gen_tokens"] += n
            if chat:
                ch = [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}]
            else:
                ch = [{"index": 0, "text": text, "finish_reason": "length", "logprobs": None}]
            return web.json_response({"id": rid, "object": "chat.completion" if chat else "text_completion",
                                      "created": created, "model": model, "choices": ch, "usage": usage},
                                     headers=ID)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **ID})
        await resp.prepare(request)
        async def send(d):
            await resp.write(b"data: " + json.dumps(d).encode() + b"\n\n")
        if chat:
            await send({"id": rid, "object": obj, "created": created, "model": model,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        k = max(1, a.tokens_per_chunk)
        groups = [" ".join(words[j:j + k]) for j in range(0, n, k)]
        try:
            for i, w in enumerate(groups):
                if i:
                    await asyncio.sleep(a.itl * k)
                if drop and i * k >= a.disconnect_after:
                    STATS["dropped"] = STATS.get("dropped", 0) + 1
                    request.transport.close()  # mid-stream disconnect: no [DONE], truncated chunked body
                    return resp
                piece = w if i == 0 else " " + w
                fin = "length" if i == len(groups) - 1 else None
                c = {"index": 0, "delta": {"content": piece}, "finish_reason": fin} if chat else \
                    {"index": 0, "text": piece, "finish_reason": fin, "logprobs": None}
                await send({"id": rid, "object": obj, "created": created, "model": model, "choices": [c]})
                STATS["gen_tokens"] += len(w.split())
            if usage_in_stream:
                await send({"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:  # client went away mid-stream (guidellm does this at the end of each benchmark)
            STATS["aborted"] = STATS.get("aborted", 0) + 1
        return resp
    finally:
        STATS["running"] -= 1

async def completions(r): return await gen(r, False)
async def chat(r): return await gen(r, True)
async def models(r):
    return web.json_response({"object": "list", "data": [{"id": a.model, "object": "model", "owned_by": "fake", "max_model_len": 32768}]}, headers=ID)
async def stats(r):
    return web.json_response({**STATS, "seen": SEEN[-50:]}, headers=ID)
async def health(r): return web.Response(text="ok", headers=ID)
async def metrics(r):
    txt = (f'vllm:num_requests_running{{model_name="{a.model}"}} {STATS["running"]}\n'
           f'vllm:num_requests_waiting{{model_name="{a.model}"}} 0\n'
           f'vllm:kv_cache_usage_perc{{model_name="{a.model}"}} 0.1\n'
           f'vllm:cache_config_info{{block_size="16",num_gpu_blocks="1000"}} 1\n'
           f'vllm:generation_tokens_total{{model_name="{a.model}"}} {STATS["gen_tokens"]}\n'
           f'vllm:prompt_tokens_total{{model_name="{a.model}"}} {STATS["prompt_tokens"]}\n')
    return web.Response(text=txt, content_type="text/plain")

async def main():
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", a.port, backlog=4096).start()
    print(f"fake server on 127.0.0.1:{a.port} pid={os.getpid()} (exits after {a.max_seconds}s)", flush=True)
    await asyncio.sleep(a.max_seconds)
    print("stats", STATS, flush=True)
    await runner.cleanup()

asyncio.run(main())
