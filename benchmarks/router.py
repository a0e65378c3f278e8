"""Router benchmark (CPU): scheduling latency vs pool size, and the latency/throughput a request
pays for going through the built-in proxy or Envoy+ext_proc instead of straight to the backend.

    .venv/bin/python benchmarks/router.py                 # full run (~1-2 min on 2 cores)
    .venv/bin/python benchmarks/router.py --quick         # smoke run
    .venv/bin/python benchmarks/router.py --profile 256   # cProfile of scheduling at 256 endpoints

Compare with llm-d's Go EPP: scheduler P50 0.10-0.20 ms (llm-d's published EPP numbers).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE = ROOT / "tests" / "fake_openai_server.py"


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q / 100 * len(xs)))]


# ---- 1. scheduling latency ----------------------------------------------------------------------
def scheduling_latency(n_endpoints: int, iters: int) -> dict:
    import random

    from wideep.router.config import default_config_text, load_config_text
    from wideep.router.datastore import Datastore
    from wideep.router.director import Director
    from wideep.router.types import ROLE_LABEL, Endpoint

    cfg = load_config_text(default_config_text())
    ds = Datastore()
    eps = []
    for i in range(n_endpoints):
        e = Endpoint(name=f"pod{i // 8}-rank-{i % 8}", address=f"10.0.{i // 250}.{i % 250}:{8000 + i % 8}",
                     labels={ROLE_LABEL: "prefill" if i % 2 else "decode"})
        e.healthy, e.metrics.updated_at = True, time.monotonic() + 3600
        e.metrics.waiting, e.metrics.kv_usage = random.randrange(5), random.random()
        eps.append(e)
    ds.set_endpoints(eps)
    director = Director(cfg, ds)
    rng = random.Random(0)
    systems = [f"system prompt {g}: " + "lorem ipsum dolor sit amet " * 60 for g in range(16)]  # ~1.7 KB
    times = []
    for i in range(iters):
        body = json.dumps({"model": "deepseek-ai/DeepSeek-R1", "prompt": rng.choice(systems) + f" q{i}",
                           "max_tokens": 64}).encode()
        t0 = time.perf_counter()
        req = director.parse_request(body, {}, "/v1/completions")
        d = director.schedule(req)
        times.append(time.perf_counter() - t0)
        director.finish(d)
    return {"endpoints": n_endpoints, "iters": iters, "p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3}


# ---- 2. proxy overhead ---------------------------------------------------------------------------
def free_port():
    sys.path.insert(0, str(ROOT))
    from wideep.utils.net import free_port as fp

    return fp()


def wait_http(url, timeout=60, ok=(200,)):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status in ok:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


async def sequential(port, n):
    import aiohttp

    body = {"model": "fake/model", "prompt": "hello world " * 50, "max_tokens": 1}
    lat = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 20):
            t0 = time.perf_counter()
            async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                await r.read()
                assert r.status == 200, r.status
            if i >= 20:
                lat.append(time.perf_counter() - t0)
    return lat


async def throughput(port, seconds, concurrency):
    import aiohttp

    body = {"model": "fake/model", "prompt": "hello world " * 50, "max_tokens": 1}
    done = errors = 0
    stop = time.perf_counter() + seconds

    async def worker(s):
        nonlocal done, errors
        while time.perf_counter() < stop:
            async with s.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as r:
                await r.read()
                if r.status == 200:
                    done += 1
                else:
                    errors += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        return done / (time.perf_counter() - t0), errors


def proxy_overhead(n_seq, seconds, concurrency):
    py = sys.executable
    procs = []
    results = []
    try:
        bport = free_port()
        procs.append(subprocess.Popen([py, str(FAKE), "--port", str(bport), "--ttft", "0", "--prefill-per-tok", "0",
                                       "--itl", "0", "--max-seconds", "900"], stdout=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{bport}/health")
        targets = [("direct", bport, None)]
        for mode in ("builtin", "envoy"):
            port = free_port()
            args = [py, "-m", "wideep", "router", "--endpoint", f"127.0.0.1:{bport}", "--host", "127.0.0.1",
                    "--port", str(port), "--grpc-port", str(free_port()), "--grpc-health-port", str(free_port()),
                    "--metrics-port", str(free_port()), "--envoy-admin-port", str(free_port()),
                    "--config-text", "plugins: [{type: queue-scorer}, {type: prefix-cache-scorer}]",
                    "--log-level", "WARNING"] + (["--envoy"] if mode == "envoy" else [])
            targets.append((mode, port, args))
        for name, port, args in targets:
            p = None
            if args:
                p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL)
                procs.append(p)
                wait_http(f"http://127.0.0.1:{port}/v1/models")
            lat = asyncio.run(sequential(port, n_seq))
            rps, errs = asyncio.run(throughput(port, seconds, concurrency))
            results.append({"path": name, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                            "max_rps": rps, "errors": errs})
            if p is not None:
                p.terminate()
                p.wait(20)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
    direct = results[0]
    for r in results:
        r["added_p50_ms"] = r["p50_ms"] - direct["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - direct["p99_ms"]
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--profile", type=int, metavar="N", help="only profile scheduling with N endpoints")
    a = ap.parse_args()
    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.runcall(scheduling_latency, a.profile, 2000)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    iters = 300 if a.quick else 3000
    sched = [scheduling_latency(n, iters) for n in (8, 64, 256)]
    print("scheduling latency (wide-ep-lws config, ~1.7 KB prompts, 16 shared prefixes):")
    for r in sched:
        print(f"  {r['endpoints']:4d} endpoints: p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms")
    prox = proxy_overhead(100 if a.quick else 500, 2 if a.quick else 5, 16 if a.quick else 32)
    print("proxy overhead (fake backend, non-streaming, max_tokens=1):")
    for r in prox:
        print(f"  {r['path']:8s} p50 {r['p50_ms']:.2f} ms (+{r['added_p50_ms']:.2f})  p99 {r['p99_ms']:.2f} ms "
              f"(+{r['added_p99_ms']:.2f})  max {r['max_rps']:.0f} req/s  errors {r['errors']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"scheduling": sched, "proxy": prox}, indent=1))


if __name__ == "__main__":
    main()
