"""Where the Gluon MLA decode kernels spend their time: `benchmarks/mla_decode.py --ablate` (one H200 call).

Times (CUDA graph, rotating cache sets, as the suite does) at H=128, ctx 2048, B=66 (132 programs: one wave on
132 SMs), 128 and 256:
- the half-page kernel as it ships, and with one part left out (its benchmark-only ABLATE switch: 1 no
  cross-warpgroup exchange, 2 no PV, 3 no QK, 4 only the page ring, 5 no PV over the other warpgroup's
  probabilities); the differences say what is on the critical path;
- the full-tile kernel beside it, and `--ablate-extra` entries (';'-separated): configs (e.g. the one-scorer
  kernel `64,64,4,2,gluon,sc` once its smoke run passed) and one-scorer variants by their benchmark-only
  constexprs (`sc:WIDE0=1`; `PS=n`: n programs walk the items, the persistent grid with n = the SM count;
  `--ablate-target smoke:sc:WIDE0=1;sc:PS=3;...` checks them first, few programs walking many items included);
- the split count: 1024 and 512 tokens per split (2 and 4 splits, plus the merge kernel), and the merge
  kernel alone on 2 splits.
`--ablate-only-extra` times the `--ablate-extra` entries alone (with `--ablate-quick`: B=128/256).
`--ablate-target CFG` instead runs one config a few times eagerly (the target of an `ncu` profile).
"""
import math
import time

import torch

from mla_decode import L, R, SCALE, build_case, time_graph

HP = "64,64,4,2,gluon,hp"
CONFIGS = (HP, "64,64,4,2,gluon")


def run_ablate(args):
    from wideep.model import mla_decode_gluon as mg
    from wideep.model import mla_decode_halfpage as mh
    from wideep.model import mla_decode_triton as mdt
    from wideep.model.attention import MAX_SPLITS, SPLIT_ALIGN

    t0 = time.perf_counter()
    extra = [c for c in (args.ablate_extra or "").split(";") if c]
    configs = [c for c in extra if not c.startswith("sc:")]
    variant_texts = [c for c in extra if c.startswith("sc:")]
    rows = []
    for b in (128, 256) if args.ablate_quick else (66, 128, 256):
        ctx, heads, page = 2048, 128, 64
        sets = max(1, min(8, math.ceil(400e6 / (b * ctx * (L + R) * 2))))
        cache, tables, qs, seq_lens = build_case(torch, b, ctx, heads, page, sets, "cuda", torch.bfloat16)
        cache[-1] = 0.0
        flops = 2 * b * heads * ctx * (L + R + L)
        out = torch.empty(b, heads, L, dtype=torch.bfloat16, device="cuda")
        sm = SCALE * 1.4426950408889634

        def direct(kernel, grid=(2, b, 1), extra=(), **constexprs):   # one split per sequence, straight into `out`
            def fn(i):
                mg.launch(kernel, qs[i][0][:, None], qs[i][1][:, None], cache, tables[i], seq_lens, out, out, out,
                          mdt._out_strides(out, out, out, False), sm, 1.0, 2048, MAX_SPLITS, grid, False, 2,
                          SPLIT_ALIGN, extra, **constexprs)
            return fn

        variants = [(c, lambda i, c=c: mdt.mla_decode(qs[i][0], qs[i][1], cache, tables[i], seq_lens, SCALE,
                                                      config=mdt.DecodeConfig.parse(c)))
                    for c in (() if args.ablate_only_extra else CONFIGS) + tuple(configs)]
        if not args.ablate_only_extra:
            variants += [(f"{HP} ABLATE={m}", direct(mh._mla_decode_halfpage_kernel, ABLATE=m))
                         for m in (1, 2, 3, 4, 5)]
        if variant_texts:
            from wideep.model import mla_decode_scorer as ms
            variants += [(f"64,64,4,2,gluon,{t}", direct(ms._mla_decode_scorer_kernel,
                                                         *ms.schedule(2, b, 1, cx.pop("PS", None)), **cx))
                         for t in variant_texts for cx in [parse_variant(t)]]
        short = args.ablate_quick or args.ablate_only_extra
        variants += [] if short else [(f"{c} chunk{ch}", lambda i, c=c, ch=ch: mdt.mla_decode(
            qs[i][0], qs[i][1], cache, tables[i], seq_lens, SCALE, config=mdt.DecodeConfig.parse(c), chunk=ch))
            for c in [HP] + configs for ch in (1024, 512)]
        # the merge kernel alone, 2 splits per sequence (what chunk 1024 adds at ctx 2048)
        combine = mdt._kernels(False)[1]
        part = torch.randn(b, heads, 2, L, device="cuda")
        lse = torch.randn(b, heads, 2, device="cuda")

        def merge(i):
            combine[(heads, b)](part, lse, seq_lens, out, 1024, MAX_SPLITS, heads, L, part.stride(0), part.stride(1),
                                part.stride(2), lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
                                BLOCK_L=L, num_warps=4)
        if not short:
            variants.append(("merge kernel alone (2 splits)", merge))
        for name, fn in variants:
            try:
                t = time_graph(torch, fn, sets, reps=10)
                rows.append(dict(batch=b, ctx=ctx, name=name, s=t))
                print(f"B={b:3d} ctx={ctx} {name:>40s}: {t * 1e3:7.4f} ms {flops / t / 1e12:6.1f} TFLOP/s", flush=True)
            except Exception as exc:  # noqa: BLE001
                print(f"B={b} {name}: failed {exc!r}"[:400], flush=True)
        cache = tables = qs = part = lse = None
        torch.cuda.empty_cache()
    print(f"ablate total {time.perf_counter() - t0:.0f}s", flush=True)
    return rows


