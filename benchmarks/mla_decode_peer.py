"""MLA decode against maintained kernel libraries: FlashInfer's batch MLA, DeepSeek's FlashMLA.

Issue 15 asks what each way of building the kernel measures; this one is "a library from the package
index": FlashInfer (`flashinfer-python`, its FA3 template on Hopper, JIT-compiled) or FlashMLA (the
`sgl-flash-mla` wheel, whose legacy extension keeps FlashMLA's SM90 dense decode kernel). Same shapes,
cache layout (packed [blocks, 64, 576] bf16 pages), timing method (CUDA graph, rotating cache sets,
median) and oracle as benchmarks/mla_decode.py, with wideep's default kernel timed in the same process
beside it. Also checks the library's batch invariance (3 sequences alone vs inside a batch of 37), which
wideep's decode graphs need (graph replay at a padded size must give eager's tokens).

  H200: PYTHONPATH=$PWD python3 benchmarks/mla_decode_peer.py [--library flashinfer|flashmla] [--json out.json]
        PYTHONPATH=$PWD python3 benchmarks/mla_decode_peer.py --library flashmla --plan-sweep 132,198,256,264
        (neither library is a wideep dependency: install it, or put it on PYTHONPATH, to run this)
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from mla_decode import L, R, SCALE, build_case, errors, time_graph  # noqa: E402
from mla_decode_suite import oracle, ragged_case  # noqa: E402

PAGE, HEADS = 64, 128
SHAPES = [(128, 2048), (256, 2048), (128, 4096), (256, 4096), (128, 8192), (256, 8192)]


class FlashInferMLA:
    """One planned FlashInfer wrapper per block table (plans are per batch layout)."""

    def __init__(self, flashinfer, backend: str, table: torch.Tensor, lens: torch.Tensor):
        b = table.shape[0]
        pages = (lens + PAGE - 1) // PAGE
        kv_indptr = torch.zeros(b + 1, dtype=torch.int32, device=table.device)
        kv_indptr[1:] = torch.cumsum(pages, 0)
        mask = torch.arange(table.shape[1], device=table.device)[None, :] < pages[:, None]
        self.ws = torch.empty(128 << 20, dtype=torch.uint8, device=table.device)
        self.w = flashinfer.mla.BatchMLAPagedAttentionWrapper(self.ws, backend=backend)
        self.w.plan(torch.arange(b + 1, dtype=torch.int32, device=table.device), kv_indptr,
                    table[mask].to(torch.int32).contiguous(), lens.to(torch.int32), HEADS, L, R, PAGE, False,
                    SCALE, torch.bfloat16, torch.bfloat16)
        self.backend = getattr(self.w, "_planned_backend_name", None) or backend

    @staticmethod
    def query(q_lat, q_pe):
        return q_lat, q_pe

    def __call__(self, q, cache):
        return self.w.run(*q, cache[..., :L], cache[..., L:])


class FlashMLA:
    """FlashMLA's SM90 dense decode (`dense_decode_fwd`); its split plan is made on the first call."""

    backend = "sm90 dense"

    def __init__(self, ops, table: torch.Tensor, lens: torch.Tensor):
        self.ops, self.table, self.lens = ops, table.to(torch.int32).contiguous(), lens.to(torch.int32)
        self.meta = self.splits = None

    @staticmethod
    def query(q_lat, q_pe):
        """[B, 1, H, 576]: FlashMLA takes the latent and rope parts as one query (built outside the timing)."""
        return torch.cat([q_lat, q_pe], -1).unsqueeze(1).contiguous()

    def __call__(self, q, cache):
        out, _, self.meta, self.splits = self.ops.dense_decode_fwd(
            q, cache.unsqueeze(2), L, self.lens, self.table, SCALE, False, self.meta, self.splits)
        return out[:, 0]


