"""Native FP8 kernels on the GPU: correctness against the torch reference (bit-exact activation codes,
GEMMs within fp32 rounding of the dequantized product) and time at R1's decode and prefill shapes against
bf16 (F.linear, torch._grouped_mm) and cuBLAS block-scaled FP8 (torch._scaled_mm).

  python benchmarks/fp8_gemm.py            # prints a table; exits 1 if a check fails
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wideep.model import fp8_triton  # noqa: E402
from wideep.model.fp8 import (act_quant_ref, dequant_act, dequant_rows, fp8_grouped_mlp, fp8_linear,  # noqa: E402
                              quantize_block_fp8, scale_row_index)


def graph_us(fn, iters=50) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(True), torch.cuda.Event(True)
    st.record()
    for _ in range(iters):
        g.replay()
    en.record()
    torch.cuda.synchronize()
    return st.elapsed_time(en) * 1e3 / iters


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def sweep(dev) -> None:
    """Tile configs of the Triton GEMM at a few R1 shapes (plain and grouped): prints the best of each."""
    import itertools
    import os

    shapes = [("plain", 128, 7168, 1536), ("plain", 128, 16384, 7168), ("plain", 8192, 7168, 4096),
              ("grouped", 8 * 128, 7168, 4096), ("grouped", 8 * 2048, 7168, 4096)]
    configs = [c for c in itertools.product((16, 32, 64, 128), (64, 128), ((4, 3), (8, 3), (4, 4)))
               if not (c[0] == 128 and c[2][0] == 4)]
    for kind, m, k, n in shapes:
        res = []
        for bm, bn, (wp, st) in configs:
            if kind == "plain" and m >= 4096 and bm < 64:
                continue
            os.environ[fp8_triton.CONFIG_ENV] = f"{bm},{bn},{wp},{st}"
            q = torch.randint(-100, 100, (m, k), device=dev).to(torch.float8_e4m3fn)
            sa = torch.rand(m, k // 128, device=dev).t().contiguous().t()
            if kind == "plain":
                w = torch.randint(-100, 100, (n, k), device=dev).to(torch.float8_e4m3fn)
                ws = torch.rand(n // 128, k // 128, device=dev)
                sidx = scale_row_index([n], 128, dev)
                fn = lambda: fp8_triton.fp8_gemm(q, sa, w, ws, sidx, torch.bfloat16)  # noqa: E731
            else:
                e = 8
                w = torch.randint(-100, 100, (e, n, k), device=dev).to(torch.float8_e4m3fn)
                ws = torch.rand(e, n // 128, k // 128, device=dev)
                sidx = scale_row_index([n], 128, dev)
                tiles = fp8_triton.group_tiles(torch.full((e,), m // e, device=dev), m, bm)
                fn = lambda: fp8_triton.fp8_gemm(q, sa, w, ws, sidx, torch.bfloat16, tiles=tiles, block_m=bm)  # noqa: E731
            try:
                res.append((graph_us(fn, 20), f"{bm},{bn},{wp},{st}"))
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                res.append((float("inf"), f"{bm},{bn},{wp},{st} ({type(exc).__name__})"))
        os.environ.pop(fp8_triton.CONFIG_ENV, None)
        res.sort()
        wbytes = n * k * (8 if kind == "grouped" else 1)
        print(f"sweep {kind} {m}x{k}x{n}: " + "; ".join(f"{c} {t:.1f}us" for t, c in res[:4])
              + f"  (best {wbytes / res[0][0] / 1e3:,.0f} GB/s weights, {2 * m * n * k / res[0][0] / 1e6:,.0f} TFLOP/s)")


def main() -> int:
    dev = torch.device("cuda")
    if "--sweep" in sys.argv:
        sweep(dev)
    torch.manual_seed(0)
    ok = True
    # ---- correctness ----
    x = torch.randn(77, 7168, device=dev, dtype=torch.bfloat16) * 3
    q, s = fp8_triton.act_quant(x)
    qr, sr = act_quant_ref(x)
    same = torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr)
    print(f"act_quant codes+scales bit-exact vs torch: {same}")
    ok &= same
    h = torch.randn(77, 4096, device=dev, dtype=torch.bfloat16) * 3
    q2, s2 = fp8_triton.silu_mul_quant(h)
    q2r, s2r = act_quant_ref((F.silu(h[:, :2048]) * h[:, 2048:]))
    mism = (q2.view(torch.uint8) != q2r.view(torch.uint8)).float().mean().item()
    print(f"silu_mul_quant code mismatch fraction vs torch: {mism:.2e}; scale rel {rel(s2, s2r):.1e}")
    ok &= mism < 1e-3
    for m, k, n in [(1, 7168, 1536), (128, 7168, 576), (128, 1536, 24576), (300, 16384, 7168), (4096, 7168, 4096)]:
        w, ws = quantize_block_fp8(torch.randn(n, k, device=dev) * 0.02)
        sidx = scale_row_index([n], 128, dev)
        xa = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        y = fp8_linear(xa, w, ws, sidx)
        qa, sa = act_quant_ref(xa)
        ref = dequant_act(qa, sa) @ dequant_rows(w, ws, sidx).t()
        e = rel(y, ref)
        print(f"fp8_linear {m}x{k}x{n}: rel err vs dequantized reference {e:.1e}")
        ok &= e < 1e-2
    counts = torch.tensor([130, 0, 1, 260, 17, 128, 0, 300], device=dev)
    nrows = int(counts.sum()) + 5
    w13 = torch.stack([quantize_block_fp8(torch.randn(4096, 7168, device=dev) * 0.02)[0] for _ in range(8)])
    s13 = torch.rand(8, 32, 56, device=dev) * 0.001 + 1e-4
    w2 = torch.stack([quantize_block_fp8(torch.randn(7168, 2048, device=dev) * 0.02)[0] for _ in range(8)])
    s2_ = torch.rand(8, 56, 16, device=dev) * 0.001 + 1e-4
    i13, i2 = scale_row_index([2048, 2048], 128, dev), scale_row_index([7168], 128, dev)
    xg = torch.randn(nrows, 7168, device=dev, dtype=torch.bfloat16)
    yg = fp8_grouped_mlp(xg, w13, s13, i13, w2, s2_, i2, counts, impl="triton")
    yr = fp8_grouped_mlp(xg, w13, s13, i13, w2, s2_, i2, counts, impl="torch")
    e = rel(yg, yr)
    pad_zero = bool((yg[-5:] == 0).all())
    print(f"fp8 grouped MLP (zero-row experts, 5 padding rows): rel err vs torch path {e:.1e}; padding zero {pad_zero}")
    ok &= e < 2e-2 and pad_zero

    # ---- the lean MoE path's fused ops on the GPU vs their torch references ----
    from wideep.model import fused_ops, moe_permute

    lg = torch.randn(333, 256, device=dev)
    bias = torch.randn(256, device=dev) * 0.1
    ia, wa = fused_ops.route(lg, bias, 8, 8, 4, True, 2.5)
    ib, wb_ = fused_ops.route_ref(lg, bias, 8, 8, 4, True, 2.5)
    sa_, oa = ia.sort(1)
    sb_, ob = ib.sort(1)
    r_ok = torch.equal(sa_, sb_) and torch.allclose(wa.gather(1, oa), wb_.gather(1, ob), atol=1e-5)
    xn = torch.randn(129, 7168, device=dev, dtype=torch.bfloat16)
    rn = torch.randn(129, 7168, device=dev, dtype=torch.bfloat16)
    wn = torch.rand(7168, device=dev, dtype=torch.bfloat16) + 0.5
    n1, s1 = fused_ops.rms_norm(xn, wn, 1e-6, rn)
    n_err = rel(n1, fused_ops.rms_norm_ref(xn + rn, wn, 1e-6))
    s_ok = torch.equal(s1, xn + rn)
    yy = torch.randn(1000, 7168, device=dev, dtype=torch.bfloat16)
    ii = torch.randint(-1, 1000, (130, 8), device=dev)
    g_err = rel(moe_permute.gather_sum(yy, ii), moe_permute.gather_sum(yy, ii, impl="torch"))
    print(f"fused router ids equal + weights close: {r_ok}; rms_norm+residual rel {n_err:.1e} (sum exact {s_ok}); "
          f"gather_sum rel {g_err:.1e}")
    ok &= r_ok and n_err < 1e-2 and s_ok and g_err < 1e-6

    # ---- timing ----
    print("\n| shape (M x K x N) | bf16 us | cuBLAS fp8 block us | Triton fp8 us (incl. act quant) | fp8 weight GB/s |")
    print("|---|---|---|---|---|")
    for m in (128, 256, 8192):
        for k, n, name in [(7168, 1536, "q_a"), (1536, 24576, "q_b"), (7168, 576, "kv_a"), (16384, 7168, "o"),
                           (7168, 4096, "shared w13"), (2048, 7168, "shared w2")]:
            wb = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            w, ws = quantize_block_fp8(wb.float())
            sidx = scale_row_index([n], 128, dev)
            xa = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            tb = graph_us(lambda: F.linear(xa, wb))
            tt = graph_us(lambda: fp8_linear(xa, w, ws, sidx))  # cuBLAS at M >= 512 when it accepts
            try:
                qa, sa = fp8_triton.act_quant(xa)
                sb = ws.t()  # [K/128, N/128], outer-dim major
                tc = graph_us(lambda: torch._scaled_mm(qa, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16))
            except (RuntimeError, TypeError) as exc:
                tc = float("nan")
                if m == 128 and name == "q_a":
                    print(f"(cuBLAS block-scaled refused: {str(exc)[:120]})")
            print(f"| {m} x {k} x {n} ({name}) | {tb:.1f} | {tc:.1f} | {tt:.1f} | {n * k / tt / 1e3:,.0f} |")
    print("\n| routed experts (E x rows/expert), w13+silu+w2 | bf16 _grouped_mm us | Triton fp8 us | fp8 weight GB/s |")
    print("|---|---|---|---|")
    for e, per in [(8, 128), (8, 256), (32, 32), (8, 8192)]:
        cnt = torch.full((e,), per, device=dev)
        xg = torch.randn(e * per, 7168, device=dev, dtype=torch.bfloat16)
        b13 = torch.randn(e, 4096, 7168, device=dev, dtype=torch.bfloat16) * 0.02
        b2 = torch.randn(e, 7168, 2048, device=dev, dtype=torch.bfloat16) * 0.02
        f13, f2 = b13.to(torch.float8_e4m3fn), b2.to(torch.float8_e4m3fn)
        c13 = torch.full((e, 32, 56), 0.02, device=dev)
        c2 = torch.full((e, 56, 16), 0.02, device=dev)
        offs = torch.cumsum(cnt, 0).to(torch.int32)

        def bf16():
            hh = torch._grouped_mm(xg, b13.transpose(1, 2), offs=offs)
            return torch._grouped_mm(F.silu(hh[:, :2048]) * hh[:, 2048:], b2.transpose(1, 2), offs=offs)

        tb = graph_us(bf16, 20)
        tt = graph_us(lambda: fp8_grouped_mlp(xg, f13, c13, i13, f2, c2, i2, cnt, impl="triton"), 20)
        print(f"| {e} x {per} | {tb:.1f} | {tt:.1f} | {e * 3 * 2048 * 7168 / tt / 1e3:,.0f} |")
    print(f"\nRESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
