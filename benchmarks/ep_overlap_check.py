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
   Three measures of how much of the communication DBO hides, each summed over the two ranks:
   - step time: each backend's step also runs as its compute twin (_transfers), each transfer replaced
     by a copy of what it delivered in a recorded real step (the same kernels and values, no transfer,
     no wait for the peer; its output is checked against the real step's). What communication costs a
     step = step(real) - step(twin); hidden_step = 1 - cost(DBO) / cost(no DBO). This counts everything
     comm does to the step: transfer time left uncovered, waits for the slower peer, and the compute it
     slows down by sharing SMs and memory bandwidth. The twins' split vs unsplit steps give the cost of
     the split itself.
   - waiting: the real step's compute kernels aligned one to one with the twin's (twin_delays): the
     longer idle gaps before them are compute waiting for a transfer (hidden_wait = 1 - wait(DBO) /
     wait(no DBO)); their longer durations are compute slowed beside one.
   - timeline: each graph profiled (torch profiler, 10 replays, the ranks barrier-synchronized before
     each); comm = the transfer work only (NCCL kernels, symmetric-memory barriers, peer memcpys); the
     local grouping and fp32 combine sums are compute; exposed comm = comm time during which no compute
     kernel runs, hidden = 1 - exposed(DBO) / exposed(no DBO), over all replays and for each rank's
     median replay. Under DBO this also counts the compute stream's own sub-microsecond gaps between
     kernels that fall inside a transfer, so it understates what is hidden.

  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
      python benchmarks/ep_overlap_check.py --out ep_overlap.json [--trace-dir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

BF16_TOL = 2 ** -6      # 4 bf16 ulps of the largest output magnitude
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _timed(fn, iters: int, before=None) -> float:
    """Mean seconds per call of fn() (device time between events, after a warm-up call); `before()` runs
    once ahead of the timed calls (the ranks' barrier, so that no rank's first call waits for a late peer)."""
    import torch

    fn()
    torch.cuda.synchronize()
    if before is not None:
        before()
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


def is_comm_event(e: dict, copies_are_comm: bool = True) -> bool:
    """The transfer work: NCCL kernels, symmetric-memory barriers, peer-to-peer memcpys, and other memcpys
    when the backend's transfers are copies (copies_are_comm: symm_mem_ll writes its own rank's slot with a
    device-to-device copy; allgather_reducescatter's only memcpys are the compute path's small copies).
    By name, not by stream: a graph replay runs its kernels on the driver's own streams."""
    n = e["name"].lower()
    if e.get("cat") == "gpu_memcpy":
        return copies_are_comm or "ptop" in n
    return "nccl" in n or "barrier_kernel" in n


def kernel_overlap(events: list[dict], replays: int, copies_are_comm: bool = True) -> dict:
    """Device activity of `replays` graph replays (chrome-trace 'X' events of kernels/memcpys/memsets):
    comm = transfer work (is_comm_event); everything else, the local grouping and combine sums
    included, is compute; exposed comm = comm time during which no compute kernel runs. Per replay, ms.
    Exposed time includes the compute stream's own gaps between kernels (~0.4-1 us each) that fall inside a
    transfer; the step-time twin (_transfers) measures the cost without that."""
    dev = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not dev:
        return {"error": "no device events in the trace"}
    comm_iv, comp_iv, names = [], [], {}
    for e in dev:
        iv = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        comm = is_comm_event(e, copies_are_comm)
        (comm_iv if comm else comp_iv).append(iv)
        key = ("comm: " if comm else "compute: ") + e["name"][:60]
        n, d = names.get(key, (0, 0.0))
        names[key] = (n + 1, d + float(e["dur"]))
    cu, pu = _union(comm_iv), _union(comp_iv)
    span = max(e["ts"] + e["dur"] for e in dev) - min(e["ts"] for e in dev)
    top = sorted(names.items(), key=lambda kv: -kv[1][1])[:10]
    per = _exposed_per_replay(dev, replays, copies_are_comm)
    return {"comm_ms": _measure(cu) / 1e3 / replays, "exposed_comm_ms": _minus(cu, pu) / 1e3 / replays,
            "exposed_comm_ms_per_replay": per, "exposed_comm_ms_median": statistics.median(per) if per else None,
            "compute_ms": _measure(pu) / 1e3 / replays, "span_ms": span / 1e3 / replays,
            "comm_events_per_step": len(comm_iv) / replays,
            "comm_kernel_sum_ms": sum(b - a for a, b in comm_iv) / 1e3 / replays,
            "memcpy_per_step": sum(1 for e in dev if e.get("cat") == "gpu_memcpy") / replays,
            "top_kernels": [[k, n / replays, d / 1e3 / replays] for k, (n, d) in top]}


def split_replays(dev: list[dict], replays: int) -> list[list[dict]]:
    """The device events of `replays` profiled replays, one list per replay, split at the device's
    `replays - 1` longest idle gaps (the host barrier before each; inside a graph replay the device idles for
    microseconds); empty unless each of those gaps is over 4x longer than any other."""
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
    return [ev[a:b] for a, b in zip(bounds, bounds[1:])]


def _exposed_per_replay(dev: list[dict], replays: int, copies_are_comm: bool = True) -> list[float]:
    """Exposed comm of each replay, ms (split_replays). A replay in which a peer started late (a host hiccup)
    shows its wait as exposed comm: the median replay is the step without it."""
    out = []
    for rep in split_replays(dev, replays):
        iv = [(float(e["ts"]), float(e["ts"]) + float(e["dur"]), is_comm_event(e, copies_are_comm)) for e in rep]
        out.append(_minus(_union([(x, y) for x, y, c in iv if c]), _union([(x, y) for x, y, c in iv if not c])) / 1e3)
    return out


def twin_delays(real: list[dict], twin: list[dict], replays: int) -> dict:
    """Where communication's cost goes: the real step's compute kernels aligned one to one with its twin's
    (transfers and copies left out: the twin copies where the real step transfers). wait_ms = sum over
    kernels of the idle gap before it, real - twin (compute waiting for a transfer); slowdown_ms = sum of
    its duration, real - twin (compute slowed beside a transfer kernel). Means per replay."""
    def compute(rep):
        return [e for e in rep if e.get("cat") == "kernel" and not is_comm_event(e)
                and "memcpy" not in e["name"].lower()]

    def end(e):
        return e["ts"] + e["dur"]
    ra, rb = split_replays(real, replays), split_replays(twin, replays)
    if not ra or not rb:
        return {"error": "the replays could not be told apart"}
    waits, slows = [], []
    for a, b in zip(ra, rb):
        ca, cb = compute(a), compute(b)
        if [e["name"] for e in ca] != [e["name"] for e in cb]:
            return {"error": f"the compute kernels differ ({len(ca)} real, {len(cb)} twin)"}
        waits.append(sum((ca[i]["ts"] - end(ca[i - 1])) - (cb[i]["ts"] - end(cb[i - 1])) for i in range(1, len(ca))))
        slows.append(sum(x["dur"] - y["dur"] for x, y in zip(ca, cb)))
    return {"wait_ms": statistics.mean(waits) / 1e3, "slowdown_ms": statistics.mean(slows) / 1e3,
            "compute_kernels": len(ca)}


def _device_events(trace: dict) -> list[dict]:
    return [{"name": e["name"], "cat": e.get("cat"), "ph": "X", "ts": e["ts"], "dur": e["dur"],
             "stream": e.get("args", {}).get("stream")}
            for e in trace.get("traceEvents", [])
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def _device_trace(replay, replays: int, dump: str | None = None, before=None) -> list[dict]:
    """The device events of `replays` calls of replay() (torch profiler, CUDA activity only); `before()`
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
    return events


class _NoWait:
    def wait(self) -> None:
        pass


@contextlib.contextmanager
def _transfers(dispatcher, saved: list, replay: bool):
    """A backend's transfers, recorded or replayed: allgather_reducescatter's two collectives, or symm_mem_ll's
    peer writes + barrier (`_send`). Recording (replay=False) runs them and keeps what each delivered, in call
    order; replaying makes each one a device copy of what it delivered in the recorded step: the same kernels,
    routing and values on this rank, no transfer and no wait for a peer. The replayed step is the compute twin
    of the real one: step(real) - step(twin) is what communication costs the step, waiting for a slower peer
    included."""
    from wideep.parallel import _comm
    from wideep.parallel.symm_dispatch import SymmMemDispatcher
    calls = [0]

    def next_saved() -> Any:
        got = saved[calls[0] % len(saved)]
        calls[0] += 1
        return got
    if isinstance(dispatcher, SymmMemDispatcher):
        real_send = dispatcher._send

        def send(slot, which, rows_for, bound, channel):
            received = slot.buffer(which)[:, :bound]
            if replay:        # on the side stream, as the transfer would be; one copy per source rank's block
                got = next_saved()
                for p in range(received.shape[0]):
                    received[p].copy_(got[p])
            else:
                real_send(slot, which, rows_for, bound, channel)
                saved.append(received.clone())
        dispatcher._send = send
        try:
            yield
        finally:
            del dispatcher._send          # the class's method again
        return
    real = _comm.all_gather_rows, _comm.reduce_scatter_rows

    def record(fn):
        def call(*args, **kwargs):
            res = fn(*args, **kwargs)
            saved.append(res[0] if isinstance(res, tuple) else res)
            return res
        return call

    def copy(x, world, group=None, async_op=False):
        out = next_saved().clone()
        return (out, _NoWait()) if async_op else out
    _comm.all_gather_rows, _comm.reduce_scatter_rows = (copy, copy) if replay else tuple(map(record, real))
    try:
        yield
    finally:
        _comm.all_gather_rows, _comm.reduce_scatter_rows = real


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
        # symm_mem_ll's fused packing and dequantize-gather kernels give the torch path's bits (the GPU rounds)
        from wideep.parallel.symm_dispatch import dequant_gather, pack_rows, row_bytes, row_fields
        bufs = [torch.zeros((t + 3, row_bytes(H, K)), dtype=torch.uint8, device=dev) for _ in range(2)]
        for buf, impl in zip(bufs, ("torch", "triton")):
            pack_rows(x, ids, w, buf, impl=impl)
        q, qs, _, _ = row_fields(bufs[0].view(1, t + 3, -1), H, K)
        rows = torch.randint(0, t + 3, (3 * t,), device=dev, generator=gw)
        res["fused_kernels_bits_equal"] = torch.equal(bufs[0], bufs[1]) and torch.equal(
            *(dequant_gather(q, qs, rows, x, torch.bfloat16, impl=impl) for impl in ("torch", "triton")))
        res["pass"] = max(res["eager_rel_max_err"], res["graph_rel_max_err"]) <= BF16_TOL and \
            res["fused_kernels_bits_equal"]
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
            model.dispatcher = gd
            for layer in model.moe_layers():
                layer.dispatcher = gd
            real: dict[bool, Any] = {}          # split -> the real step's output
            real_events: dict[bool, list] = {}  # split -> the real step's profiled device events
            for comm in (True, False):          # the real step, then its compute twin (_transfers)
                unsplit = None
                for split in (False, True):
                    label = {"experts": E, "experts_per_gpu": E // world, "backend": name, "comm": comm, "dbo": split}
                    saved: list = []
                    try:
                        with torch.inference_mode(), gd.graph_mode(b):
                            fwd = (lambda: forward_dual_batch(model, ids, pos, attn, kv, -(-b // 2))) if split \
                                else (lambda: model.forward(ids, pos, attn, kv))
                            if not comm:
                                with _transfers(gd.graph, saved, replay=False):
                                    fwd()
                                torch.cuda.synchronize()
                            with _transfers(gd.graph, saved, replay=True) if not comm else contextlib.nullcontext():
                                g, hidden = _graph(fwd)
                            label["step_ms"] = _timed(g.replay, opts["iters"], before=in_step) * 1e3
                            # the split step's output against the unsplit one (bf16 GEMMs at other row counts
                            # round differently; a transfer racing its buffer's reuse would be far off or NaN)
                            if split and unsplit is not None:
                                label["max_rel_diff_vs_unsplit"] = float(
                                    (hidden.float() - unsplit).abs().max() / unsplit.abs().max())
                            elif not split:
                                unsplit = hidden.float().clone()
                            if comm:
                                real[split] = hidden.float().clone()
                            else:   # the twin must compute what the real step did (0: the same bits)
                                label["twin_max_abs_diff_vs_real"] = float((hidden.float() - real[split]).abs().max())
                            if opts["profile"]:
                                dump = (f"{opts['trace_dir']}/trace_{name}_{E // world}_{int(comm)}{int(split)}"
                                        f"_r{rank}.json" if opts["trace_dir"] else None)
                                events = _device_trace(g.replay, opts["profile_replays"], dump, in_step)
                                if comm:
                                    real_events[split] = events
                                    label["profile"] = kernel_overlap(events, opts["profile_replays"],
                                                                      copies_are_comm=name != "allgather_reducescatter")
                                elif split in real_events:
                                    label["delays"] = twin_delays(real_events[split], events, opts["profile_replays"])
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
    """Per (experts per GPU, backend), summed over both ranks: the hidden share of the exposed comm,
    1 - sum(exposed, DBO) / sum(exposed, no DBO), over all profiled replays (`hidden`) and of each rank's median
    replay (`hidden_median_replay`); where the compute twin ran, the hidden share of what communication costs
    the step, 1 - sum(real - twin, DBO) / sum(real - twin, no DBO) (`hidden_step`), and of the time compute
    waits for transfers (`hidden_wait`, from twin_delays, beside the slowdown of compute next to them);
    the steps themselves."""
    acc: dict[tuple, dict] = {}
    for r in per_rank:
        for row in r.get("dbo", []):
            if "step_ms" not in row:
                continue
            key = (row["experts_per_gpu"], row["backend"])
            a = acc.setdefault(key, {"experts_per_gpu": key[0], "backend": key[1], "exposed_ms": [0.0, 0.0],
                                     "exposed_median_ms": [0.0, 0.0], "step_ms": [[], []],
                                     "comm_cost_ms": [0.0, 0.0], "twin_step_ms": [[], []]})
            d = row["dbo"]
            if not row["comm"]:     # the twin: this step without transfers
                a["twin_step_ms"][d].append(round(row["step_ms"], 3))
                a["comm_cost_ms"][d] -= row["step_ms"]
                for k in ("wait_ms", "slowdown_ms"):
                    a.setdefault(k, [0.0, 0.0])[d] += row.get("delays", {}).get(k, float("nan"))
                continue
            a["step_ms"][d].append(round(row["step_ms"], 3))
            a["comm_cost_ms"][d] += row["step_ms"]
            prof = row.get("profile", {})
            a["exposed_ms"][d] += prof.get("exposed_comm_ms", float("nan"))
            a["exposed_median_ms"][d] += prof.get("exposed_comm_ms_median") or float("nan")
            if "max_rel_diff_vs_unsplit" in row:
                a["dbo_max_rel_diff"] = max(a.get("dbo_max_rel_diff", 0.0), row["max_rel_diff_vs_unsplit"])
    out = []
    for a in acc.values():
        (no, yes), (no_med, yes_med) = a["exposed_ms"], a["exposed_median_ms"]
        row = {**a, "hidden": round(1 - yes / no, 3) if no > 0 else None,
               "hidden_median_replay": round(1 - yes_med / no_med, 3) if no_med > 0 else None}
        if all(len(t) == len(s) for t, s in zip(a["twin_step_ms"], a["step_ms"])) and a["twin_step_ms"][0]:
            no_c, yes_c = a["comm_cost_ms"]
            row["hidden_step"] = round(1 - yes_c / no_c, 3) if no_c > 0 else None
            no_w, yes_w = a.get("wait_ms", (float("nan"),) * 2)
            row["hidden_wait"] = round(1 - yes_w / no_w, 3) if no_w > 0 else None
        else:
            del row["comm_cost_ms"], row["twin_step_ms"]
        out.append(row)
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
    ap.add_argument("--trace-dir", default=None, help="each rank writes each DBO graph's device events here")
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
