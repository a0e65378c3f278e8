"""The H200 suite of `benchmarks/mla_decode.py --suite`: everything the MLA decode issue asks of one GPU call.

1. ceilings: device-to-device copy bandwidth and a bf16 matmul rate, measured here;
2. correctness against the fp32 oracle (NaN-poisoned pages, ragged lengths, a graph-wide table): every new
   config with each cache dtype it reads (the Gluon kernels: bf16, except `...,gluon,hp,e4m3`: fp8 only),
   4 query tokens x 16 heads, 2 x 128;
3. batch invariance of the kernel: one sequence alone and inside a batch of 37 (wide table), bit-identical;
4. time per layer (CUDA graph, rotating cache sets), the present kernel (`--old`, main's module, its own
   batch-dependent split heuristic) against the new configs, B=128/256 x ctx 2k/4k/8k, H=128, bf16 and fp8;
5. the tiny model in bf16: greedy tokens with CUDA graphs (padded batches) vs eager, 16 requests.
Configs are compiled concurrently first (each is a separate Triton compile of ~15 s).
"""
import importlib.util
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from mla_decode import L, R, SCALE, build_case, copy_bandwidth, errors, time_graph

FP8 = torch.float8_e4m3fn
K_SCALE = 0.5   # an fp8 scale that is not 1, so a forgotten scale shows up as an error


def serves(cfg, dt) -> bool:
    """Whether config `cfg` reads a cache of dtype `dt`: the Gluon kernels read bf16, except the e4m3 one."""
    return not cfg.gluon or cfg.e4m3 == (dt == FP8)


def home_dtype(cfg):
    """The cache dtype a config's single-dtype checks (batch invariance, graph replay, Q=4) run on."""
    return FP8 if cfg.e4m3 else torch.bfloat16


def matmul_rate():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
    return 2 * 8192 ** 3 / statistics.median(ts)