def parse_variant(text: str) -> dict:
    """'sc:WIDE0=1' -> the one-scorer kernel's benchmark-only constexprs {'WIDE0': 1} (and PS=n: n programs walk
    the items, the persistent grid; not a constexpr, the launchers take it out)."""
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(":", 1)[1].split(",") if kv)}


def smoke_variants(texts):
    """Each one-scorer variant ('sc:K=V,...') against the fp32 oracle on ragged lengths: one split per sequence
    (straight into the output) and up to 3 splits (fp32 partials + the merge kernel; a sequence's items past its
    own split count skipped); 240 items (several per program under PS=n); zeros for seq_len 0.
    Prints one line per case; returns the variants that passed every case."""
    from mla_decode import errors
    from mla_decode_suite import oracle, ragged_case
    from wideep.model import mla_decode_gluon as mg
    from wideep.model import mla_decode_scorer as ms
    from wideep.model import mla_decode_triton as mdt
    from wideep.model.attention import MAX_SPLITS, SPLIT_ALIGN

    combine = mdt._kernels(False)[1]
    passed = []
    for text in texts:
        cx = parse_variant(text)
        ok = True
        for b, nq, heads, max_ctx, width, chunk in ((6, 1, 128, 2048, 32, 2048), (6, 1, 128, 3000, 128, 1024),
                                                    (5, 4, 16, 3000, 128, 1024), (40, 1, 128, 3000, 128, 1024)):
            case = ragged_case(b, heads, 64, max_ctx, width, torch.bfloat16, 3 + nq, nq)
            q_lat, q_pe = (x if x.dim() == 4 else x[:, None] for x in case[:2])
            rows = nq * heads
            out = torch.full((b, rows, L), float("nan"), dtype=torch.bfloat16, device="cuda")
            splits = mdt.grid_splits(width * 64, chunk)
            consts = dict(cx)
            grid, extra = ms.schedule(-(-rows // 64), b, splits, consts.pop("PS", None))

            def run(o, lse, fin, split):
                mg.launch(ms._mla_decode_scorer_kernel, q_lat, q_pe, case[2], case[3], case[4], o, lse, fin,
                          mdt._out_strides(o, lse, fin, split), SCALE * 1.4426950408889634, 1.0, chunk, MAX_SPLITS, grid,
                          split, 2, SPLIT_ALIGN, extra, **consts)
            try:
                mdt._split_and_merge(run, combine, out, case[4], splits, chunk)
                torch.cuda.synchronize()
                err = errors(torch, out, oracle(*case).reshape(b, rows, L))
            except Exception as exc:  # noqa: BLE001
                print(f"smoke {text}: failed {exc!r}"[:400], flush=True)
                ok = False
                break
            good = err[2] and err[1] < 2e-2 and bool((out[0] == 0).all())
            ok &= good
            print(f"smoke {text} B={b} Q={nq} H={heads} splits<={splits}: rel {err[1]:.2e} finite={err[2]} -> "
                  f"{'ok' if good else 'FAIL'}", flush=True)
        if ok:
            passed.append(text)
    print(f"PASSED: {';'.join(passed)}", flush=True)
    return passed


def run_target(cfg_text: str):
    """A few eager calls of one config at B=128 ctx 2048 (for `ncu --launch-skip 2 --launch-count 1`);
    'smoke:sc:K=V;sc:K=V...': the smoke check of those one-scorer variants instead (exit 0 if all passed)."""
    from wideep.model import mla_decode_triton as mdt

    if cfg_text.startswith("smoke:"):
        texts = cfg_text.removeprefix("smoke:").split(";")
        return 0 if smoke_variants(texts) == texts else 1

    cache, tables, qs, seq_lens = build_case(torch, 128, 2048, 128, 64, 1, "cuda", torch.bfloat16)
    cfg = mdt.DecodeConfig.parse(cfg_text)
    for _ in range(4):
        mdt.mla_decode(qs[0][0], qs[0][1], cache, tables[0], seq_lens, SCALE, config=cfg)
    torch.cuda.synchronize()
