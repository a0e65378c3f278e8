"""Single-rank engine benchmark: prefill and decode throughput, per-layer time, roofline, vs transformers.

GPU (one H100/H200, the layer-slice checkpoint: DeepSeek-R1 width, 1 dense + N MoE layers):
    wideep make-model layer-slice --num-moe-layers 1 --out /tmp/layer-slice
    python benchmarks/engine.py --model /tmp/layer-slice
CPU smoke run (tiny checkpoint, small shapes):
    wideep make-model tiny --out /tmp/tiny && python benchmarks/engine.py --model /tmp/tiny --small

Measures (our engine, EngineCore in-process, CUDA graphs for decode unless --enforce-eager):
  * prefill tokens/s over `--prefill-prompts` prompts of `--ctx` tokens (max_tokens=1);
  * decode tokens/s at each `--batches` size with `--ctx` tokens of context (steady state, all decoding);
  * per-layer forward time of one eager decode step (CUDA events around attention and MLP of each layer);
  * roofline: bytes a decode step must read (weights touched + latent KV) over the device copy
    bandwidth (a timed 1 GiB device copy, read+write bytes), divided by the measured step time;
  * the same prefill/decode through transformers' DeepseekV3ForCausalLM (baseline) and the ratio.
Prints a markdown table and one JSON line (prefix `JSON `).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import sys
import time
from datetime import datetime, timezone

import torch

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.config import EngineArgs
from wideep.engine.core import EngineCore


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rand_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab) for _ in range(length)] for _ in range(n)]


# ---- our engine ----------------------------------------------------------------------------------
def bench_prefill(core: EngineCore, prompts: list[list[int]], tag: str) -> float:
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(f"{tag}{i}", p, sp))
    sync(core.device)
    t0 = time.perf_counter()
    while core.has_unfinished():
        core.step()
    sync(core.device)
    return sum(map(len, prompts)) / (time.perf_counter() - t0)


def bench_decode(core: EngineCore, batch: int, ctx: int, steps: int, warmup: int, seed: int) -> dict:
    prompts = rand_prompts(batch, ctx, core.vocab_size, seed)
    # Early sequences decode in mixed steps while later ones still prefill in chunks: leave room for those tokens.
    prefill_steps = -(-batch * ctx // core.args.max_num_batched_tokens)
    sp = SamplingParams(max_tokens=warmup + steps + prefill_steps + 8, temperature=0, ignore_eos=True)
    ids = [f"d{batch}-{i}" for i in range(batch)]
    for rid, p in zip(ids, prompts):
        core.add_request(EngineRequest(rid, p, sp))
    # prefill everything, then a few decode steps (graph warm-up)
    decoding = 0
    while decoding < warmup:
        out = core.schedule()
        core.execute(out)
        decoding = decoding + 1 if out.is_decode_only and len(out.seqs) == batch else 0
    sync(core.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = core.schedule()
        assert out.is_decode_only and len(out.seqs) == batch, (out.is_decode_only, len(out.seqs), batch)
        core.execute(out)
    sync(core.device)
    dt = (time.perf_counter() - t0) / steps
    for rid in ids:
        core.abort_request(rid)
    while core.has_unfinished():
        core.step()
    return {"batch": batch, "step_ms": dt * 1e3, "tok_s": batch / dt}


def per_layer_times(core: EngineCore, batch: int, ctx: int) -> list[dict]:
    """One eager decode-shaped forward with CUDA events (or perf_counter) around each attention and MLP."""
    model = core.model
    dev = core.device
    bs = core.args.block_size
    nb = min(-(-ctx // bs), core.num_blocks)
    marks: list[tuple[str, object]] = []

    def stamp(name):
        def hook(*_):
            if dev.type == "cuda":
                ev = torch.cuda.Event(enable_timing=True)
                ev.record()
                marks.append((name, ev))
            else:
                marks.append((name, time.perf_counter()))
        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        for part in ("self_attn", "mlp"):
            mod = getattr(layer, part)
            handles.append(mod.register_forward_pre_hook(stamp(f"{i}.{part}.start")))
            handles.append(mod.register_forward_hook(stamp(f"{i}.{part}.end")))
    from wideep.model.attention import AttentionMetadata
    attn = AttentionMetadata(
        slot_mapping=torch.full((batch,), -1, dtype=torch.long, device=dev),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        seq_lens=torch.full((batch,), nb * bs, dtype=torch.int32, device=dev),
        block_tables=torch.arange(nb, dtype=torch.int32, device=dev).repeat(batch, 1),
        num_decodes=batch, query_lens=[1] * batch, seq_lens_cpu=[nb * bs] * batch)
    ids = torch.randint(2, core.vocab_size, (batch,), device=dev)
    pos = torch.full((batch,), nb * bs - 1, dtype=torch.long, device=dev)
    results = []
    try:
        with torch.inference_mode():
            for rep in range(3):
                marks.clear()
                model.forward(ids, pos, attn, core.runner.kv_caches)
                sync(dev)
        times = {}
        for (name, a), (_, b) in zip(marks[0::2], marks[1::2]):
            ms = a.elapsed_time(b) if dev.type == "cuda" else (b - a) * 1e3
            times[name.rsplit(".", 1)[0]] = ms
        for i, layer in enumerate(model.model.layers):
            kind = "moe" if hasattr(layer.mlp, "experts") else "dense"
            results.append({"layer": i, "kind": kind, "attn_ms": times[f"{i}.self_attn"], "mlp_ms": times[f"{i}.mlp"]})
    finally:
        for h in handles:
            h.remove()
    return results


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device copy (read + write), timed with events outside any graph."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    sync(device)
    dt = (time.perf_counter() - t0) / reps
    del src, dst
    return 2 * n / dt


def decode_bytes(core: EngineCore, batch: int, ctx: int) -> float:
    """Bytes one decode step must read: every non-expert weight, the routed experts a batch of this
    size touches in expectation (uniform routing), B x ctx latents per layer, B embedding rows."""
    cfg = core.model.config
    total = 0.0
    for name, p in core.model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if ".experts.w" in name:   # w13, w2 (and their FP8 scales); a fused shared slot is always read
            mod = core.model.get_submodule(name.rsplit(".", 1)[0])
            e = p.shape[0] - mod.n_shared
            touched = e * (1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch) + mod.n_shared
            total += nbytes * touched / p.shape[0]
        elif "embed_tokens" in name:
            total += nbytes * batch / p.shape[0]
        else:
            total += nbytes
    elem = core.runner.kv_caches[0].element_size()
    total += batch * ctx * core.model.kv_cache_dim * elem * core.model.num_layers
    return total


# ---- transformers baseline ----------------------------------------------------------------------
def bench_transformers(model_dir: str, device: torch.device, dtype: torch.dtype, prefill_prompts, batches, ctx,
                       steps, vocab) -> dict:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as exc:
        return {"error": f"transformers not installed: {exc}"}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    res: dict = {"load_s": time.perf_counter() - t0, "decode": {}}
    try:
        with torch.inference_mode():
            model(torch.tensor([prefill_prompts[0]], device=device))  # warm-up
            sync(device)
            t0 = time.perf_counter()
            for p in prefill_prompts:
                model(torch.tensor([p], device=device))
            sync(device)
            res["prefill_tok_s"] = sum(map(len, prefill_prompts)) / (time.perf_counter() - t0)
            for b in batches:
                try:
                    ids = torch.tensor(rand_prompts(b, ctx, vocab, 100 + b), device=device)
                    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

                    def timed(n):
                        sync(device)
                        t = time.perf_counter()
                        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
                        sync(device)
                        return time.perf_counter() - t

                    timed(2)
                    only_prefill = timed(1)
                    full = timed(1 + steps)
                    step = max(full - only_prefill, 1e-9) / steps
                    res["decode"][b] = {"step_ms": step * 1e3, "tok_s": b / step}
                except torch.OutOfMemoryError:
                    res["decode"][b] = {"error": "out of memory"}
                    torch.cuda.empty_cache()
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint dir (layer-slice on GPU, tiny with --small)")
    ap.add_argument("--small", action="store_true", help="CPU-sized shapes")
    ap.add_argument("--ctx", type=int, default=None, help="context tokens (default 2048; 256 with --small)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (default 1 32 128)")
    ap.add_argument("--prefill-prompts", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per batch size")
    ap.add_argument("--hf-batches", type=int, nargs="*", default=None, help="transformers decode batches (default 1 32)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args(argv)

    ctx = args.ctx or (256 if args.small else 2048)
    batches = args.batches or ([1, 4, 8] if args.small else [1, 32, 128])
    n_prefill = args.prefill_prompts or (4 if args.small else 16)
    steps = args.steps or (5 if args.small else 30)
    hf_batches = args.hf_batches if args.hf_batches is not None else ([1, 4] if args.small else [1, 32])
    block = 16 if args.small else 64
    max_len = ctx + steps + 64
    max_len = -(-max_len // block) * block
    eargs = EngineArgs(model=args.model, device=args.device, dtype=args.dtype, block_size=block,
                       max_model_len=max_len, max_num_seqs=max(batches), max_num_batched_tokens=max(8192, ctx),
                       enable_prefix_caching=False, enforce_eager=args.enforce_eager,
                       cuda_graph_sizes=sorted(set(batches) | {1, 2, 4, 8, 16, 32, 64, 96, 128}),
                       kv_cache_memory_bytes=kv_bytes_for(args.model, block, max_len, max(batches) + n_prefill,
                                                          4 if args.small else 2))
    started = time.perf_counter()
    t0 = time.perf_counter()
    core = EngineCore(eargs)
    init_s = time.perf_counter() - t0
    dev = core.device
    result: dict = {
        "bench": "engine", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "model": args.model, "dtype": str(core.runner.dtype), "ctx": ctx,
        "num_layers": core.model.num_layers, "num_blocks": core.num_blocks, "block_size": block,
        "cuda_graphs": sorted(core.runner.graphs), "init_s": init_s, "command": " ".join(sys.argv),
    }
    prompts = rand_prompts(n_prefill, ctx, core.vocab_size, 1)
    bench_prefill(core, prompts[:1], "warm")
    result["prefill_tok_s"] = bench_prefill(core, prompts, "p")
    bw = copy_bandwidth(dev)
    result["copy_bandwidth_GBps"] = bw / 1e9
    result["decode"] = {}
    for b in batches:
        r = bench_decode(core, b, ctx, steps, warmup=3, seed=10 + b)
        need = decode_bytes(core, b, ctx)
        r["bytes_per_step_GB"] = need / 1e9
        r["roofline_ms"] = need / bw * 1e3
        r["roofline_fraction"] = r["roofline_ms"] / r["step_ms"]
        result["decode"][b] = r
    result["per_layer"] = per_layer_times(core, max(batches), ctx)
    result["per_layer_batch"] = max(batches)
    assert core.num_free_blocks == core.num_blocks
    del core
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_hf:
        result["transformers"] = bench_transformers(args.model, dev, eargs_dtype(eargs, dev), prompts,
                                                    hf_batches, ctx, steps, result_vocab(args.model))
    result["total_s"] = time.perf_counter() - started
    print(markdown(result))
    print("JSON " + json.dumps(result, default=str))
    return 0


def kv_bytes_for(model_dir: str, block: int, max_len: int, num_seqs: int, elem: int) -> int:
    """Just enough KV cache for the benchmark's sequences (x1.25): leaves the GPU memory to the
    transformers baseline that runs afterwards, and keeps the run's footprint predictable."""
    from pathlib import Path
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    per_block = cfg["num_hidden_layers"] * block * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * elem
    return int(num_seqs * (-(-max_len // block)) * per_block * 1.25)


def eargs_dtype(eargs: EngineArgs, dev: torch.device) -> torch.dtype:
    from wideep.engine.core import resolve_dtype
    return resolve_dtype(eargs.dtype, dev)


def result_vocab(model_dir: str) -> int:
    from pathlib import Path
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def markdown(r: dict) -> str:
    hf = r.get("transformers", {})
    lines = [
        f"### wideep engine benchmark — {r['device']}, {r['dtype']}, torch {r['torch']}, {r['date']}",
        f"model `{r['model']}` ({r['num_layers']} layers), context {r['ctx']}, block {r['block_size']}, "
        f"{r['num_blocks']} KV blocks, CUDA graphs {r['cuda_graphs'] or 'off'}; copy bandwidth "
        f"{r['copy_bandwidth_GBps']:.0f} GB/s",
        "",
        "| workload | wideep tok/s | step ms | bytes/step GB | roofline ms | roofline frac | transformers tok/s | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    hp = hf.get("prefill_tok_s")
    lines.append(f"| prefill {r['ctx']}-token prompts | {r['prefill_tok_s']:.0f} | | | | | "
                 f"{hp:.0f} | {r['prefill_tok_s'] / hp:.2f}x |" if hp else
                 f"| prefill {r['ctx']}-token prompts | {r['prefill_tok_s']:.0f} | | | | | - | - |")
    for b, d in r["decode"].items():
        h = hf.get("decode", {}).get(b, {})
        ht = h.get("tok_s")
        lines.append(f"| decode batch {b}, ctx {r['ctx']} | {d['tok_s']:.1f} | {d['step_ms']:.2f} | "
                     f"{d['bytes_per_step_GB']:.3f} | {d['roofline_ms']:.3f} | {d['roofline_fraction']:.2f} | "
                     + (f"{ht:.1f} | {d['tok_s'] / ht:.2f}x |" if ht else f"{h.get('error', '-')} | - |"))
    lines += ["", f"Per-layer time, one eager decode step at batch {r['per_layer_batch']}:", "",
              "| layer | kind | attention ms | MLP/MoE ms |", "|---|---|---|---|"]
    for p in r["per_layer"]:
        lines.append(f"| {p['layer']} | {p['kind']} | {p['attn_ms']:.3f} | {p['mlp_ms']:.3f} |")
    lines.append(f"\ntotal benchmark time {r['total_s']:.0f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
