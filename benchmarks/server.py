"""Frontend cost: decode throughput of `wideep serve` at N concurrent streams vs the engine offline at batch N.

GPU (one H100/H200, layer-slice checkpoint):
    wideep make-model layer-slice --num-moe-layers 1 --out /tmp/layer-slice
    python benchmarks/server.py --model /tmp/layer-slice --concurrency 64 --prompt-len 1024 --output-len 512
CPU smoke run:
    wideep make-model tiny --out /tmp/tiny && python benchmarks/server.py --model /tmp/tiny --concurrency 64 \
        --prompt-len 64 --output-len 64

1. Offline: EngineCore in this process, N requests of prompt-len random ids (ignore_eos, greedy); the
   steady decode rate is N tokens per step while all N decode.
2. Served: a real `wideep serve` (one DP rank) and N concurrent streaming /v1/completions over aiohttp
   with continuous usage stats; the decode rate counts the tokens that arrived while all N streams
   were past their first token and none had finished.
The gap between the two is what the HTTP frontend, detokenization and the ZMQ hop cost.
Prints a markdown table and one JSON line (prefix `JSON `).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request

import aiohttp


def rand_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def offline(args, prompts: list[list[int]]) -> dict:
    import torch

    from wideep.engine.api import EngineRequest, SamplingParams
    from wideep.engine.config import EngineArgs
    from wideep.engine.core import EngineCore

    eargs = EngineArgs(model=args.model, max_model_len=args.prompt_len + args.output_len + 8,
                       max_num_seqs=max(args.concurrency, 1), device=args.device,
                       enforce_eager=args.enforce_eager, kv_cache_memory_bytes=args.kv_cache_memory_bytes)
    core = EngineCore(eargs)

    def sync():
        if core.device.type == "cuda":
            torch.cuda.synchronize(core.device)

    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(f"off{i}", p, sp))
    n = len(prompts)
    steps, decode_t0, decode_steps, tokens = 0, None, 0, 0
    while core.has_unfinished():
        out = core.schedule()
        outs = core.execute(out)
        tokens += sum(len(o.new_token_ids) for o in outs)
        steps += 1
        full_decode = out.is_decode_only and len(out.seqs) == n
        if full_decode and decode_t0 is None:
            sync()
            decode_t0, decode_steps = time.perf_counter(), 0
        elif full_decode:
            decode_steps += 1
            decode_t1 = time.perf_counter()
    sync()
    total = time.perf_counter() - t0
    decode_rate = n * decode_steps / (decode_t1 - decode_t0) if decode_steps else float("nan")
    device = str(core.device)
    del core
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"decode_tok_s": decode_rate, "output_tok_s": tokens / total, "seconds": total, "device": device}


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"wideep serve exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("wideep serve did not become ready")


async def _stream(session, url: str, prompt: list[int], max_tokens: int) -> list[tuple[float, int]]:
    """(arrival time, completion tokens so far) per chunk."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    marks = []
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                d = json.loads(line[6:])
                if d.get("choices") and d.get("usage"):
                    marks.append((time.perf_counter(), d["usage"]["completion_tokens"]))
    return marks


async def _drive(url: str, prompts: list[list[int]], max_tokens: int) -> list[list[tuple[float, int]]]:
    conn = aiohttp.TCPConnector(limit=len(prompts) + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600)) as s:
        return await asyncio.gather(*(_stream(s, url, p, max_tokens) for p in prompts))


def served(args, prompts: list[list[int]]) -> dict:
    from wideep.utils.net import free_port_range

    port = free_port_range(2)
    cmd = [sys.executable, "-m", "wideep", "serve", args.model, "--port", str(port), "--host", "127.0.0.1",
           "--data-parallel-supervisor-port", str(port + 1), "--served-model-name", "bench",
           "--max-model-len", str(args.prompt_len + args.output_len + 8),
           "--max-num-seqs", str(max(args.concurrency, 1)), "--device", args.device]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    if args.kv_cache_memory_bytes:
        cmd += ["--kv-cache-memory-bytes", str(args.kv_cache_memory_bytes)]
    proc = subprocess.Popen(cmd, env={**os.environ, "WIDEEP_LOG_LEVEL": "WARNING"}, start_new_session=True)
    try:
        _wait_ready(f"http://127.0.0.1:{port + 1}/readyz", proc, args.start_timeout)
        url = f"http://127.0.0.1:{port}/v1/completions"
        asyncio.run(_drive(url, prompts[:2], 4))  # warm-up
        t0 = time.perf_counter()
        marks = asyncio.run(_drive(url, prompts, args.output_len))
        total = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    t_a = max(m[0][0] for m in marks)        # every stream has its first token
    t_b = min(m[-1][0] for m in marks)       # no stream has finished yet (its last chunk)

    def tokens_at(m, t):
        return max((c for ts, c in m if ts <= t), default=0)

    window = [tokens_at(m, t_b) - tokens_at(m, t_a) for m in marks]
    decode = sum(window) / (t_b - t_a) if t_b > t_a else float("nan")
    out_tokens = sum(m[-1][1] for m in marks)
    return {"decode_tok_s": decode, "output_tok_s": out_tokens / total, "seconds": total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-memory-bytes", default=None)
    ap.add_argument("--start-timeout", type=float, default=1200)
    ap.add_argument("--skip-offline", action="store_true")
    args = ap.parse_args()
    if args.kv_cache_memory_bytes:
        from wideep.server.args import human_int
        args.kv_cache_memory_bytes = human_int(args.kv_cache_memory_bytes)

    import json as _json
    vocab = _json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    prompts = rand_prompts(args.concurrency, args.prompt_len, vocab)
    off = offline(args, prompts) if not args.skip_offline else {"decode_tok_s": float("nan"),
                                                                 "output_tok_s": float("nan"), "device": args.device}
    srv = served(args, prompts)
    gap = 1 - srv["decode_tok_s"] / off["decode_tok_s"] if off["decode_tok_s"] == off["decode_tok_s"] else float("nan")
    print(f"\n### Frontend cost: {args.concurrency} streams, prompt {args.prompt_len}, output {args.output_len}, "
          f"{off['device']}, model {os.path.basename(args.model.rstrip('/'))}\n")
    print("| path | decode tok/s (all streams decoding) | output tok/s (whole run) |")
    print("|---|---|---|")
    print(f"| engine offline (EngineCore, batch {args.concurrency}) | {off['decode_tok_s']:.1f} | {off['output_tok_s']:.1f} |")
    print(f"| wideep serve (HTTP SSE, {args.concurrency} streams) | {srv['decode_tok_s']:.1f} | {srv['output_tok_s']:.1f} |")
    print(f"\nfrontend cost on decode throughput: {gap * 100:.1f}%\n")
    print("JSON " + json.dumps({"bench": "server", "concurrency": args.concurrency, "prompt_len": args.prompt_len,
                                "output_len": args.output_len, "device": off["device"], "offline": off,
                                "served": srv, "decode_gap": gap}))


if __name__ == "__main__":
    main()
