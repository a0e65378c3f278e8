"""Paged MLA decode benchmark: the fused Triton kernel against the torch reference, R1 shapes.

For each (batch, context): correctness of both against an fp32 oracle (same bf16 inputs upcast), then
the time of one decode-attention call per layer, CUDA-graph captured (median over many replays, several
calls per graph on rotating cache sets so small cases are not served from L2), the achieved bandwidth
(latent cache + q + out bytes) against a measured device-to-device copy, and TFLOP/s. Every Triton tile
config in the sweep is timed; a config that fails to compile is reported and skipped. Also checks the
engine's graph pattern: capture with seq_len 0 everywhere, fill ragged lengths + a wide NaN-padded block
table, replay, compare with the oracle.

  GPU:  PYTHONPATH=$PWD python3 benchmarks/mla_decode.py            (< 3 min on one H100)
  CPU:  .venv/bin/python benchmarks/mla_decode.py                   (tiny shapes, Triton interpreter)
  H200: PYTHONPATH=$PWD python3 benchmarks/mla_decode.py --suite [--study] --old OLD_MODULE.py
        (issue 15: bf16 + fp8 correctness, batch invariance, present kernel vs new configs, tiny model graph
         vs eager tokens; --study: tokens per split vs batch size; ~40 s each on an H200)
  H200: PYTHONPATH=$PWD python3 benchmarks/mla_decode.py --ablate   (where the Gluon kernels' time goes)
  AOT:  .venv/bin/python benchmarks/mla_decode.py --aot             (no GPU: compile for sm_90, print
                                                                     shared memory, registers, spills;
        MLA_AOT_ONLY=e4m3 compiles only the Hopper kernels whose tag contains the text)
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWEEP = ["64,32,8,2", "64,16,8,3", "64,64,8,2", "32,32,4,2", "16,32,4,2"]
SCALE = 0.135234          # R1 softmax scale (192^-0.5 * YaRN mscale^2)
L, R = 512, 64            # kv_lora_rank, qk_rope_head_dim


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="1,32,64,128,256")
    p.add_argument("--contexts", default="2048,4096")
    p.add_argument("--heads", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--configs", default=",".join(f"[{c}]" for c in SWEEP),
                   help="Triton tile configs to sweep, '[bh,bn,warps,stages],[...]' ('' = default only)")
    p.add_argument("--deadline", type=float, default=150.0, help="seconds; past it only the default config runs")
    p.add_argument("--json", default=None, help="write all results to this file")
    p.add_argument("--aot", action="store_true", help="compile the sweep for sm_90 without a GPU and report")
    p.add_argument("--aot-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--suite", action="store_true",
                   help="the H200 suite: correctness (bf16 + fp8, 1-4 query tokens, 16-128 heads, batch invariance), "
                        "present kernel vs new configs at B=128/256 x ctx 2k/4k/8k, bf16 and fp8 cache, and graph vs "
                        "eager tokens of the tiny model")
    p.add_argument("--study", action="store_true", help="tokens per split vs batch size, fp8 compute variants")
    p.add_argument("--ablate", action="store_true",
                   help="where the Gluon kernels' time goes: the half-page kernel with parts left out, split counts, "
                        "the merge kernel alone (benchmarks/mla_decode_ablate.py)")
    p.add_argument("--ablate-target", default=None, help="run one config a few times eagerly (an ncu target)")
    p.add_argument("--ablate-extra", default="", help="--ablate: more configs to time (';'-separated)")
    p.add_argument("--ablate-quick", action="store_true", help="--ablate: B=128/256 only, no split-count variants")
    p.add_argument("--ablate-only-extra", action="store_true",
                   help="--ablate: time only the --ablate-extra entries (no built-in variants, split counts, merge)")
    p.add_argument("--smoke", action="store_true",
                   help="each --suite-configs entry, then the automatic choice over a bf16 and an fp8 cache, on a "
                        "small case vs the oracle")
    p.add_argument("--old", default=None, help="path of the present kernel's module (mla_decode_triton.py of main) "
                   "to time beside the new one")
    p.add_argument("--no-fp8-timings", dest="suite_fp8_timings", action="store_false",
                   help="--suite: time the bf16 cache only (the fp8 checks still run)")
    p.add_argument("--suite-configs", default="64,64,8,2,sv;64,64,8,2,sv,tma;64,64,8,2,sv,f16,tma;64,64,8,2,sv,f16")
    return p.parse_args(argv)


def parse_configs(text: str) -> list[str]:
    return [c.strip("[] ") for c in text.split("],") if c.strip("[] ")]


# ---- helpers -------------------------------------------------------------------------------------

def build_case(torch, b, ctx, heads, page, sets, device, dtype, seed=0):
    """sets × (q_lat, q_pe, block table) over one cache pool; every seq is full (seq_len = ctx)."""
    g = torch.Generator(device=device).manual_seed(seed)   # on the device: GBs of random data in no time
    pages = ctx // page
    pool = sets * b * pages + 1
    cache = torch.randn(pool, page, L + R, generator=g, device=device, dtype=dtype)
    cache[-1] = float("nan")              # a block nobody owns: any stray read poisons the result
    perm = torch.randperm(pool - 1, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    tables = perm[: sets * b * pages].view(sets, b, pages).to(device)
    # the model's layout: [q_lat ‖ q_pe] per head in one head-major [H, B, L + R] buffer (MLA._decode)
    bufs = [torch.randn(heads, b, L + R, generator=g, device=device, dtype=dtype).transpose(0, 1)
            for _ in range(sets)]
    qs = [(buf[..., :L], buf[..., L:]) for buf in bufs]
    seq_lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    return cache, tables, qs, seq_lens


def errors(torch, out, truth):
    diff = (out.float() - truth).abs()
    finite = bool(torch.isfinite(out).all())
    amax = float(diff.max()) if finite else float("inf")
    return amax, amax / max(float(truth.abs().max()), 1e-30), finite


def time_graph(torch, calls, sets, reps=20):
    """Median seconds per call: `calls` launches (rotating over sets) captured in one CUDA graph."""
    n = max(4, sets)
    for i in range(n):           # eager warm-up: compiles, allocator
        calls(i % sets)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls(0)
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        for i in range(n):
            calls(i % sets)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / n)
    del graph
    return statistics.median(times)


def copy_bandwidth(torch):
    """Device-to-device copy of 1 GiB, events outside a graph; bytes read + written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


