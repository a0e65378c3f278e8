"""Device check and timing of two MoE-layer fusions (numbers in docs/perf.md), at DeepSeek-R1 sizes:

- the shared expert as slot 0 of the routed grouped MLP (EP=32 rank: 8 local experts, `--rows` rows each,
  plus the rank's own T tokens) against the routed MLP + the separate shared MLP, bf16 and FP8;
- the router's split-K Triton gate GEMM + selection (fused_ops.gate_route) against cuBLAS's bf16 GEMM with
  fp32 output + the selection kernel: selections, logits, batch invariance, time.

Times are CUDA-graph replays (mean of `--iters` x 20). Usage: python benchmarks/moe_fusion.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wideep.model import fused_ops  # noqa: E402
from wideep.model.fp8 import FP8_DTYPE  # noqa: E402
from wideep.model.moe import RoutedExperts, gate_logits  # noqa: E402


def graph_us(fn, reps: int = 20, iters: int = 5) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / reps)
    return best


def experts_case(fp8: bool, tokens: int, rows: int, dev) -> dict:
    h, inter, nl = 7168, 2048, 8
    ex = RoutedExperts(nl, h, inter, (128, 128) if fp8 else None, n_shared=1).to(dev).requires_grad_(False)
    g = torch.Generator(device=dev)
    g.manual_seed(0)
    with torch.no_grad():
        for name, p in ex.named_parameters():
            if p.dtype == FP8_DTYPE:
                p.copy_(torch.randn(p.shape, device=dev, generator=g, dtype=torch.bfloat16).to(FP8_DTYPE))
            elif name.endswith("_scale_inv"):
                p.fill_(0.02)
            else:
                p.data = (torch.randn(p.shape, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    x = torch.randn(tokens + nl * rows, h, device=dev, generator=g).to(torch.bfloat16)
    counts = torch.full((nl,), rows, dtype=torch.int64, device=dev)
    fused_counts = torch.cat([torch.full((1,), tokens, dtype=torch.int64, device=dev), counts])
    with torch.no_grad():
        fused = lambda: ex(x, fused_counts, with_shared=True)                     # noqa: E731
        unfused = lambda: (ex(x[tokens:], counts), ex.shared(x[:tokens]))     # noqa: E731
        yf = fused()
        yr, ys = unfused()
        routed_alone = lambda: ex(x[tokens:], counts)                          # noqa: E731
        return {"precision": "fp8" if fp8 else "bf16", "tokens": tokens, "rows_per_expert": rows,
                "fused_us": graph_us(fused), "unfused_us": graph_us(unfused), "routed_only_us": graph_us(routed_alone),
                "routed_rows_equal": bool(torch.equal(yf[tokens:], yr)),
                "shared_max_rel": float((yf[:tokens].float() - ys.float()).abs().max() / ys.float().abs().max())}


def router_case(tokens: int, dev) -> dict:
    h, e = 7168, 256
    g = torch.Generator(device=dev)
    g.manual_seed(1)
    x = torch.randn(tokens, h, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(e, h, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    bias = torch.randn(e, device=dev, generator=g) * 0.01
    args = (8, 8, 4, True, 2.5)
    with torch.no_grad():
        old = lambda: fused_ops.route(gate_logits(x, w), bias, *args)       # noqa: E731
        new = lambda: fused_ops.gate_route(x, w, bias, *args)                # noqa: E731
        p = fused_ops.gate_partials(x, w)
        logits = p[0].clone()
        for part in p[1:]:
            logits += part
        ref = x.float() @ w.float().t()
        ids_new, w_new = new()
        ids_ref, w_ref = fused_ops.route_ref(logits, bias, *args)
        ids_old, _ = old()
        same = lambda a, b: bool(torch.equal(a.sort(1)[0], b.sort(1)[0]))  # noqa: E731
        inv = all(torch.equal(fused_ops.gate_route(x[lo:hi], w, bias, *args)[1], w_new[lo:hi])
                  for lo, hi in [(0, 1), (5, 12), (64, 128)] if hi <= tokens)
        return {"tokens": tokens, "cublas_route_us": graph_us(old), "triton_gate_route_us": graph_us(new),
                "logits_max_abs_vs_fp32": float((logits - ref).abs().max()),
                "ids_equal_route_ref": same(ids_new, ids_ref), "ids_equal_cublas_path": same(ids_new, ids_old),
                "weights_max_abs_vs_ref": float((w_new.sort(1)[0] - w_ref.sort(1)[0]).abs().max()),
                "batch_invariant_bits": bool(inv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 256])
    a = ap.parse_args()
    dev = torch.device("cuda")
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "experts": [], "router": []}
    for t in a.tokens:
        for fp8 in (False, True):
            out["experts"].append(experts_case(fp8, t, t, dev))
            print(out["experts"][-1], flush=True)
        out["router"].append(router_case(t, dev))
        print(out["router"][-1], flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