def load_old(path):
    spec = importlib.util.spec_from_file_location("old_mla_decode_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ragged_case(b, heads, page, max_ctx, width, dtype, seed, nq=1):
    """NaN-poisoned pool: unowned blocks and slots past seq_len are NaN; block ids shuffled."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_ctx + 1, (b,), generator=g)
    lens[0] = 0
    pages = [-(-int(n) // page) for n in lens]
    pool = sum(pages) + 1
    cache = torch.randn(pool, page, L + R, generator=g)
    perm = torch.randperm(pool - 1, generator=g)
    table = torch.full((b, width), pool - 1, dtype=torch.int32)
    nxt = 0
    for i, n in enumerate(pages):
        ids = perm[nxt:nxt + n]
        table[i, :n] = ids.to(torch.int32)
        tail = int(lens[i]) % page
        if tail:
            cache[ids[-1], tail:] = float("nan")
        nxt += n
    cache[pool - 1] = float("nan")
    cache = cache.to("cuda")
    stored = (cache / K_SCALE).clamp(-448, 448).to(FP8) if dtype == FP8 else cache.to(dtype)
    shape = (b, nq, heads) if nq > 1 else (b, heads)
    q_lat = torch.randn(*shape, L, generator=g).to("cuda", torch.bfloat16)
    q_pe = torch.randn(*shape, R, generator=g).to("cuda", torch.bfloat16)
    return q_lat, q_pe, stored, table.to("cuda"), lens.to(torch.int32).to("cuda")


def oracle(q_lat, q_pe, stored, table, lens):
    from wideep.model.attention import dequantize_latent, paged_mla_decode_torch

    k = K_SCALE if stored.dtype == FP8 else 1.0
    deq = dequantize_latent(stored, k, torch.float32)
    used = -(-int(lens.max()) // stored.shape[1]) if int(lens.max()) else 1
    return paged_mla_decode_torch(q_lat.float(), q_pe.float(), deq, table[:, :used], lens, L, SCALE)


def run_suite(args):
    from wideep.model import mla_decode_triton as mdt

    t0 = time.perf_counter()
    report = dict(checks=[], timings=[], errors=[])
    props = torch.cuda.get_device_properties(0)
    import triton
    from wideep.model import mla_decode_flashmla
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; FlashMLA in the default path: {mla_decode_flashmla._ops() is not None}",
          flush=True)
    configs = [mdt.DecodeConfig.parse(c) for c in args.suite_configs.split(";")]
    old = load_old(args.old) if args.old else None
    page = 64

    # -- compile every (config, cache dtype) concurrently on small inputs of the timed shapes
    def warm(job):
        cfg, dt, heads, nq = job
        try:
            q_lat, q_pe, stored, table, lens = ragged_case(4, heads, page, 3000, 128, dt, 1, nq)
            mdt.mla_decode(q_lat, q_pe, stored, table, lens, SCALE, K_SCALE if dt == FP8 else 1.0, config=cfg)
            torch.cuda.synchronize()
            return None
        except Exception as exc:  # noqa: BLE001
            return f"{cfg} {dt}: {''.join(traceback.format_exception_only(type(exc), exc))[-600:]}"

    jobs = [(c, dt, 128, 1) for c in configs for dt in (torch.bfloat16, FP8) if serves(c, dt)]
    jobs += [(c, home_dtype(c), 16, 4) for c in configs if c.tma or c.gluon]
    with ThreadPoolExecutor(len(jobs)) as ex:
        bad = {j: r for j, r in zip(jobs, ex.map(warm, jobs)) if r}
    bad = {j: r for j, r in ((j, warm(j)) for j in bad) if r}   # a concurrent-compile hiccup gets a serial retry
    for msg in bad.values():
        print(f"COMPILE FAIL {msg}", flush=True)
        report["errors"].append(msg)
    if old is not None:
        try:
            q_lat, q_pe, stored, table, lens = ragged_case(4, 128, page, 3000, 128, torch.bfloat16, 1)
            old.mla_decode(q_lat, q_pe, stored, table, lens, SCALE)
        except Exception as exc:  # noqa: BLE001
            print(f"old kernel failed: {exc!r}", flush=True)
            old = None
    print(f"compiled in {time.perf_counter() - t0:.0f}s", flush=True)

    bw = copy_bandwidth(torch)
    mm = matmul_rate()
    print(f"ceilings: copy {bw / 1e9:,.0f} GB/s (read+write), bf16 matmul 8192^3 {mm / 1e12:,.0f} TFLOP/s", flush=True)
    report.update(copy_bw=bw, matmul=mm)

    # -- correctness vs the fp32 oracle
    for cfg in configs:
        for dt in (torch.bfloat16, FP8):
            if any(j[0] == cfg and j[1] == dt for j in bad) or not serves(cfg, dt):
                continue
            case = ragged_case(24, 128, page, 3000, 2560, dt, 7)
            truth = oracle(*case)
            out = mdt.mla_decode(*case[:5], SCALE, K_SCALE if dt == FP8 else 1.0, config=cfg)
            err = errors(torch, out, truth)
            ok = err[2] and err[1] < 2e-2 and bool((out[0] == 0).all())
            report["checks"].append(dict(what=f"oracle {cfg} {dt}", err=err, ok=ok))
            print(f"oracle {str(cfg):>14s} {str(dt):>22s}: max abs {err[0]:.2e} rel {err[1]:.2e} -> "
                  f"{'ok' if ok else 'FAIL'}", flush=True)
    for cfg, heads, nq in [(c, 16, 4) for c in configs if c.tma or c.gluon]:
        case = ragged_case(24, heads, page, 3000, 2560, home_dtype(cfg), 8, nq)
        truth = oracle(*case)
        out = mdt.mla_decode(*case[:5], SCALE, K_SCALE if cfg.e4m3 else 1.0, config=cfg)
        err = errors(torch, out, truth)
        ok = err[2] and err[1] < 2e-2
        report["checks"].append(dict(what=f"oracle {cfg} H={heads} Q={nq}", err=err, ok=ok))
        print(f"oracle {cfg} H={heads} Q={nq}: rel {err[1]:.2e} -> {'ok' if ok else 'FAIL'}", flush=True)

    # -- the cross-layer cache layout: a layer's cache is a strided view (block stride = layers * page * 576)
    for cfg in [None] + configs:
        for dt in (torch.bfloat16, FP8):
            if cfg is not None and (not serves(cfg, dt) or cfg.f16 and dt != FP8):
                continue
            q_lat, q_pe, stored, table, lens = ragged_case(24, 128, page, 3000, 2560, dt, 11)
            pool = torch.full((stored.shape[0], 3) + tuple(stored.shape[1:]), float("nan"), device="cuda").to(dt)
            pool[:, 1] = stored
            view = pool[:, 1]
            truth = oracle(q_lat, q_pe, stored, table, lens)
            k = K_SCALE if dt == FP8 else 1.0
            out = mdt.mla_decode(q_lat, q_pe, view, table, lens, SCALE, k, config=cfg)
            flat = mdt.mla_decode(q_lat, q_pe, stored, table, lens, SCALE, k, config=cfg)
            err = errors(torch, out, truth)
            ok = err[2] and err[1] < 2e-2 and bool(torch.equal(out, flat))
            report["checks"].append(dict(what=f"cross-layer strided view {cfg or 'default'} {dt}", err=err, ok=ok))
            print(f"cross-layer strided view {cfg or 'default'} {dt}: rel {err[1]:.2e}, bits equal to the flat "
                  f"cache {bool(torch.equal(out, flat))} -> {'ok' if ok else 'FAIL'}", flush=True)
            del pool, view

    # -- batch invariance of the kernel (default + every config): alone vs in a batch of 37, narrow vs wide table
    cases = {dt: ragged_case(37, 128, page, 5000, 2560, dt, 9) for dt in {home_dtype(c) for c in configs}
             | {torch.bfloat16}}
    for cfg in [None] + configs:
        dt = torch.bfloat16 if cfg is None else home_dtype(cfg)
        q_lat, q_pe, stored, table, lens = cases[dt]
        k = K_SCALE if dt == FP8 else 1.0
        batch = mdt.mla_decode(q_lat, q_pe, stored, table, lens, SCALE, k, config=cfg)
        same = []
        for i in (3, 17, 36):
            n = -(-int(lens[i]) // page)
            alone = mdt.mla_decode(q_lat[i:i + 1], q_pe[i:i + 1], stored, table[i:i + 1, :max(n, 1)], lens[i:i + 1],
                                   SCALE, k, config=cfg)
            same.append(bool(torch.equal(alone, batch[i:i + 1])))
        report["checks"].append(dict(what=f"kernel batch invariance {cfg or 'default'} (alone vs batch of 37)",
                                     ok=all(same)))
        print(f"kernel batch invariance {cfg or 'default'}, 3 sequences alone vs in a batch of 37: {same}", flush=True)
    print(f"auto-selected configs: { {str(k[5]) + '/' + str(k[6]): str(v) for k, v in mdt._chosen.items()} }",
          flush=True)

    # -- CUDA graph replay vs eager, bit for bit, per config (the graph captured at seq_len 0, then filled)
    for cfg in [None] + configs:
        case = ragged_case(24, 128, page, 3000, 2560, torch.bfloat16 if cfg is None else home_dtype(cfg), 10)
        k = K_SCALE if cfg is not None and cfg.e4m3 else 1.0
        eager = mdt.mla_decode(*case[:5], SCALE, k, config=cfg)
        lens = torch.zeros_like(case[4])
        mdt.mla_decode(*case[:4], lens, SCALE, k, config=cfg)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = mdt.mla_decode(*case[:4], lens, SCALE, k, config=cfg)
        lens.copy_(case[4])
        graph.replay()
        torch.cuda.synchronize()
        same = bool(torch.equal(eager, replayed))
        report["checks"].append(dict(what=f"graph vs eager bits {cfg or 'default'}", ok=same))
        print(f"graph replay vs eager {cfg or 'default'}: bit-identical {same}", flush=True)

    # -- tiny model: graph (padded) vs eager greedy tokens
    try:
        report["tiny"] = tiny_graph_vs_eager()
        report["tiny_r1_latent"] = tiny_graph_vs_eager(**R1_LATENT)
        report["tiny_r1_latent_split128"] = tiny_graph_vs_eager(split_tokens=128, **R1_LATENT)
    except Exception as exc:  # noqa: BLE001
        report["tiny"] = dict(error=repr(exc))
        print(f"tiny model check failed to run: {exc!r}\n{traceback.format_exc()[-1500:]}", flush=True)

    # -- timings
    rows = []
    for ctx in (2048, 4096, 8192):
        for b in (128, 256):
            for dt in (torch.bfloat16, FP8) if args.suite_fp8_timings else (torch.bfloat16,):
                esz = 1 if dt == FP8 else 2
                cache_bytes = b * ctx * (L + R) * esz
                sets = max(1, min(8, math.ceil(400e6 / cache_bytes)))
                try:
                    cache, tables, qs, seq_lens = build_case(torch, b, ctx, 128, page, sets, "cuda", torch.bfloat16)
                except torch.cuda.OutOfMemoryError:
                    print(f"B={b} ctx={ctx}: OOM", flush=True)
                    continue
                cache[-1] = 0.0
                if dt == FP8:
                    cache = (cache / K_SCALE).clamp(-448, 448).to(FP8)
                k = K_SCALE if dt == FP8 else 1.0
                flops = 2 * b * 128 * ctx * (L + R + L)
                nbytes = cache_bytes + b * 128 * (2 * L + R) * 2
                row = dict(batch=b, ctx=ctx, kv=str(dt).removeprefix("torch."), t={})
                variants = [(str(c), (lambda i, c=c: mdt.mla_decode(qs[i][0], qs[i][1], cache, tables[i], seq_lens,
                                                                    SCALE, k, config=c)))
                            for c in configs if not any(j[0] == c and j[1] == dt for j in bad)
                            and (dt == FP8 or not c.f16)   # f16 only changes the fp8-cache kernel
                            and serves(c, dt)]
                plans: dict = {}   # one schedule per step for every layer, as AttentionMetadata.plans in the model
                variants.insert(0, ("default", lambda i: mdt.mla_decode(qs[i][0], qs[i][1], cache, tables[i],
                                                                        seq_lens, SCALE, k, plans=plans)))
                if dt == torch.bfloat16:
                    if old is not None:
                        variants.insert(0, ("present", lambda i: old.mla_decode(qs[i][0], qs[i][1], cache, tables[i],
                                                                                seq_lens, SCALE)))
                for name, fn in variants:
                    try:
                        t = time_graph(torch, fn, sets, reps=10)
                        row["t"][name] = t
                        print(f"B={b:3d} ctx={ctx} {row['kv']:>13s} {name:>24s}: {t * 1e3:7.4f} ms "
                              f"{flops / t / 1e12:6.1f} TFLOP/s {nbytes / t / 1e9:7,.0f} GB/s", flush=True)
                    except Exception as exc:  # noqa: BLE001
                        print(f"B={b} ctx={ctx} {name}: failed {exc!r}"[:400], flush=True)
                row.update(flops=flops, bytes=nbytes)
                rows.append(row)
                cache = tables = qs = None
                torch.cuda.empty_cache()
    report["timings"] = rows

    out = Path(os.environ.get("OUT", "/tmp")) / "mla_suite.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print_table(rows, report)
    print(f"total {time.perf_counter() - t0:.0f}s", flush=True)


# the tiny preset with R1's latent widths (512 + 64) and 16 heads: the shape FlashMLA (when installed) takes
R1_LATENT = dict(kv_lora_rank=512, qk_rope_head_dim=64, num_attention_heads=16, num_key_value_heads=16)


def tiny_graph_vs_eager(split_tokens: int | None = None, **overrides):
    """split_tokens: a small attention split (WIDEEP_MLA_SPLIT_TOKENS) and prompts up to 200 tokens, so steps
    move between the decode graphs' one-split-wide twins and the full-width graphs, and long rows merge splits."""
    from wideep import LLM, SamplingParams
    from wideep.model.make_model import make_model

    d = Path(tempfile.mkdtemp()) / "tiny"
    make_model("tiny", d, **overrides)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 400, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 200 if split_tokens else 60, (16,), generator=g)]
    saved = os.environ.get("WIDEEP_MLA_SPLIT_TOKENS")
    if split_tokens:
        os.environ["WIDEEP_MLA_SPLIT_TOKENS"] = str(split_tokens)
    # different lengths: requests finish at different steps, so decode batches shrink through 16..1 and the
    # graph runs padded to the next captured size
    params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0, ignore_eos=True) for i in range(16)]
    res = {}
    try:
        for mode, eager in (("graph", False), ("eager", True)):
            llm = LLM(str(d), dtype="bfloat16", block_size=64, kv_cache_memory_bytes=256 << 20, enforce_eager=eager,
                      max_model_len=2048, cuda_graph_sizes=[1, 2, 4, 8, 16])
            res[mode] = [o.token_ids for o in llm.generate(prompts, params)]
            del llm
            torch.cuda.empty_cache()
    finally:
        if saved is None:
            os.environ.pop("WIDEEP_MLA_SPLIT_TOKENS", None)
        else:
            os.environ["WIDEEP_MLA_SPLIT_TOKENS"] = saved
    same = sum(a == b for a, b in zip(res["graph"], res["eager"]))
    print(f"tiny model bf16 {overrides or ''}{f' split {split_tokens}' if split_tokens else ''}: graph (padded) vs "
          f"eager greedy tokens identical on {same}/16 requests", flush=True)
    return dict(identical=same, total=16, overrides=overrides, split_tokens=split_tokens)