# ---- GPU run ---------------------------------------------------------------------------------------

def run_gpu(args):
    import torch
    import triton
    from wideep.model import mla_decode_triton as mdt
    from wideep.model.attention import paged_mla_decode_torch

    t_start = time.perf_counter()
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    print(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
          f"L2 {getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB; torch {torch.__version__}, "
          f"triton {triton.__version__}, python {sys.version.split()[0]}", flush=True)
    bw = copy_bandwidth(torch)
    print(f"device-to-device copy (1 GiB, read+write): {bw / 1e9:,.0f} GB/s", flush=True)
    configs = parse_configs(args.configs)
    default_cfg = str(mdt._candidates(args.heads, interpret=False)[0])
    print(f"default config (block_h,block_n,warps,stages): {default_cfg}; sweep: {configs}\n", flush=True)

    batches = [int(x) for x in args.batch_sizes.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    rows, failures, compile_errors = [], [], {}
    page, heads = args.block_size, args.heads

    def triton_call(cfg_text, q, cache, table, seq_lens):
        cfg = mdt.DecodeConfig.parse(cfg_text)
        return mdt.mla_decode(q[0], q[1], cache, table, seq_lens, SCALE, config=cfg)

    for ctx in contexts:
        for b in batches:
            elapsed = time.perf_counter() - t_start
            sweep = configs if elapsed < args.deadline else []
            cache_bytes = b * ctx * (L + R) * 2
            sets = max(1, min(16, math.ceil(160e6 / cache_bytes)))
            try:
                cache, tables, qs, seq_lens = build_case(torch, b, ctx, heads, page, sets, dev, torch.bfloat16)
            except torch.cuda.OutOfMemoryError:
                print(f"B={b} ctx={ctx}: out of memory building inputs, skipped", flush=True)
                continue
            q_bytes = b * heads * (L + R) * 2
            out_bytes = b * heads * L * 2
            total_bytes = cache_bytes + q_bytes + out_bytes
            flops = 2 * b * heads * ctx * (L + R + L)
            row = dict(batch=b, ctx=ctx, bytes=total_bytes, sets=sets)

            truth = paged_mla_decode_torch(qs[0][0].float(), qs[0][1].float(), cache.float(), tables[0],
                                           seq_lens, L, SCALE)
            ref = paged_mla_decode_torch(qs[0][0], qs[0][1], cache, tables[0], seq_lens, L, SCALE)
            row["torch_err"] = errors(torch, ref, truth)
            del ref
            try:
                row["torch_s"] = time_graph(torch, lambda i: paged_mla_decode_torch(
                    qs[i][0], qs[i][1], cache, tables[i], seq_lens, L, SCALE), sets, reps=10)
            except Exception as exc:  # noqa: BLE001 - report and go on
                row["torch_s"] = None
                print(f"  torch timing failed: {exc!r}", flush=True)
            torch.cuda.empty_cache()

            row["triton"] = {}
            for cfg in ([default_cfg] + [c for c in sweep if c != default_cfg]):
                if cfg in compile_errors:
                    continue
                try:
                    out = triton_call(cfg, qs[0], cache, tables[0], seq_lens)
                    err = errors(torch, out, truth)
                    t = time_graph(torch, lambda i, cfg=cfg: triton_call(cfg, qs[i], cache, tables[i], seq_lens),
                                   sets)
                    row["triton"][cfg] = dict(s=t, err=err)
                    ok = err[2] and err[0] <= max(2 * row["torch_err"][0], 1e-2 * float(truth.abs().max()))
                    if not ok:
                        failures.append(f"B={b} ctx={ctx} cfg={cfg}: err {err} vs torch {row['torch_err']}")
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    msg = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    compile_errors[cfg] = msg[-800:]
                    print(f"  triton config {cfg} failed: {msg[-800:]}", flush=True)
            del truth, cache, tables, qs
            torch.cuda.empty_cache()
            rows.append(row)
            print_row(row, bw, flops, default_cfg)

    graph_check = check_graph_pattern(torch, mdt, paged_mla_decode_torch, heads, page, default_cfg)
    wide = time_wide_tables(torch, mdt, heads, page, bw, default_cfg)
    summarize(rows, bw, default_cfg, failures, compile_errors, graph_check, wide, time.perf_counter() - t_start)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, copy_bw=bw, failures=failures,
                                                   compile_errors=compile_errors, graph_check=graph_check,
                                                   wide=wide), indent=1, default=str))


