"""Expert-parallel MoE benchmark: decode and prefill tokens/s per GPU for each dispatch backend.

One process per rank (multiprocessing spawn, no torchrun), NCCL on GPU / gloo on CPU. The model is
a random-weight DeepSeek-V3 at full width with a few layers ("layer-slice": 1 dense + N MoE
layers), built in memory (no checkpoint on disk). Decode: B sequences per rank, each with
`--context` tokens of KV already cached, one new token each; prefill: `--prefill-tokens` new
tokens per rank. A second, synchronized pass measures the share of step time spent in
dispatch + combine. The whole run has a hard deadline; ranks exit without collective teardown.
On CUDA the decode step is a replayed CUDA graph (as the engine runs decode): the MoE dispatch in
the graph is the static-shape decode backend (allgather_reducescatter, also when all_to_all is the
configured backend: wideep.parallel.graph_dispatch); `--enforce-eager` measures eager decode with
the configured backend. The dispatch+combine share is always measured eagerly (it syncs around
each call, which a graph cannot contain). Prefill is eager.

  GPU (2×H200):  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
                 python benchmarks/ep.py --ep 2 --compare-ep1 --out docs/ep_bench.json
  CPU (small):   python benchmarks/ep.py --preset tiny --ep 2 --batch-sizes 4,8 --context 64 \\
                 --prefill-tokens 128 --steps 3 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class TimedDispatcher:
    """Wraps a dispatcher; when `timing` is on, accumulates synchronized dispatch+combine wall time."""

    def __init__(self, inner, sync):
        self.inner = inner
        self.sync = sync
        self.timing = False
        self.seconds = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dispatch(self, x, ids, w):
        if not self.timing:
            return self.inner.dispatch(x, ids, w)
        self.sync()
        t = time.perf_counter()
        r = self.inner.dispatch(x, ids, w)
        self.sync()
        self.seconds += time.perf_counter() - t
        return r

    def combine(self, y, result):
        if not self.timing:
            return self.inner.combine(y, result)
        self.sync()
        t = time.perf_counter()
        r = self.inner.combine(y, result)
        self.sync()
        self.seconds += time.perf_counter() - t
        return r


def _build_model(opts: dict, rank: int, world: int, group, device, dtype):
    import torch

    from wideep.model.deepseek_v3 import DeepseekV3ForCausalLM
    from wideep.model.make_model import preset_config
    from wideep.model.rope import RotaryEmbedding
    from wideep.parallel.graph_dispatch import make_graph_mode_dispatcher

    cfg = preset_config(opts["preset"], num_moe_layers=opts["num_moe_layers"])
    # configured backend for eager forwards, a capturable one (static shapes) inside CUDA graphs
    inner = make_graph_mode_dispatcher(opts["backend"], cfg.n_routed_experts, ep_rank=rank, ep_size=world,
                                       group=group)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    disp = TimedDispatcher(inner, sync)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16: a full-width fp32 copy would not fit
    try:
        with torch.device("meta"):
            model = DeepseekV3ForCausalLM(cfg, disp, cfg.n_routed_experts // world)
    finally:
        torch.set_default_dtype(saved)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(1234 + rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()
    model.model.rotary_emb = RotaryEmbedding(cfg).to(device)
    model.eval()
    return model, disp, cfg


def _bench_rank(rank: int, world: int, port: int, opts: dict) -> dict[str, Any]:
    import torch

    from wideep.engine.kv_cache import allocate_kv_caches
    from wideep.model.attention import AttentionMetadata
    from wideep.parallel.config import ParallelConfig
    from wideep.parallel.dist import init_ep_group

    pcfg = ParallelConfig(data_parallel_size=world, data_parallel_size_local=world, data_parallel_rank=rank,
                          data_parallel_rpc_port=port, all2all_backend=opts["backend"])
    grp = init_ep_group(pcfg, device=opts["device"], timeout_s=opts["collective_timeout"])
    device = grp.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, disp, cfg = _build_model(opts, rank, world, grp.group, device, dtype)
    sync = disp.sync
    bs = opts["block_size"]
    ctx = opts["context"]
    max_b = max(opts["batch_sizes"])
    blocks_per_seq = -(-(ctx + 1) // bs)
    prefill_blocks = -(-opts["prefill_tokens"] // bs)
    kv = allocate_kv_caches(model.num_layers, max(max_b * blocks_per_seq, prefill_blocks) + 1, bs,
                            model.kv_cache_dim, dtype, device)
    results: dict[str, Any] = {"rank": rank, "device": str(device), "decode": [], "prefill": None}

    def run(ids, pos, attn, steps, timed, graph=None):
        disp.timing = timed
        disp.seconds = 0.0
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(steps):
                if graph is not None:
                    graph.replay()
                else:
                    model.forward(ids, pos, attn, kv)
        sync()
        return (time.perf_counter() - t) / steps, disp.seconds / steps

    use_graphs = device.type == "cuda" and not opts.get("enforce_eager", False)
    results["decode_mode"] = f"cuda graphs ({disp.inner.graph.name}, static shapes)" if use_graphs else \
        f"eager ({disp.inner.eager.name})"

    def capture(ids, pos, attn, b):
        """Every rank captures the decode forward of its b tokens (same b everywhere: the collectives
        inside the graph are matched across ranks)."""
        disp.timing = False  # the timed eager run of the previous size left it on; no syncs inside a capture
        with torch.inference_mode(), disp.inner.graph_mode(b):
            for _ in range(2):
                model.forward(ids, pos, attn, kv)
            sync()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                model.forward(ids, pos, attn, kv)
            sync()
        return g

    for b in opts["batch_sizes"]:
        tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(b)]
        attn = AttentionMetadata.build([1] * b, [ctx + 1] * b, tables, bs, num_decodes=b, device=device)
        g = torch.Generator().manual_seed(rank * 100 + b)
        ids = torch.randint(0, cfg.vocab_size, (b,), generator=g).to(device)
        pos = torch.full((b,), ctx, dtype=torch.long, device=device)
        graph = capture(ids, pos, attn, b) if use_graphs else None
        run(ids, pos, attn, opts["warmup"], False, graph)
        step_s, _ = run(ids, pos, attn, opts["steps"], False, graph)
        timed_step_s, comm_s = run(ids, pos, attn, opts["steps"], True)   # eager: syncs around dispatch
        results["decode"].append({"batch": b, "step_s": step_s, "tok_s": b / step_s,
                                  "eager_step_s": timed_step_s,
                                  "dispatch_combine_share": comm_s / timed_step_s if timed_step_s else 0.0})
        del graph

    n = opts["prefill_tokens"]
    if n:
        seqs = max(1, n // opts["prefill_seq_len"])
        lens = [n // seqs] * seqs
        lens[-1] += n - sum(lens)
        tables, nxt = [], 1
        for ln in lens:
            k = -(-ln // bs)
            tables.append(list(range(nxt, nxt + k)))
            nxt += k
        attn = AttentionMetadata.build(lens, lens, tables, bs, num_decodes=0, device=device)
        ids = torch.randint(0, cfg.vocab_size, (n,)).to(device)
        pos = torch.cat([torch.arange(ln) for ln in lens]).to(device)
        run(ids, pos, attn, 1, False)
        step_s, _ = run(ids, pos, attn, max(1, opts["steps"] // 2), False)
        timed_s, comm_s = run(ids, pos, attn, 1, True)
        results["prefill"] = {"tokens": n, "step_s": step_s, "tok_s": n / step_s,
                              "dispatch_combine_share": comm_s / timed_s if timed_s else 0.0}
    if device.type == "cuda":
        results["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return results


def _summarize(ep: int, backend: str, per_rank: list[dict]) -> dict[str, Any]:
    """Per-GPU numbers: each rank serves its own batch, the step ends when the slowest rank ends."""
    out: dict[str, Any] = {"ep": ep, "backend": backend, "device": per_rank[0]["device"], "decode": [],
                           "decode_mode": per_rank[0].get("decode_mode", "eager")}
    for i, d in enumerate(per_rank[0]["decode"]):
        step = max(r["decode"][i]["step_s"] for r in per_rank)
        share = sum(r["decode"][i]["dispatch_combine_share"] for r in per_rank) / len(per_rank)
        out["decode"].append({"batch_per_rank": d["batch"], "step_ms": step * 1e3,
                              "tok_s_per_gpu": d["batch"] / step, "dispatch_combine_share": share})
    if per_rank[0]["prefill"]:
        step = max(r["prefill"]["step_s"] for r in per_rank)
        n = per_rank[0]["prefill"]["tokens"]
        out["prefill"] = {"tokens_per_rank": n, "step_ms": step * 1e3, "tok_s_per_gpu": n / step,
                          "dispatch_combine_share": sum(r["prefill"]["dispatch_combine_share"]
                                                        for r in per_rank) / len(per_rank)}
    if "max_mem_gib" in per_rank[0]:
        out["max_mem_gib"] = max(r["max_mem_gib"] for r in per_rank)
    return out


def _markdown(rows: list[dict], opts: dict) -> str:
    lines = [f"EP benchmark: preset {opts['preset']} ({opts['num_moe_layers']} MoE layers), decode context "
             f"{opts['context']}, device {rows[0]['device'] if rows else '?'}; decode "
             f"{'eager' if opts.get('enforce_eager') else 'CUDA graphs where on CUDA'}, prefill eager; "
             "dispatch+combine share measured eagerly", "",
             "| EP | backend | phase | mode | seqs or tokens / rank | step ms | tokens/s per GPU | dispatch+combine share |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for d in r["decode"]:
            lines.append(f"| {r['ep']} | {r['backend']} | decode | {r['decode_mode']} | {d['batch_per_rank']} | "
                         f"{d['step_ms']:.2f} | {d['tok_s_per_gpu']:.0f} | {d['dispatch_combine_share']:.0%} |")
        if r.get("prefill"):
            p = r["prefill"]
            lines.append(f"| {r['ep']} | {r['backend']} | prefill | eager | {p['tokens_per_rank']} | "
                         f"{p['step_ms']:.2f} | {p['tok_s_per_gpu']:.0f} | {p['dispatch_combine_share']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ep", type=int, default=2, help="EP size = number of rank processes (one GPU each)")
    ap.add_argument("--backends", default="allgather_reducescatter,all_to_all")
    ap.add_argument("--compare-ep1", action="store_true", help="also run EP=1 (one GPU, no communication)")
    ap.add_argument("--preset", default="layer-slice", choices=["layer-slice", "tiny"])
    ap.add_argument("--num-moe-layers", type=int, default=2)
    ap.add_argument("--batch-sizes", default="64,128", help="decode sequences per rank")
    ap.add_argument("--context", type=int, default=2048, help="cached tokens per decode sequence")
    ap.add_argument("--prefill-tokens", type=int, default=8192, help="prefill tokens per rank (0: skip)")
    ap.add_argument("--prefill-seq-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="decode eagerly with the configured backend (default on CUDA: replay a CUDA graph)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="hard deadline for each EP run (s)")
    ap.add_argument("--collective-timeout", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=None, help="write JSON results here")
    a = ap.parse_args(argv)

    from wideep.parallel.launch import RankFailed, run_ranks

    base = {"preset": a.preset, "num_moe_layers": a.num_moe_layers,
            "batch_sizes": [int(x) for x in a.batch_sizes.split(",") if x],
            "context": a.context, "prefill_tokens": a.prefill_tokens, "prefill_seq_len": a.prefill_seq_len,
            "block_size": a.block_size, "steps": a.steps, "warmup": a.warmup, "device": a.device,
            "collective_timeout": a.collective_timeout, "enforce_eager": a.enforce_eager}
    runs = [(a.ep, b) for b in a.backends.split(",") if b]
    if a.compare_ep1:
        runs.append((1, "allgather_reducescatter"))  # with EP=1 every backend is the local MoE
    import torch

    threads = 0 if a.device != "cpu" and torch.cuda.is_available() else 1
    rows, failures = [], []
    for ep, backend in runs:
        opts = dict(base, backend=backend)
        t0 = time.time()
        try:
            per_rank = run_ranks(_bench_rank, ep, args=(opts,), timeout_s=a.timeout, env=NCCL_ENV,
                                 threads_per_rank=threads)
        except RankFailed as exc:
            print(f"EP={ep} {backend}: FAILED\n{exc}", file=sys.stderr)
            failures.append(f"EP={ep} {backend}")
            continue
        row = _summarize(ep, backend, per_rank)
        row["label"] = "EP=1 (local experts)" if ep == 1 else f"EP={ep} {backend}"
        rows.append(row)
        print(f"{row['label']}: done in {time.time() - t0:.0f}s "
              + ", ".join(f"B={d['batch_per_rank']}: {d['tok_s_per_gpu']:.0f} tok/s/GPU "
                          f"({d['dispatch_combine_share']:.0%} comm)" for d in row["decode"]), flush=True)
    print(_markdown(rows, base))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"config": base, "results": rows, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
