"""GPU check for hiding EP communication (2 GPUs, not CI): symm_mem_ll vs allgather_reducescatter vs
all_to_all, and dual-batch overlap in a captured decode step.

1. correctness: the same tokens, routing and experts through symm_mem_ll and allgather_reducescatter
   at EP=2 (eager and CUDA-graph replay). symm_mem_ll sends FP8 activations, so the reference runs on
   the same FP8-rounded activations: what is left must be within bf16 tolerance (the transport is exact);
   the error against the unrounded input is reported beside it;
2. latency: dispatch + combine per MoE layer (hidden 7168, 256 experts, top-8) at 32/128/256 tokens
   per rank, eager and graph-replayed, for each backend (all_to_all: eager only, it syncs the host);
3. dual-batch overlap: a DeepSeek-V3 layer slice (1 dense + N MoE layers, random weights) decoding
   128 sequences per rank, captured as a CUDA graph with and without DBO, for each capturable
   backend, with all 256 experts (128 per GPU) and with 16 (8 per GPU, EP=32's per-GPU count).
   Each graph is profiled (torch profiler, 10 replays, the ranks barrier-synchronized before each):
   comm = the transfer work only (NCCL kernels, symmetric-memory barriers, peer memcpys); the local
   grouping and fp32 combine sums are compute; exposed comm = comm time during which no compute kernel
   runs; hidden share = 1 - exposed(DBO) / exposed(no DBO), summed over both ranks, over all replays
   and for each rank's median replay. The same step with communication replaced by a local stand-in
   (identical shapes, its own grouping/combine code, no transfer) is also timed: it bounds the cost of
   the split itself.

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      python benchmarks/ep_overlap_check.py --out ep_overlap.json [--trace-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BF16_TOL = 2 ** -6      # 4 bf16 ulps of the largest output magnitude
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _timed(fn, iters: int) -> float:
    """Mean seconds per call of fn() (device time between events, after a warm-up call)."""
    import torch

    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def _graph(fn):
    import torch

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


def _union(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _measure(iv: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in iv)


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of union(a) not covered by union(b) (both already unions, sorted)."""
    left, j = 0.0, 0
    for s, e in a:
        cur = s
        while j < len(b) and b[j][1] <= cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > cur:
                left += b[k][0] - cur
            cur = max(cur, b[k][1])
            k += 1
        if cur < e:
            left += e - cur
    return left


def is_comm_event(e: dict) -> bool:
    """The transfer work: NCCL kernels, symmetric-memory barriers, and memcpys (symm_mem_ll's peer
    writes are copy-engine memcpys; the compute path has none, see memcpy_per_step of the other backends).
    By name, not by stream: a graph replay runs its kernels on the driver's own streams."""
    n = e["name"].lower()
    return "nccl" in n or "barrier_kernel" in n or e.get("cat") == "gpu_memcpy"


def kernel_overlap(events: list[dict], replays: int) -> dict:
    """Device activity of `replays` graph replays (chrome-trace 'X' events of kernels/memcpys/memsets):
    comm = transfer work (is_comm_event); everything else, the local grouping and combine sums
    included, is compute; exposed comm = comm time during which no compute kernel runs. Per replay, ms."""
    dev = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not dev:
        return {"error": "no device events in the trace"}
    comm_iv, comp_iv, names = [], [], {}
    for e in dev:
        iv = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        comm = is_comm_event(e)
        (comm_iv if comm else comp_iv).append(iv)
        key = ("comm: " if comm else "compute: ") + e["name"][:60]
        n, d = names.get(key, (0, 0.0))
        names[key] = (n + 1, d + float(e["dur"]))
    cu, pu = _union(comm_iv), _union(comp_iv)
    span = max(e["ts"] + e["dur"] for e in dev) - min(e["ts"] for e in dev)
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:10]
    per = _exposed_per_replay(dev, replays)
    return {"comm_ms": _measure(cu) / 1e3 / replays, "exposed_comm_ms": _minus(cu, pu) / 1e3 / replays,
            "exposed_comm_ms_per_replay": per, "exposed_comm_ms_median": statistics.median(per) if per else None,
            "compute_ms": _measure(pu) / 1e3 / replays, "span_ms": span / 1e3 / replays,
            "comm_events_per_step": len(comm_iv) / replays,
            "comm_kernel_sum_ms": sum(b - a for a, b in comm_iv) / 1e3 / replays,
            "memcpy_per_step": sum(1 for e in dev if e.get("cat") == "gpu_memcpy") / replays,
            "top_kernels": [[k, n / replays, d / 1e3 / replays] for k, (n, d) in top]}