def print_table(rows, report):
    print("\n| B | ctx | cache | kernel | ms/layer | TFLOP/s | GB/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for name, t in r["t"].items():
            print(f"| {r['batch']} | {r['ctx']} | {r['kv']} | {name} | {t * 1e3:.4f} | {r['flops'] / t / 1e12:.0f} "
                  f"| {r['bytes'] / t / 1e9:,.0f} |")
    print("\nDeepSeek's FlashMLA (published, H800, bf16, compute-bound): 660 TFLOP/s, i.e. "
          + ", ".join(f"B={r['batch']} ctx={r['ctx']} {r['flops'] / 660e12 * 1e3:.3f} ms" for r in rows
                      if r["kv"] == "bfloat16"))
    fails = [c["what"] for c in report["checks"] if not c["ok"]]
    print(f"\nchecks: {len(report['checks']) - len(fails)}/{len(report['checks'])} ok; failed: {fails}; "
          f"compile errors: {len(report['errors'])}; tiny: {report.get('tiny')}")


def run_study(args):
    """Second look: tokens per split (batch-invariant chunk) against batch size, fp8 compute variants,
    single-stage long tiles. Times only (the suite checks correctness of the same kernels)."""
    from wideep.model import mla_decode_triton as mdt

    t0 = time.perf_counter()
    old = load_old(args.old) if args.old else None
    page, rows = 64, []
    sv = mdt.DecodeConfig.parse("64,64,8,2,sv")

    def timed(b, ctx, dt, variants):
        esz = 1 if dt == FP8 else 2
        sets = max(1, min(8, math.ceil(400e6 / (b * ctx * (L + R) * esz))))
        cache, tables, qs, seq_lens = build_case(torch, b, ctx, 128, page, sets, "cuda", torch.bfloat16)
        cache[-1] = 0.0
        if dt == FP8:
            cache = (cache / K_SCALE).clamp(-448, 448).to(FP8)
        k = K_SCALE if dt == FP8 else 1.0
        flops = 2 * b * 128 * ctx * (L + R + L)
        for name, cfg, chunk in variants:
            try:
                if name == "present":
                    def fn(i):
                        return old.mla_decode(qs[i][0], qs[i][1], cache, tables[i], seq_lens, SCALE)
                else:
                    def fn(i, cfg=cfg, chunk=chunk):
                        return mdt.mla_decode(qs[i][0], qs[i][1], cache, tables[i], seq_lens, SCALE, k,
                                              config=cfg, chunk=chunk)
                t = time_graph(torch, fn, sets, reps=10)
                rows.append(dict(batch=b, ctx=ctx, kv=str(dt).removeprefix("torch."), name=name, s=t))
                print(f"B={b:3d} ctx={ctx} {str(dt):>20s} {name:>28s}: {t * 1e3:8.4f} ms "
                      f"{flops / t / 1e12:6.1f} TFLOP/s", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"B={b} ctx={ctx} {name}: failed {exc!r}"[:300], flush=True)

    for ctx in (2048, 8192):
        for b in (1, 8, 32, 128, 256):
            v = [(f"{sv} chunk{c}", sv, c) for c in (1024, 2048, 4096)]
            if old is not None:
                v.insert(0, ("present", None, None))
            timed(b, ctx, torch.bfloat16, v)
    for ctx in (2048, 8192):
        for b in (128, 256):
            timed(b, ctx, torch.bfloat16, [(c, mdt.DecodeConfig.parse(c), 2048)
                                           for c in ("64,64,8,1,sv", "64,128,8,1,sv", "64,128,8,1")])
            timed(b, ctx, FP8, [(f"{c} chunk{ch}", mdt.DecodeConfig.parse(c), ch)
                                for c in ("64,64,8,2", "64,64,8,2,f16", "64,64,8,2,sv,f16") for ch in (1024, 2048)])
    out = Path(os.environ.get("OUT", "/tmp")) / "mla_study.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"study total {time.perf_counter() - t0:.0f}s", flush=True)


def run_smoke(args):
    """First, in its own process under a timeout: each new config on a small ragged case against the fp32
    oracle (a pipeline that deadlocks shows up here, not inside the suite), then the automatic choice over a
    bf16 and an fp8 cache (which config it took, and that it too matches the oracle)."""
    from wideep.model import mla_decode_triton as mdt

    ok = True
    runs = [(text, mdt.DecodeConfig.parse(text)) for text in args.suite_configs.split(";")]
    runs = [(text, cfg, home_dtype(cfg)) for text, cfg in runs] + [("default", None, torch.bfloat16),
                                                                    ("default", None, FP8)]
    for text, cfg, dt in runs:
        for b, nq, heads in ((6, 1, 128), (5, 4, 16), (160, 1, 128)):   # 160: more items than SMs
            t = time.perf_counter()
            case = ragged_case(b, heads, 64, 3000, 128, dt, 3 + nq, nq)
            out = mdt.mla_decode(*case[:5], SCALE, K_SCALE if dt == FP8 else 1.0, config=cfg)
            torch.cuda.synchronize()
            err = errors(torch, out, oracle(*case))
            good = err[2] and err[1] < 2e-2 and bool((out[0] == 0).all())
            ok &= good
            chose = "" if cfg is not None else " -> " + ", ".join(
                str(v) for k, v in mdt._chosen.items() if k[5] == dt and k[1] == nq * heads)
            print(f"smoke {text}{chose} {str(dt).removeprefix('torch.')} cache B={b} Q={nq} H={heads}: "
                  f"rel {err[1]:.2e} finite={err[2]} ({time.perf_counter() - t:.1f}s) -> {'ok' if good else 'FAIL'}",
                  flush=True)
    return 0 if ok else 1