def best_cfg(row):
    done = {c: v for c, v in row["triton"].items() if v["s"]}
    return min(done.items(), key=lambda kv: kv[1]["s"]) if done else (None, None)


def print_row(row, bw, flops, default_cfg):
    b, ctx = row["batch"], row["ctx"]
    t_ref = row.get("torch_s")
    print(f"B={b:4d} ctx={ctx}: torch {fmt_ms(t_ref)} ms (err {row['torch_err'][1]:.2e} rel)", flush=True)
    for cfg, v in row["triton"].items():
        gbs = row["bytes"] / v["s"] / 1e9
        tag = " (default)" if cfg == default_cfg else ""
        sp = f"{t_ref / v['s']:.1f}x" if t_ref else "n/a"
        print(f"    triton {cfg:>10s}{tag:10s} {v['s'] * 1e3:8.4f} ms  {gbs:7,.0f} GB/s ({gbs * 1e9 / bw:5.1%} of copy)"
              f"  {flops / v['s'] / 1e12:6.1f} TFLOP/s  speedup {sp:>6s}  max abs err {v['err'][0]:.2e}"
              f" rel {v['err'][1]:.2e} finite={v['err'][2]}", flush=True)


def fmt_ms(s):
    return f"{s * 1e3:.4f}" if s else "n/a"