def _exposed_per_replay(dev: list[dict], replays: int) -> list[float]:
    """Exposed comm of each replay, ms. The replays are split at the `replays - 1` longest idle gaps of the
    device (the host barrier before each; inside a graph replay the device idles for microseconds); empty unless
    each of those gaps is over 4x longer than any other. A replay in which a peer started late (a host hiccup)
    shows its wait as exposed comm: the median replay is the step without it."""
    ev = sorted(dev, key=lambda e: float(e["ts"]))
    end, gaps = float("-inf"), []
    for i, e in enumerate(ev):
        ts = float(e["ts"])
        if i:
            gaps.append((ts - end, i))
        end = max(end, ts + float(e["dur"]))
    gaps.sort(reverse=True)
    cut, rest = gaps[:replays - 1], gaps[replays - 1:]
    if len(cut) != replays - 1 or (cut and rest and cut[-1][0] <= 4 * rest[0][0]):
        return []
    bounds = [0] + sorted(i for _, i in cut) + [len(ev)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        iv = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), is_comm_event(e)) for e in ev[a:b]]
        out.append(_minus(_union([(x, y) for x, y, c in iv if c]), _union([(x, y) for x, y, c in iv if not c])) / 1e3)
    return out


def _device_events(trace: dict) -> list[dict]:
    return [{"name": e["name"], "cat": e.get("cat"), "ph": "X", "ts": e["ts"], "dur": e["dur"],
             "stream": e.get("args", {}).get("stream")}
            for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def _profiled(replay, replays: int, dump: str | None = None, before=None) -> dict:
    """kernel_overlap of `replays` calls of replay() (torch profiler, CUDA activity only); `before()`
    runs ahead of each call (the ranks' barrier: a rank that starts a step first would otherwise wait
    inside its first transfer, and that wait reads as exposed comm); `dump`: a file that gets the
    device events (name, ts, dur, stream) as JSON."""
    import os
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            if before is not None:
                before()
            replay()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = _device_events(json.load(f))
    finally:
        os.unlink(path)
    if dump:
        with open(dump, "w") as f:
            json.dump(events, f)
    return kernel_overlap(events, replays)


class _NoComm:
    """Stand-in with allgather_reducescatter's shapes and expert work but no transfer: the peer's
    tokens are this rank's own (dispatch), the peer's partial sums are dropped (combine)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def dispatch_async(self, x, ids, w):
        from wideep.model.dispatch import done
        return done(self.dispatch(x, ids, w))

    def combine_async(self, y, result):
        from wideep.model.dispatch import done
        return done(self.combine(y, result))

    # the MoE layer's path with a fused shared expert (split or not): the own rows first, the weight in the combine
    def dispatch_with_own(self, x, ids, w):
        import torch
        r = self.dispatch(x, ids, w)
        r.x = torch.cat([x, r.x])
        return r

    def combine_weighted(self, y, result):
        return self.combine(y * result.weights.to(y.dtype)[:, None], result)

    def dispatch_with_own_async(self, x, ids, w):
        from wideep.model.dispatch import done
        return done(self.dispatch_with_own(x, ids, w))

    def combine_weighted_async(self, y, result):
        from wideep.model.dispatch import done
        return done(self.combine_weighted(y, result))

    def dispatch(self, x, ids, w):
        import torch

        from wideep.model.dispatch import DispatchResult
        from wideep.model.moe_permute import group_by_local_expert
        inner, ep = self.inner, self.inner.ep_size
        first, _ = inner.local_expert_range
        xs, ids_all, w_all = (torch.cat([v] * ep) for v in (x, ids, w))
        ids_all = torch.where(inner.real_rows(ids_all.shape[0] // ep, x.device).repeat(ep)[:, None], ids_all,
                              torch.full_like(ids_all, -1)) if inner.graph_size is not None else ids_all
        g = group_by_local_expert(ids_all - first, inner.num_local_experts, True)
        weights = torch.where(g.valid, w_all.reshape(-1)[g.order], torch.zeros((), device=x.device))
        return DispatchResult(x=xs[g.rows], tokens_per_expert=g.tokens_per_expert, weights=weights,
                              handle=(x.shape[0], g.rows, g.valid))

    def combine(self, y, result):
        import torch
        t, rows, valid = result.handle
        y = torch.where(valid[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
        out = torch.zeros((t * self.inner.ep_size, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, rows, y.float())
        return out[:t].to(y.dtype)


def _rank(rank: int, world: int, port: int, opts: dict) -> dict[str, Any]:
    import torch

    from wideep.parallel.backends import get_dispatcher
    from wideep.parallel.config import ParallelConfig
    from wideep.parallel.dist import init_ep_group

    pcfg = ParallelConfig(data_parallel_size=world, data_parallel_size_local=world, data_parallel_rank=rank,
                          data_parallel_rpc_port=port)
    grp = init_ep_group(pcfg, device="cuda", timeout_s=120)
    dev = grp.device
    out: dict[str, Any] = {"rank": rank, "device": torch.cuda.get_device_name(dev), "errors": {}}
    H, E, K = 7168, 256, 8

    def backend(name):
        return get_dispatcher(name, E, ep_rank=rank, ep_size=world, group=grp.group)

    def inputs(t, seed):
        g = torch.Generator(device=dev).manual_seed(seed * 10 + rank)
        x = torch.randn(t, H, device=dev, generator=g, dtype=torch.bfloat16)
        ids = torch.rand(t, E, device=dev, generator=g).topk(K, dim=-1).indices
        w = torch.rand(t, K, device=dev, generator=g)
        return x, ids, w

    # ---- 1. correctness ---------------------------------------------------------------------------
    def check():
        from wideep.model.moe import grouped_mlp
        t = 128
        x, ids, w = inputs(t, 1)
        gw = torch.Generator(device=dev).manual_seed(7 + rank)
        inter = 256
        w13 = torch.randn(E // world, 2 * inter, H, device=dev, generator=gw, dtype=torch.bfloat16) * 0.02
        w2 = torch.randn(E // world, H, inter, device=dev, generator=gw, dtype=torch.bfloat16) * 0.02

        def moe(d):
            def f():
                r = d.dispatch(x, ids, w)
                y = grouped_mlp(r.x, w13, w2, r.tokens_per_expert) * r.weights.to(torch.bfloat16)[:, None]
                return d.combine(y, r)
            return f
        res = {}
        ref_d = backend("allgather_reducescatter")
        ref_d.static_shapes = True
        ref_d.set_max_tokens_per_rank(t)
        ref = moe(ref_d)()
        # the transport must be exact: the reference runs on the activations symm_mem_ll delivers
        # (FP8 e4m3 with a per-token scale); what remains is bf16 rounding of the per-rank partial sums
        from wideep.parallel.symm_dispatch import dequantize_rows_fp8, quantize_rows_fp8
        x_fp8 = dequantize_rows_fp8(*quantize_rows_fp8(x), x.dtype)
        x_orig = x
        x = x_fp8
        ref_q = moe(ref_d)()
        x = x_orig
        ll = backend("symm_mem_ll")
        ll.set_max_tokens_per_rank(t)
        got = moe(ll)()
        g, got_graph = _graph(moe(ll))
        g.replay()
        torch.cuda.synchronize()
        scale = ref.float().abs().max().item()
        res["eager_rel_max_err_vs_bf16_input"] = (got.float() - ref.float()).abs().max().item() / scale
        res["eager_rel_max_err"] = (got.float() - ref_q.float()).abs().max().item() / scale
        res["graph_rel_max_err"] = (got_graph.float() - ref_q.float()).abs().max().item() / scale
        res["ref_abs_max"] = scale
        # bf16 tolerance: a few units in the last place of bf16 (2^-8 relative) of the output's magnitude
        res["tolerance"] = BF16_TOL
        res["pass"] = max(res["eager_rel_max_err"], res["graph_rel_max_err"]) <= BF16_TOL
        return res

    # ---- 2. dispatch + combine latency --------------------------------------------------------------
    def latency():
        rows = []
        for t in opts["tokens"]:
            x, ids, w = inputs(t, 2)
            for name in ("symm_mem_ll", "allgather_reducescatter", "all_to_all"):
                d = backend(name)
                d.set_max_tokens_per_rank(t)
                if hasattr(d, "static_shapes"):
                    d.static_shapes = True

                def f(d=d):
                    r = d.dispatch(x, ids, w)
                    return d.combine(r.x * r.weights.to(r.x.dtype)[:, None], r)
                row = {"tokens_per_rank": t, "backend": name, "eager_us": _timed(f, opts["iters"]) * 1e6}
                if d.graph_capturable:
                    try:
                        g, _ = _graph(f)
                        row["graph_us"] = _timed(g.replay, opts["iters"]) * 1e6
                    except Exception as exc:  # noqa: BLE001
                        row["graph_error"] = repr(exc)[:300]
                rows.append(row)
        return rows

    # ---- 3. decode step with / without DBO ------------------------------------------------------------
    def in_step():
        """Both ranks start the next step together: the device idles, then a CPU barrier."""
        torch.cuda.synchronize()
        torch.distributed.barrier(group=grp.cpu_group)

    def dbo():
        rows = []
        for experts in opts["dbo_experts"]:
            rows += dbo_at(experts)
            torch.cuda.empty_cache()
        return rows

    def dbo_at(n_experts):
        from wideep.engine.kv_cache import allocate_kv_caches
        from wideep.model.attention import AttentionMetadata
        from wideep.model.deepseek_v3 import DeepseekV3ForCausalLM
        from wideep.model.make_model import preset_config
        from wideep.model.rope import RotaryEmbedding
        from wideep.model.ubatch import forward_dual_batch
        from wideep.parallel.graph_dispatch import make_graph_mode_dispatcher

        E = n_experts
        cfg = preset_config("layer-slice", num_moe_layers=opts["moe_layers"], n_routed_experts=E)
        b, ctx, bs = opts["batch"], opts["context"], 64
        saved = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                model = DeepseekV3ForCausalLM(
                    cfg, get_dispatcher("allgather_reducescatter", E, ep_rank=rank, ep_size=world, group=grp.group),
                    E // world)
        finally:
            torch.set_default_dtype(saved)
        model.to_empty(device=dev)
        gen = torch.Generator(device=dev).manual_seed(1234 + rank)
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.fill_(1.0) if p.dim() == 1 else p.normal_(0.0, 0.02, generator=gen)
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.zero_()
        model.model.rotary_emb = RotaryEmbedding(cfg).to(dev)
        model.eval()
        per_seq = -(-(ctx + 1) // bs)
        kv = allocate_kv_caches(model.num_layers, b * per_seq + 1, bs, model.kv_cache_dim, torch.bfloat16, dev)
        tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(b)]
        attn = AttentionMetadata.build([1] * b, [ctx + 1] * b, tables, bs, num_decodes=b, device=dev)
        ids = torch.randint(0, cfg.vocab_size, (b,), device=dev)
        pos = torch.full((b,), ctx, dtype=torch.long, device=dev)
        rows = []
        for name in opts["dbo_backends"]:
            gd = make_graph_mode_dispatcher(name, E, ep_rank=rank, ep_size=world, group=grp.group)
            for comm in (True, False):
                d = gd if comm else _NoComm(gd)
                model.dispatcher = d
                for layer in model.moe_layers():
                    layer.dispatcher = d
                unsplit = None
                for split in (False, True):
                    label = {"experts": E, "experts_per_gpu": E // world, "backend": name, "comm": comm, "dbo": split}
                    try:
                        with torch.inference_mode(), gd.graph_mode(b):
                            fwd = (lambda: forward_dual_batch(model, ids, pos, attn, kv, -(-b // 2))) if split \
                                else (lambda: model.forward(ids, pos, attn, kv))
                            g, hidden = _graph(fwd)
                            label["step_ms"] = _timed(g.replay, opts["iters"]) * 1e3
                            # the split step's output against the unsplit one (bf16 GEMMs at other row counts
                            # round differently; a transfer racing its buffer's reuse would be far off or NaN)
                            if split and unsplit is not None:
                                label["max_rel_diff_vs_unsplit"] = float(
                                    (hidden.float() - unsplit).abs().max() / unsplit.abs().max())
                            elif not split:
                                unsplit = hidden.float().clone()
                            if opts["profile"]:
                                dump = (f"{opts['trace_dir']}/trace_{name}_{E // world}_{int(comm)}{int(split)}.json"
                                        if opts["trace_dir"] and rank == 0 else None)
                                label["profile"] = _profiled(g.replay, opts["profile_replays"], dump, in_step)
                        del g
                    except Exception as exc:  # noqa: BLE001
                        label["error"] = repr(exc)[:400]
                        torch.cuda.synchronize()
                    rows.append(label)
        return rows

    for key, fn in (("correctness", check), ("latency", latency), ("dbo", dbo)):
        if key not in opts["sections"]:
            continue
        t0 = time.time()
        try:
            out[key] = fn()
        except Exception:  # noqa: BLE001 - report and go on with the next section
            out["errors"][key] = traceback.format_exc()[-2000:]
        out[f"{key}_s"] = time.time() - t0
        torch.distributed.barrier()
    return out


def dbo_summary(per_rank: list[dict]) -> list[dict]:
    """Per (experts per GPU, backend): the hidden share of both ranks' exposed comm,
    1 - sum(exposed, DBO) / sum(exposed, no DBO), over all profiled replays (`hidden`) and of each rank's median
    replay (`hidden_median_replay`), and the steps with and without DBO."""
    acc: dict[tuple, dict] = {}
    for r in per_rank:
        for row in r.get("dbo", []):
            if not row["comm"] or "profile" not in row or "exposed_comm_ms" not in row["profile"]:
                continue
            key = (row["experts_per_gpu"], row["backend"])
            a = acc.setdefault(key, {"experts_per_gpu": key[0], "backend": key[1], "exposed_ms": [0.0, 0.0],
                                     "exposed_median_ms": [0.0, 0.0], "step_ms": [[], []]})
            prof = row["profile"]
            a["exposed_ms"][row["dbo"]] += prof["exposed_comm_ms"]
            a["exposed_median_ms"][row["dbo"]] += prof.get("exposed_comm_ms_median") or float("nan")
            a["step_ms"][row["dbo"]].append(round(row["step_ms"], 3))
            if "max_rel_diff_vs_unsplit" in row:
                a["dbo_max_rel_diff"] = max(a.get("dbo_max_rel_diff", 0.0), row["max_rel_diff_vs_unsplit"])
    out = []
    for a in acc.values():
        (no, yes), (no_med, yes_med) = a["exposed_ms"], a["exposed_median_ms"]
        out.append({**a, "hidden": round(1 - yes / no, 3) if no > 0 else None,
                    "hidden_median_replay": round(1 - yes_med / no_med, 3) if no_med > 0 else None})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="32,128,256")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--dbo-backends", default="allgather_reducescatter,symm_mem_ll")
    ap.add_argument("--dbo-experts", default="256,16",
                    help="routed experts of the layer slice; 16 = 8 per GPU, the per-GPU expert count of EP=32")
    ap.add_argument("--sections", default="correctness,latency,dbo")
    ap.add_argument("--profile-replays", type=int, default=10)
    ap.add_argument("--no-profile", action="store_true", help="skip the torch-profiler kernel overlap of each DBO graph")
    ap.add_argument("--trace-dir", default=None, help="rank 0 writes each DBO graph's device events here")
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    from wideep.parallel.launch import run_ranks

    opts = {"tokens": [int(x) for x in a.tokens.split(",")], "iters": a.iters, "batch": a.batch,
            "context": a.context, "moe_layers": a.moe_layers, "dbo_backends": a.dbo_backends.split(","),
            "dbo_experts": [int(x) for x in a.dbo_experts.split(",")],
            "sections": a.sections.split(","), "profile": not a.no_profile, "profile_replays": a.profile_replays,
            "trace_dir": a.trace_dir}
    per_rank = run_ranks(_rank, 2, args=(opts,), timeout_s=a.timeout, env=NCCL_ENV, threads_per_rank=0)
    report = {"config": opts, "ranks": per_rank, "dbo_summary": dbo_summary(per_rank)}
    print(json.dumps(report, indent=1))
    for row in report["dbo_summary"]:
        print("DBO", json.dumps(row))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
