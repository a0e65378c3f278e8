"""EP decode with CUDA graphs: greedy tokens of EP=N (graphs and eager) against EP=1, and decode step time.

Runs the tiny model as real engine processes (wideep.engine.dp.generate_dp: DP lockstep,
one GPU per rank, NCCL) twice, with CUDA graphs and with --enforce-eager, and EP=1 (one engine on
GPU 0) both ways. Prompts are spread unevenly and the last rank starts late, so idle ranks replay
dummy graphs of the agreed size. Decode step time is the lockstep loop's wall time per decode-only
step on rank 0 (agreement + forward + sampling), read from WIDEEP_LOCKSTEP_REPORT.

  GPU (2 GPUs): NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
                timeout 300 python benchmarks/ep_graphs_check.py
                [--backend deepep_low_latency]   (symm_mem_ll: prefill steps past its 256-token
                buffers grow them after the graphs were captured)
                [--profile-kv]   (no KV budget given: the engine profiles a forward at start-up, outside
                the DP lockstep)
  CPU (small):  python benchmarks/ep_graphs_check.py --device cpu --prompts 4 --max-tokens 6
                (no CUDA graphs over gloo: on CPU the graph path runs as eager stand-ins, see
                WIDEEP_STATIC_DECODE_SIZES, so the agreement and padding logic still run)

Prints one line per run and a final `EP_GRAPHS_CHECK PASS` or `EP_GRAPHS_CHECK FAIL: <why>`;
exit code 0 only on PASS. A watchdog ends the whole script (exit 3) at --timeout, whatever hangs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _requests(n: int, max_tokens: int, vocab: int, seed: int = 7):
    import random

    from wideep.engine.api import EngineRequest, SamplingParams

    rng = random.Random(seed)
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [EngineRequest(f"r{i}", [rng.randrange(3, vocab) for _ in range(rng.randrange(4, 40))], sp)
            for i in range(n)]


def _ep1_rank(rank: int, world: int, port: int, args_dict: dict, reqs: list) -> dict:
    """EP=1: one EngineCore in this process; times each decode-only step (sampling syncs the GPU)."""
    from wideep.engine.config import EngineArgs
    from wideep.engine.core import EngineCore

    core = EngineCore(EngineArgs.from_dict(args_dict))
    for r in reqs:
        core.add_request(r)
    tokens: dict[str, list[int]] = {}
    decode_s, decode_n = 0.0, 0
    while core.has_unfinished():
        out = core.schedule()
        t = time.perf_counter()
        for o in core.execute(out):
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        if out.is_decode_only:
            decode_s += time.perf_counter() - t
            decode_n += 1
    return {"tokens": tokens, "graphs": sorted(core.runner.graphs),
            "decode_step_ms": decode_s / decode_n * 1e3 if decode_n else None, "decode_steps": decode_n}


def run_ep1(args_dict: dict, reqs: list, timeout_s: float) -> dict:
    from wideep.parallel.launch import run_ranks

    return run_ranks(_ep1_rank, 1, args=(args_dict, reqs), timeout_s=timeout_s, env=NCCL_ENV,
                     threads_per_rank=0)[0]


def run_epn(args, reqs: list, ep: int, timeout_s: float) -> dict:
    from wideep.engine.dp import generate_dp

    with tempfile.TemporaryDirectory() as d:
        report = Path(d) / "lockstep.jsonl"
        os.environ["WIDEEP_LOCKSTEP_REPORT"] = str(report)
        n = len(reqs)
        # uneven: rank 0 gets half the prompts, the others share the rest; the last rank starts late
        assignment = [0 if i < n // 2 else 1 + i % (ep - 1) for i in range(n)]
        outs = generate_dp(args, reqs, assignment=assignment, start_delay_s={ep - 1: 1.0}, timeout_s=timeout_s)
        ranks = sorted((json.loads(x) for x in report.read_text().splitlines()), key=lambda r: r["rank"]) \
            if report.exists() else []
        del os.environ["WIDEEP_LOCKSTEP_REPORT"]
    tokens = {rid: [t for o in lst for t in o.new_token_ids] for rid, lst in outs.items()}
    return {"tokens": tokens, "ranks": ranks}


def agreement(got: dict[str, list[int]], ref: dict[str, list[int]]) -> tuple[int, float]:
    """(requests with identical tokens, mean fraction of each request's tokens before the first difference)."""
    same, prefix = 0, 0.0
    for rid, want in ref.items():
        have = got.get(rid, [])
        k = 0
        while k < min(len(have), len(want)) and have[k] == want[k]:
            k += 1
        same += int(have == want)
        prefix += k / max(1, len(want))
    return same, prefix / max(1, len(ref))


def _watchdog(seconds: float) -> None:
    def fire():
        print(f"EP_GRAPHS_CHECK FAIL: hard timeout after {seconds:.0f}s", flush=True)
        os._exit(3)

    t = threading.Timer(seconds, fire)
    t.daemon = True
    t.start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--model", default=None, help="model dir (default: a fresh tiny model in a temp dir)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-num-seqs", type=int, default=64, help="also bounds the captured graph sizes")
    ap.add_argument("--backend", default=None, help="--all2all-backend of the EP=N runs (default: the engine's)")
    ap.add_argument("--profile-kv", action="store_true",
                    help="EP=N runs size their KV cache by profiling a forward at start-up (no budget given)")
    ap.add_argument("--timeout", type=float, default=290.0, help="hard deadline for the whole script (s)")
    ap.add_argument("--min-prefix", type=float, default=0.9,
                    help="PASS needs EP=N graphs to agree with EP=1 on at least this mean token-prefix fraction")
    a = ap.parse_args(argv)
    _watchdog(a.timeout)
    for k, v in NCCL_ENV.items():
        os.environ.setdefault(k, v)
    t_start = time.time()

    import torch

    from wideep.engine.config import EngineArgs
    from wideep.model.make_model import make_model

    on_cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    if on_cuda and torch.cuda.device_count() < a.ep:
        print(f"EP_GRAPHS_CHECK FAIL: need {a.ep} GPUs, see {torch.cuda.device_count()}")
        return 1
    tmp = tempfile.TemporaryDirectory()
    model = a.model or str(Path(tmp.name) / "tiny")
    if a.model is None:
        make_model("tiny", model)
    if not on_cuda:
        os.environ.setdefault("WIDEEP_STATIC_DECODE_SIZES", "1,2,4,8,16")
        os.environ.setdefault("WIDEEP_THREADS_PER_RANK", "1")
    cfg = json.loads((Path(model) / "config.json").read_text())
    reqs = _requests(a.prompts, a.max_tokens, int(cfg["vocab_size"]))
    base = EngineArgs(model=model, device=a.device, max_model_len=512, block_size=16, max_num_seqs=a.max_num_seqs,
                      kv_cache_memory_bytes=256 << 20, max_num_batched_tokens=2048)
    deadline = t_start + a.timeout - 10.0

    def left() -> float:
        return max(10.0, deadline - time.time())

    results: dict[str, dict] = {}
    import dataclasses

    for eager in (False, True):   # EP=N first: it is what this check is about
        label = f"EP={a.ep} " + ("eager" if eager else "graphs")
        t = time.time()
        args = dataclasses.replace(base, data_parallel_size=a.ep, enforce_eager=eager,
                                   device="auto" if on_cuda else a.device,
                                   all2all_backend=a.backend or base.all2all_backend,
                                   kv_cache_memory_bytes=None if a.profile_kv else base.kv_cache_memory_bytes)
        try:
            r = run_epn(args, reqs, a.ep, left())
        except Exception as exc:  # noqa: BLE001 - reported as the verdict
            print(f"{label}: FAILED {type(exc).__name__}: {str(exc)[:3000]}", flush=True)
            print(f"EP_GRAPHS_CHECK FAIL: {label} run failed", flush=True)
            os._exit(1)
        results[label] = r
        r0 = r["ranks"][0] if r["ranks"] else {}
        sm = r0.get("step_ms", {})
        print(f"{label}: {time.time() - t:.1f}s, " +
              "; ".join(f"rank {x['rank']}: {x['steps']} forwards ({x['dummy_steps']} dummy), graph sizes "
                        f"{x['graph_sizes']}, {x['eager_steps']} eager" for x in r["ranks"]) +
              " | rank 0 step ms: " + ", ".join(f"{k} {v['mean']:.2f} (n={v['count']})"
                                                for k, v in sm.items() if v["count"]), flush=True)
    for eager in (False, True):
        label = "EP=1 " + ("eager" if eager else "graphs")
        t = time.time()
        d = base.to_dict() | {"enforce_eager": eager, "device": "cuda:0" if on_cuda else a.device}
        r = run_ep1(d, reqs, left())
        results[label] = r
        ms = r["decode_step_ms"]
        print(f"{label}: {time.time() - t:.1f}s, graphs {r['graphs'] or 'none'}, "
              f"decode step {ms:.2f} ms over {r['decode_steps']} steps (batch {a.prompts})" if ms else
              f"{label}: no decode steps", flush=True)

    ref_g, ref_e = results["EP=1 graphs"]["tokens"], results["EP=1 eager"]["tokens"]
    print("token agreement (identical requests / mean prefix fraction):")
    rows = {}
    for label in results:
        for ref_label, ref in (("EP=1 eager", ref_e), ("EP=1 graphs", ref_g)):
            if label == ref_label:
                continue
            same, frac = agreement(results[label]["tokens"], ref)
            rows[(label, ref_label)] = (same, frac)
            print(f"  {label:>12} vs {ref_label:<11}: {same}/{len(ref)} identical, prefix {frac:.3f}")

    g = results[f"EP={a.ep} graphs"]
    e = results[f"EP={a.ep} eager"]

    def ms(r, kind):
        v = (r["ranks"][0]["step_ms"].get(kind) or {}) if r["ranks"] else {}
        return v.get("mean")

    g_ms, e_ms = ms(g, "decode_graph"), ms(e, "decode_eager")
    if g_ms and e_ms:
        print(f"EP={a.ep} decode step: graphs {g_ms:.2f} ms vs eager {e_ms:.2f} ms ({e_ms / g_ms:.2f}x)")
    why = []
    if len(g["ranks"]) != a.ep:
        why.append(f"lockstep report from {len(g['ranks'])} of {a.ep} ranks")
    elif on_cuda or os.environ.get("WIDEEP_STATIC_DECODE_SIZES"):
        if any(x["graph_steps"] == 0 for x in g["ranks"]):
            why.append("EP graphs run replayed no graph (capture failed or never agreed)")
        if len({json.dumps(x["graph_sizes"], sort_keys=True) for x in g["ranks"]}) != 1:
            why.append("ranks replayed different graph sizes")
        if sum(x["dummy_steps"] for x in g["ranks"]) == 0:
            why.append("no idle rank replayed a dummy batch")
    if e["ranks"] and any(x["graph_steps"] for x in e["ranks"]):
        why.append("the enforce_eager run replayed graphs")
    # bf16 greedy decoding of a random tiny model can flip near-tied tokens between batch shapes;
    # graphs must agree with EP=1 at least about as well as eager EP=N does (a broken graph path
    # diverges from the second token on)
    frac = rows[(f"EP={a.ep} graphs", "EP=1 graphs")][1]
    eager_frac = rows[(f"EP={a.ep} eager", "EP=1 eager")][1]
    need = min(a.min_prefix, eager_frac - 0.1)
    if frac < need:
        why.append(f"EP={a.ep} graphs agree with EP=1 graphs on {frac:.3f} of tokens (< {need:.3f}; "
                   f"eager EP={a.ep} vs EP=1: {eager_frac:.3f})")
    print(f"total {time.time() - t_start:.0f}s")
    print("EP_GRAPHS_CHECK " + ("PASS" if not why else "FAIL: " + "; ".join(why)), flush=True)
    sys.stdout.flush()
    os._exit(0 if not why else 1)   # no interpreter teardown of CUDA/NCCL state in this process


if __name__ == "__main__":
    sys.exit(main())