def check_graph_pattern(torch, mdt, reference, heads, page, cfg_text):
    """Engine pattern: capture with seq_len 0 rows, then replay with ragged lengths and a wide table."""
    try:
        g = torch.Generator(device="cpu").manual_seed(1)
        b, ctx, width = 64, 4096, 2560
        lens = torch.randint(0, ctx + 1, (b,), generator=g)
        lens[::8] = 0
        lens[1] = 1
        pages = [-(-int(n) // page) for n in lens]
        pool = sum(pages) + 1
        cache = torch.randn(pool, page, L + R, generator=g).to("cuda", torch.bfloat16)
        nan_block = pool - 1
        cache[nan_block] = float("nan")
        table = torch.full((b, width), nan_block, dtype=torch.int32)
        nxt = 0
        for i, n in enumerate(pages):
            table[i, :n] = torch.arange(nxt, nxt + n, dtype=torch.int32)
            tail = int(lens[i]) % page
            if tail:
                cache[nxt + n - 1, tail:] = float("nan")   # slots past seq_len: must not be read
            nxt += n
        q_lat = torch.randn(b, heads, L, generator=g).to("cuda", torch.bfloat16)
        q_pe = torch.randn(b, heads, R, generator=g).to("cuda", torch.bfloat16)
        # static buffers as the engine keeps them: zeros at capture time
        s_lens = torch.zeros(b, dtype=torch.int32, device="cuda")
        s_table = torch.zeros((b, width), dtype=torch.int32, device="cuda")
        cfg = mdt.DecodeConfig.parse(cfg_text)
        mdt.mla_decode(q_lat, q_pe, cache, s_table, s_lens, SCALE, config=cfg)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = mdt.mla_decode(q_lat, q_pe, cache, s_table, s_lens, SCALE, config=cfg)
        s_lens.copy_(lens.to(torch.int32))
        s_table.copy_(table)
        graph.replay()
        torch.cuda.synchronize()
        narrow = s_table[:, : ctx // page]   # the reference gathers the whole table: keep it to what is used
        truth = reference(q_lat.float(), q_pe.float(), cache.float(), narrow, s_lens, L, SCALE)
        err = errors(torch, out, truth)
        zero_rows = lens == 0
        zeros_ok = bool((out[zero_rows.cuda()] == 0).all())
        ok = err[2] and zeros_ok and err[1] < 2e-2
        print(f"\ngraph pattern (B={b}, ragged lens up to {ctx}, table width {width}, NaN padding, "
              f"captured at seq_len 0 then replayed): max abs err {err[0]:.2e} rel {err[1]:.2e} "
              f"finite={err[2]} zero rows exact={zeros_ok} -> {'PASS' if ok else 'FAIL'}", flush=True)
        return dict(ok=ok, err=err, zero_rows_exact=zeros_ok)
    except Exception as exc:  # noqa: BLE001
        print(f"\ngraph pattern check failed to run: {exc!r}", flush=True)
        return dict(ok=False, error=repr(exc))


def time_wide_tables(torch, mdt, heads, page, bw, cfg_text):
    """The engine's graphs use a max_model_len-wide table (2560 pages): split heuristics must not suffer."""
    res = []
    cfg = mdt.DecodeConfig.parse(cfg_text)
    print("\nwide block table (2560 entries, as in the engine's CUDA graphs), default config:", flush=True)
    for b in (1, 32, 128):
        try:
            ctx = 2048
            sets = max(1, min(16, math.ceil(160e6 / (b * ctx * (L + R) * 2))))
            cache, tables, qs, seq_lens = build_case(torch, b, ctx, heads, page, sets, "cuda", torch.bfloat16)
            wide = torch.full((sets, b, 2560), cache.shape[0] - 1, dtype=torch.int32, device="cuda")
            wide[:, :, : tables.shape[2]] = tables
            t = time_graph(torch, lambda i: mdt.mla_decode(qs[i][0], qs[i][1], cache, wide[i], seq_lens, SCALE,
                                                           config=cfg), sets)
            nbytes = b * ctx * (L + R) * 2 + b * heads * (2 * L + R) * 2
            print(f"  B={b:4d} ctx={ctx}: {t * 1e3:.4f} ms, {nbytes / t / 1e9:,.0f} GB/s", flush=True)
            res.append(dict(batch=b, ctx=ctx, s=t))
            del cache, tables, qs, wide
            torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001
            print(f"  B={b}: failed: {exc!r}", flush=True)
    return res


def summarize(rows, bw, default_cfg, failures, compile_errors, graph_check, wide, elapsed):
    print("\n## MLA decode attention, one layer (H=128, latent 512+64, bf16, block 64, CUDA graph)\n")
    print(f"copy bandwidth ceiling: {bw / 1e9:,.0f} GB/s (read+write)\n")
    print("| B | ctx | torch ms | triton ms (default) | best config | best ms | speedup vs torch | GB/s (best) "
          "| % of copy BW | TFLOP/s (best) | rel err torch | rel err triton |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    wins = {}
    for row in rows:
        cfg, v = best_cfg(row)
        if cfg is None:
            print(f"| {row['batch']} | {row['ctx']} | {fmt_ms(row.get('torch_s'))} | failed | | | | | | | "
                  f"{row['torch_err'][1]:.1e} | |")
            continue
        wins[cfg] = wins.get(cfg, 0) + 1
        d = row["triton"].get(default_cfg)
        flops = 2 * row["batch"] * 128 * row["ctx"] * (L + R + L)
        gbs = row["bytes"] / v["s"] / 1e9
        sp = f"{row['torch_s'] / v['s']:.1f}x" if row.get("torch_s") else "n/a"
        print(f"| {row['batch']} | {row['ctx']} | {fmt_ms(row.get('torch_s'))} | {fmt_ms(d['s']) if d else 'n/a'} "
              f"| {cfg} | {v['s'] * 1e3:.4f} | {sp} | {gbs:,.0f} | {gbs * 1e9 / bw:.0%} "
              f"| {flops / v['s'] / 1e12:.0f} | {row['torch_err'][1]:.1e} | {v['err'][1]:.1e} |")
    print()
    if wins:
        best = max(wins.items(), key=lambda kv: kv[1])[0]
        print(f"config wins: {wins}; default is {default_cfg}"
              + ("" if best == default_cfg else f" -> consider WIDEEP_MLA_DECODE_CONFIG={best} (or make it the "
                 "first entry of CUDA_CONFIGS_MANY_HEADS in wideep/model/mla_decode_triton.py)"))
    for cfg, msg in compile_errors.items():
        print(f"config {cfg} did not run: {msg.splitlines()[-1][:300]}")
    ok = not failures and bool(rows) and all(r["triton"] for r in rows) and graph_check.get("ok")
    for f in failures:
        print(f"ACCURACY FAIL: {f}")
    print(f"\nRESULT: {'PASS' if ok else 'FAIL'} (correctness of every timed triton config vs fp32 oracle, "
          f"graph pattern check); total {elapsed:.0f}s")


# ---- CPU run (interpreter, small) --------------------------------------------------------------------

def run_cpu(args):
    import torch
    from wideep.model import mla_decode_triton as mdt
    from wideep.model.attention import paged_mla_decode_torch

    print("no CUDA: small shapes, Triton interpreter (correctness only; timings are the torch reference's)")
    heads, page = 16, 16
    ok = True
    for b in (1, 3):
        for ctx in (64, 128):
            cache, tables, qs, seq_lens = build_case(torch, b, ctx, heads, page, 1, "cpu", torch.bfloat16)
            seq_lens[0] = ctx - 5
            truth = paged_mla_decode_torch(qs[0][0].float(), qs[0][1].float(), cache.float(), tables[0],
                                           seq_lens, L, SCALE)
            t = time.perf_counter()
            ref = paged_mla_decode_torch(qs[0][0], qs[0][1], cache, tables[0], seq_lens, L, SCALE)
            t_ref = time.perf_counter() - t
            if not mdt.triton_available():
                print(f"B={b} ctx={ctx}: torch {t_ref * 1e3:.2f} ms; triton not installed")
                continue
            for splits in (1, 3):
                out = mdt.mla_decode(qs[0][0], qs[0][1], cache, tables[0], seq_lens, SCALE, chunk=128 if splits > 1
                                     else 1024)
                e_t, e_r = errors(torch, out, truth), errors(torch, ref, truth)
                good = e_t[2] and e_t[0] <= max(2 * e_r[0], 1e-2)
                ok &= good
                print(f"B={b} ctx={ctx} splits={splits}: torch {t_ref * 1e3:.2f} ms, rel err torch {e_r[1]:.2e} "
                      f"triton {e_t[1]:.2e} -> {'ok' if good else 'MISMATCH'}")
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")


# ---- AOT report (no GPU) ------------------------------------------------------------------------------

def aot_child(configs):
    os.environ.pop("TRITON_INTERPRET", None)
    import triton  # before wideep: keeps the compiler (not the interpreter) active without a GPU
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from wideep.model import mla_decode_triton as mdt

    kern = triton.jit(mdt._mla_decode_split_kernel, do_not_specialize=["chunk", "max_splits"])
    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    aligned = {"Q_LAT", "Q_PE", "KV", "BLOCK_TABLES", "SEQ_LENS", "OUT", "LSE", "FIN", "stride_ql_b", "stride_ql_q",
               "stride_ql_h", "stride_qp_b", "stride_qp_q", "stride_kv_blk", "stride_kv_tok", "stride_o_b",
               "stride_o_r", "stride_o_s"}
    ints = ["chunk", "max_splits", "H", "stride_ql_b", "stride_ql_q", "stride_ql_h", "stride_qp_b", "stride_qp_q",
            "stride_qp_h", "stride_kv_blk", "stride_kv_tok", "stride_bt_b", "stride_o_b", "stride_o_r", "stride_o_s",
            "stride_lse_b", "stride_lse_r", "stride_f_b", "stride_f_r"]
    print(f"triton {triton.__version__}, target sm_90 (page 64, L 512, R 64, bf16 queries)")
    for text in configs:
        cfg = mdt.DecodeConfig.parse(text)
        for split, kv in ((False, "bf16"), (True, "bf16"), (True, "fp8e4nv")):
            sig = {"Q_LAT": "*bf16", "Q_PE": "*bf16", "KV": f"*{kv}", "BLOCK_TABLES": "*i32", "SEQ_LENS": "*i32",
                   "OUT": "*fp32" if split else "*bf16", "LSE": "*fp32", "FIN": "*bf16", "sm_scale_log2": "fp32", "out_scale": "fp32"}
            sig.update({n: "i32" for n in ints})
            consts = dict(L=L, R=R, PAGE=64, BLOCK_L=L, BLOCK_R=R, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n,
                          HALF=L // 2, NUM_Q=1, ALIGN=128, SPLIT=split, IEEE=False, SPLIT_V=cfg.split_v,
                          KV_FP8=kv != "bf16", DOT_F32=False)
            sig.update({k: "constexpr" for k in consts})
            attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n in aligned}
            t = time.perf_counter()
            tag = f"{text:>12s} split={int(split)} kv={kv:7s}"
            try:
                k = triton.compile(ASTSource(kern, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                   options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
                cubin = Path(f"/tmp/mla_decode_{text.replace(',', '_')}_{int(split)}_{kv}.cubin")
                cubin.write_bytes(k.asm["cubin"])
                res = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                                     text=True).stdout
                regs = " ".join(w for line in res.splitlines() if "REG" in line for w in line.split()[:2])
                sass = subprocess.run([str(bindir / "nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
                print(f"  {tag}: {time.perf_counter() - t:4.1f}s smem {k.metadata.shared:6d} B"
                      f"  {regs}  local ld/st {sass.count('LDL')}/{sass.count('STL')}  HGMMA {sass.count('HGMMA')}"
                      f"  HMMA {sass.count('HMMA')}  LDGSTS {sass.count('LDGSTS')}", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"  {tag}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def aot_hopper():
    """The Hopper kernels (TMA tile, Gluon kernel) compiled for sm_90 without a GPU: shared memory,
    registers, spills, wgmma and bulk-copy counts (what to check before spending device time)."""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from wideep.model import mla_decode_hopper

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ints = ["chunk", "max_splits", "H", "stride_ql_b", "stride_ql_q", "stride_ql_h", "stride_qp_b", "stride_qp_q",
            "stride_qp_h", "stride_kv_blk", "stride_kv_tok", "stride_bt_b", "stride_o_b", "stride_o_r", "stride_o_s",
            "stride_lse_b", "stride_lse_r", "stride_f_b", "stride_f_r"]

    def report(tag, k):
        cubin = Path(f"/tmp/mla_decode_{re.sub('[^a-z0-9]+', '_', tag)}.cubin")
        cubin.write_bytes(k.asm["cubin"])
        res = subprocess.run([str(bindir / "cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                             text=True).stdout
        regs = " ".join(w for line in res.splitlines() if "REG" in line for w in line.split()[:2])
        sass = subprocess.run([str(bindir / "nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
        shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", k.asm["ptx"])))
        print(f"  {tag}: smem {k.metadata.shared:6d} B  {regs}  local ld/st {sass.count('LDL')}/{sass.count('STL')}"
              f"  HGMMA {sass.count('HGMMA')} {shapes}  UTMALDG {sass.count('UTMALDG')}", flush=True)

    kern = triton.jit(mla_decode_hopper._mla_decode_tma_kernel, do_not_specialize=["chunk", "max_splits"])
    aligned = {"Q_LAT", "Q_PE", "KV", "BLOCK_TABLES", "SEQ_LENS", "OUT", "LSE", "FIN", "stride_ql_b", "stride_ql_q",
               "stride_ql_h", "stride_qp_b", "stride_qp_q", "stride_kv_blk", "stride_kv_tok", "stride_o_b",
               "stride_o_r", "stride_o_s"}
    only = os.environ.get("MLA_AOT_ONLY")   # a substring of the tags: compile just those (iterating on one kernel)
    for kv, qd in (("bf16", "bf16"), ("fp8e4nv", "fp16")):
        if only and only not in f"tma 64,64,8,2 kv={kv}":
            continue
        sig = {"Q_LAT": f"*{qd}", "Q_PE": f"*{qd}", "KV": f"*{kv}", "KV_DESC": f"tensordesc<{kv}[1,64,256]>",
               "PE_DESC": f"tensordesc<{kv}[1,64,64]>", "BLOCK_TABLES": "*i32", "SEQ_LENS": "*i32", "OUT": "*fp32",
               "LSE": "*fp32", "FIN": f"*{qd}", "sm_scale_log2": "fp32", "out_scale": "fp32"}
        sig.update({n: "i32" for n in ints})
        consts = dict(L=L, R=R, PAGE=64, BLOCK_H=64, HALF=L // 2, NUM_Q=1, ALIGN=128, SPLIT=True, KV_FP8=kv != "bf16")
        sig.update({k: "constexpr" for k in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n in aligned}   # as launched
        try:
            k = triton.compile(ASTSource(kern, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=8, num_stages=2))
            report(f"tma 64,64,8,2 kv={kv}", k)
        except Exception as exc:  # noqa: BLE001
            print(f"  tma kv={kv}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    try:
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon._runtime import GluonASTSource
        from wideep.model import mla_decode_gluon as mg
    except ImportError as exc:
        print(f"  gluon: not available in this Triton ({exc})")
        return
    gints = ["chunk", "max_splits", "H", "blk_rows", "stride_ql_b", "stride_ql_q", "stride_ql_h", "stride_qp_b",
             "stride_qp_q", "stride_qp_h", "stride_bt_b", "stride_o_b", "stride_o_r", "stride_o_s", "stride_lse_b",
             "stride_lse_r", "stride_f_b", "stride_f_r"]
    from wideep.model import mla_decode_e4m3 as me
    from wideep.model import mla_decode_halfpage as mh
    from wideep.model import mla_decode_scorer as ms
    # what a launch specializes as 16-divisible (bases of fresh tensors, the query's strides: multiples of 64)
    galigned = {"Q_LAT", "Q_PE", "BLOCK_TABLES", "SEQ_LENS", "OUT", "LSE", "FIN", "stride_ql_b", "stride_ql_q",
                "stride_ql_h", "stride_qp_b", "stride_qp_q", "stride_qp_h"}
    # (tag, kernel, cache dtype, run-time arguments after the strides); the one-scorer kernel serves `sc` and
    # `sc,ps` alike (they differ in the grid only)
    kernels = [("gluon 64,64,4,2", mg._mla_decode_gluon_kernel, "bf16", []),
               ("gluon 64,64,4,2,hp", mh._mla_decode_halfpage_kernel, "bf16", []),
               ("gluon 64,64,4,2,hp,e4m3", me._mla_decode_e4m3_kernel, "fp8e4nv", []),
               ("gluon 64,64,4,2,sc and sc,ps", ms._mla_decode_scorer_kernel, "bf16", ["NB", "n_splits_grid"])]
    for (tag, kern, kv, extra), split in ((k, s) for k in kernels for s in (True, False)):
        if only and only not in tag:
            continue
        lay = gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16 if kv == "bf16" else gl.float8e4nv)
        part = "*fp32" if split else "*bf16"   # unsplit: out = lse = fin, the output itself
        sig = {"Q_LAT": "*bf16", "Q_PE": "*bf16", "kv_desc": f"tensordesc<{kv}[64,64],{lay!r}>",
               "BLOCK_TABLES": "*i32", "SEQ_LENS": "*i32", "OUT": part, "LSE": part, "FIN": "*bf16",
               "sm_scale_log2": "fp32", "out_scale": "fp32"}
        sig.update({n: "i32" for n in gints + extra})
        consts = dict(L=L, R=R, PAGE=64, STAGES=2, NUM_Q=1, ALIGN=128, SPLIT=split)
        sig.update({k: "constexpr" for k in consts})
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n in galigned}   # as launched
        tag = f"{tag} split={int(split)}"
        try:
            k = triton.compile(GluonASTSource(kern, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=mg.NUM_WARPS, maxnreg=mg.MAXNREG))
            report(tag, k)
        except Exception as exc:  # noqa: BLE001
            print(f"  {tag}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    configs = parse_configs(args.configs)
    if args.aot_child:
        if not os.environ.get("MLA_AOT_ONLY"):
            aot_child(configs)
        return aot_hopper()
    if args.aot:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--aot-child", "--configs", args.configs]
        return subprocess.run(cmd, env=env).returncode
    import torch
    if torch.cuda.is_available() and (args.ablate or args.ablate_target):
        from mla_decode_ablate import run_ablate, run_target
        if args.ablate_target:
            return run_target(args.ablate_target)
        run_ablate(args)
        return 0
    if torch.cuda.is_available() and args.smoke:
        from mla_decode_suite import run_smoke
        return run_smoke(args)
    if torch.cuda.is_available() and (args.suite or args.study):
        from mla_decode_suite import run_study, run_suite
        if args.suite:
            run_suite(args)
        if args.study:
            run_study(args)
    elif torch.cuda.is_available():
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    sys.exit(main())
