"""MLA decode against a maintained kernel library: FlashInfer's batch MLA (the FA3 template on Hopper).

Issue 15 asks what each way of building the kernel measures; this one is "a library from the package
index". Same shapes, cache layout (packed [blocks, 64, 576] bf16 pages), timing method (CUDA graph,
rotating cache sets, median) and oracle as benchmarks/mla_decode.py, with wideep's default kernel timed in
the same process beside it. Also checks FlashInfer's batch invariance (3 sequences alone vs inside a batch
of 37), which wideep's decode graphs need (graph replay at a padded size must give eager's tokens).

  H200: PYTHONPATH=$PWD python3 benchmarks/mla_decode_peer.py [--backend fa3] [--json out.json]
        (flashinfer-python is not a wideep dependency: install it, or put it on PYTHONPATH, to run this)
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

    def __call__(self, q_lat, q_pe, cache):
        return self.w.run(q_lat, q_pe, cache[..., :L], cache[..., L:])


def invariance(flashinfer, backend):
    """3 sequences alone vs inside a batch of 37: bit-identical outputs?"""
    q_lat, q_pe, stored, table, lens = ragged_case(37, HEADS, PAGE, 5000, 2560, torch.bfloat16, 9)
    keep = lens > 0
    q_lat, q_pe, table, lens = q_lat[keep], q_pe[keep], table[keep], lens[keep]
    batch = FlashInferMLA(flashinfer, backend, table, lens)(q_lat, q_pe, stored)
    same = []
    for i in (3, 17, 35):
        alone = FlashInferMLA(flashinfer, backend, table[i:i + 1], lens[i:i + 1])(
            q_lat[i:i + 1], q_pe[i:i + 1], stored)
        same.append(bool(torch.equal(alone[0], batch[i])))
    truth = oracle(q_lat, q_pe, stored, table, lens)
    return same, errors(torch, batch, truth)


def time_shape(flashinfer, mdt, args, b, ctx):
    """Both kernels on the same full-length batch: ms per call, TFLOP/s, their max relative difference."""
    cache, tables, qs, seq_lens = build_case(torch, b, ctx, HEADS, PAGE, args.sets, "cuda", torch.bfloat16)
    fis = [FlashInferMLA(flashinfer, args.backend, tables[s], seq_lens) for s in range(args.sets)]
    ours = mdt.mla_decode(*qs[0], cache, tables[0], seq_lens, SCALE)
    theirs = fis[0](*qs[0], cache)
    diff = float((ours.float() - theirs.float()).abs().max() / ours.float().abs().max())
    t_fi = time_graph(torch, lambda s: fis[s](*qs[s], cache), args.sets)
    t_us = time_graph(torch, lambda s: mdt.mla_decode(*qs[s], cache, tables[s], seq_lens, SCALE), args.sets)
    flops = 2 * b * HEADS * ctx * (L + R + L)
    return dict(B=b, ctx=ctx, backend=fis[0].backend, flashinfer_ms=t_fi * 1e3, wideep_ms=t_us * 1e3,
                flashinfer_tflops=flops / t_fi / 1e12, wideep_tflops=flops / t_us / 1e12, rel_diff=diff)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="fa3", help="FlashInfer MLA backend (fa3, fa2, auto)")
    p.add_argument("--sets", type=int, default=2, help="cache sets rotated inside one graph")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    try:
        import flashinfer
    except ImportError as exc:
        print(f"flashinfer is not importable ({exc}); install flashinfer-python to run this peer benchmark")
        return 2
    from wideep.model import mla_decode_triton as mdt

    t0 = time.perf_counter()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, flashinfer {flashinfer.__version__}, "
          f"backend {args.backend}", flush=True)
    same, err = invariance(flashinfer, args.backend)
    print(f"flashinfer oracle (ragged, 36 seqs): rel {err[1]:.2e} finite {err[2]}; alone vs batch of 36 "
          f"bit-identical {sum(same)}/{len(same)}  (compiled + checked in {time.perf_counter() - t0:.0f}s)",
          flush=True)
    rows = []
    for b, ctx in SHAPES:
        row = time_shape(flashinfer, mdt, args, b, ctx)
        rows.append(row)
        print(f"B={b:4d} ctx={ctx:5d}: flashinfer[{row['backend']}] {row['flashinfer_ms']:.4f} ms "
              f"({row['flashinfer_tflops']:.0f} TFLOP/s)  wideep default {row['wideep_ms']:.4f} ms "
              f"({row['wideep_tflops']:.0f})  max rel diff {row['rel_diff']:.1e}", flush=True)
        torch.cuda.empty_cache()
    print("\n| B | ctx | FlashInfer ms | TFLOP/s | wideep default ms | TFLOP/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['B']} | {r['ctx']} | {r['flashinfer_ms']:.4f} | {r['flashinfer_tflops']:.0f} | "
              f"{r['wideep_ms']:.4f} | {r['wideep_tflops']:.0f} |")
    print(f"median ratio wideep/flashinfer: {statistics.median(r['wideep_ms'] / r['flashinfer_ms'] for r in rows):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, invariance=same, oracle=err,
                                                   flashinfer=flashinfer.__version__, backend=args.backend),
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