def plan_sweep(ops, mdt, batches, ctx=2048, sets=2):
    """FlashMLA's kernel under its own scheduler vs under wideep's batch-invariant plan, by batch size.

    Under the plan a part takes whole sequences, so its time steps with ceil(B / parts) (66 parts of
    two 64-head CTAs on 132 SMs); FlashMLA's own scheduler splits sequences wherever the batch's total
    work puts a part boundary, so its time follows B / parts. Printed beside wideep's default path."""
    from wideep.model import mla_decode_flashmla as fm

    n_sms = torch.cuda.get_device_properties(0).multi_processor_count
    parts = fm._parts(HEADS, n_sms)
    rows = []
    for b in batches:
        cache, tables, qs, lens = build_case(torch, b, ctx, HEADS, PAGE, sets, "cuda", torch.bfloat16)
        lens = lens.to(torch.int32)
        q = [torch.cat(qs[s], -1)[:, None].contiguous() for s in range(sets)]
        kc = cache.unsqueeze(2)
        tab = [t.to(torch.int32).contiguous() for t in tables]
        _, _, meta, spl = ops.dense_decode_fwd(q[0], kc, L, lens, tab[0], SCALE, False, None, None)
        plan = fm.make_plan_on_device(lens, HEADS, ctx, n_sms)

        def own(s):
            return ops.dense_decode_fwd(q[s], kc, L, lens, tab[s], SCALE, False, meta, spl)

        def planned(s):
            return ops.dense_decode_fwd(q[s], kc, L, plan.lens, tab[s], SCALE, False, plan.meta, plan.splits)
        plans: dict = {}
        row = dict(B=b, ctx=ctx, parts=parts, seqs_per_part_mean=b / parts, seqs_per_part_max=-(-b // parts),
                   own_ms=time_graph(torch, own, sets) * 1e3, planned_ms=time_graph(torch, planned, sets) * 1e3,
                   plan_kernel_ms=time_graph(torch, lambda s: fm.make_plan_on_device(lens, HEADS, ctx, n_sms),
                                             sets) * 1e3,
                   wideep_ms=time_graph(torch, lambda s: mdt.mla_decode(*qs[s], cache, tables[s], lens, SCALE,
                                                                        plans=plans), sets) * 1e3)
        rows.append(row)
        print(f"B={b:4d}: parts {parts}, sequences per part mean {row['seqs_per_part_mean']:.3f} max "
              f"{row['seqs_per_part_max']}; FlashMLA own scheduler {row['own_ms']:.4f} ms, under wideep's plan "
              f"{row['planned_ms']:.4f} (+ the plan, once per step: {row['plan_kernel_ms'] * 1e3:.1f} us); wideep default "
              f"{row['wideep_ms']:.4f}", flush=True)
        torch.cuda.empty_cache()
    return rows


def load_library(name: str, backend: str):
    """(version, factory(table, lens) -> callable) for the named library."""
    if name == "flashinfer":
        import flashinfer
        return flashinfer.__version__, lambda table, lens: FlashInferMLA(flashinfer, backend, table, lens)
    import flash_mla
    from flash_mla._loader import get_ops
    ops = get_ops(use_legacy=True)
    print(f"flash_mla {flash_mla.__version__}: {ops.dense_decode_fwd.default._schema}", flush=True)
    return flash_mla.__version__, lambda table, lens: FlashMLA(ops, table, lens)


def invariance(make):
    """3 sequences alone vs inside a batch of 37: bit-identical outputs?"""
    q_lat, q_pe, stored, table, lens = ragged_case(37, HEADS, PAGE, 5000, 2560, torch.bfloat16, 9)
    keep = lens > 0
    q_lat, q_pe, table, lens = q_lat[keep], q_pe[keep], table[keep], lens[keep]
    lib = make(table, lens)
    batch = lib(lib.query(q_lat, q_pe), stored)
    same = []
    for i in (3, 17, 35):
        one = make(table[i:i + 1], lens[i:i + 1])
        alone = one(one.query(q_lat[i:i + 1], q_pe[i:i + 1]), stored)
        same.append(bool(torch.equal(alone[0], batch[i])))
    truth = oracle(q_lat, q_pe, stored, table, lens)
    return same, errors(torch, batch, truth)


def time_shape(make, mdt, args, b, ctx):
    """Both kernels on the same full-length batch: ms per call, TFLOP/s, their max relative difference."""
    cache, tables, qs, seq_lens = build_case(torch, b, ctx, HEADS, PAGE, args.sets, "cuda", torch.bfloat16)
    libs = [make(tables[s], seq_lens) for s in range(args.sets)]
    lqs = [libs[s].query(*qs[s]) for s in range(args.sets)]
    ours = mdt.mla_decode(*qs[0], cache, tables[0], seq_lens, SCALE)
    theirs = libs[0](lqs[0], cache)
    diff = float((ours.float() - theirs.float()).abs().max() / ours.float().abs().max())
    t_lib = time_graph(torch, lambda s: libs[s](lqs[s], cache), args.sets)
    plans: dict = {}   # wideep's default path makes its schedule once per step, as in the model
    t_us = time_graph(torch, lambda s: mdt.mla_decode(*qs[s], cache, tables[s], seq_lens, SCALE, plans=plans),
                      args.sets)
    flops = 2 * b * HEADS * ctx * (L + R + L)
    return dict(B=b, ctx=ctx, backend=libs[0].backend, library_ms=t_lib * 1e3, wideep_ms=t_us * 1e3,
                library_tflops=flops / t_lib / 1e12, wideep_tflops=flops / t_us / 1e12, rel_diff=diff)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--library", default="flashinfer", choices=["flashinfer", "flashmla"])
    p.add_argument("--backend", default="fa3", help="FlashInfer MLA backend (fa3, fa2, auto)")
    p.add_argument("--sets", type=int, default=2, help="cache sets rotated inside one graph")
    p.add_argument("--json", default=None)
    p.add_argument("--plan-sweep", default=None,
                   help="flashmla: only time its kernel under its own scheduler vs wideep's plan at these batch "
                        "sizes (comma-separated, ctx 2048)")
    args = p.parse_args(argv)
    try:
        version, make = load_library(args.library, args.backend)
    except ImportError as exc:
        print(f"{args.library} is not importable ({exc}); install it (flashinfer-python or sgl-flash-mla) "
              "to run this peer benchmark")
        return 2
    from wideep.model import mla_decode_triton as mdt

    if args.plan_sweep:
        if args.library != "flashmla":
            p.error("--plan-sweep is for --library flashmla")
        from flash_mla._loader import get_ops
        rows = plan_sweep(get_ops(use_legacy=True), mdt, [int(x) for x in args.plan_sweep.split(",")])
        if args.json:
            Path(args.json).write_text(json.dumps(dict(plan_sweep=rows), indent=1))
        return 0
    t0 = time.perf_counter()
    name = args.library
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, {name} {version}", flush=True)
    same, err = invariance(make)
    print(f"{name} oracle (ragged, 36 seqs): rel {err[1]:.2e} finite {err[2]}; alone vs batch of 36 "
          f"bit-identical {sum(same)}/{len(same)}  (compiled + checked in {time.perf_counter() - t0:.0f}s)",
          flush=True)
    rows = []
    for b, ctx in SHAPES:
        row = time_shape(make, mdt, args, b, ctx)
        rows.append(row)
        print(f"B={b:4d} ctx={ctx:5d}: {name}[{row['backend']}] {row['library_ms']:.4f} ms "
              f"({row['library_tflops']:.0f} TFLOP/s)  wideep default {row['wideep_ms']:.4f} ms "
              f"({row['wideep_tflops']:.0f})  max rel diff {row['rel_diff']:.1e}", flush=True)
        torch.cuda.empty_cache()
    print(f"\n| B | ctx | {name} ms | TFLOP/s | wideep default ms | TFLOP/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['ctx']} | {r['library_ms']:.4f} | {r['library_tflops']:.0f} | "
              f"{r['wideep_ms']:.4f} | {r['wideep_tflops']:.0f} |")
    print(f"median ratio wideep/{name}: {statistics.median(r['wideep_ms'] / r['library_ms'] for r in rows):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, invariance=same, oracle=err, library=name,
                                                   version=version, backend=args.backend), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
