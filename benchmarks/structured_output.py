"""Grammar-constrained decoding overhead per token on the batched sampler.

The model's forward does not change under a grammar; what changes is the sampler step: fill each
constrained row's token bitmask (xgrammar, CPU threads), copy it to the logits' device, mask, and
advance every matcher by its sampled token. This measures that sampler step with and without a
JSON-schema grammar at DeepSeek-V3's vocabulary size (129280), at batch 1 and 64, on random logits.

The vocabulary is synthetic (the 256 bytes plus seeded random 2-10 byte strings of letters, digits,
spaces and JSON punctuation) because no DeepSeek tokenizer can be downloaded here; the bitmask work
is per token id, so its cost tracks the vocabulary size, not the exact strings.

    python benchmarks/structured_output.py [--vocab 129280] [--batches 1 64] [--steps 64] [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from wideep.engine.api import EngineRequest, SamplingParams
from wideep.engine.request import Request
from wideep.engine.sampler import Sampler
from wideep.engine.structured import GrammarEngine, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 6},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
EOS = 1


def synthetic_vocab(size: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789      {}[]\":,.-_"
    vocab = ["<bos>", "<eos>"] + [chr(b) for b in range(32, 127)]
    seen = set(vocab)
    while len(vocab) < size:
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 10)))
        if s not in seen:
            seen.add(s)
            vocab.append(s)
    return vocab


def make_requests(batch: int, constrained: bool, engine: GrammarEngine | None) -> list[Request]:
    reqs = []
    for i in range(batch):
        so = StructuredOutputsParams(json=SCHEMA) if constrained else None
        r = Request(EngineRequest(f"r{i}", [0, 5, 6], SamplingParams(temperature=1.0, max_tokens=None,
                                                                      structured_outputs=so)), {EOS}, 10 ** 6)
        if constrained:
            r.grammar = engine.matcher(so)
        reqs.append(r)
    return reqs


def run(sampler: Sampler, reqs: list[Request], vocab: int, steps: int, device: torch.device,
        engine: GrammarEngine | None) -> list[float]:
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for _ in range(steps):
        logits = torch.randn((len(reqs), vocab), generator=gen, device=device) * 4
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        toks = sampler(logits, reqs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        for r, t in zip(reqs, toks):
            r.append_token(t)
            if r.grammar is not None and r.grammar.terminated:   # a finished document: start a new one
                r.grammar = engine.matcher(r.sampling_params.structured_outputs)
    return times


def components(engine: GrammarEngine, batch: int, vocab: int, steps: int) -> dict[str, float]:
    """The grammar's own work per step, timed piece by piece (min over steps: least disturbed by other
    load on the machine): bitmask fill, mask application, matcher advance."""
    so = StructuredOutputsParams(json=SCHEMA)
    grammars = [engine.matcher(so) for _ in range(batch)]
    gen = torch.Generator().manual_seed(1)
    fill, mask, accept = [], [], []
    for _ in range(steps):
        logits = torch.randn((batch, vocab), generator=gen)
        t0 = time.perf_counter()
        bm = engine.fill(grammars)
        t1 = time.perf_counter()
        engine.mask(logits, list(range(batch)), bm)
        t2 = time.perf_counter()
        toks = logits.argmax(dim=-1).tolist()
        t3 = time.perf_counter()
        for i, (g, t) in enumerate(zip(grammars, toks)):
            g.accept(t)
            if g.terminated:
                grammars[i] = engine.matcher(so)
        t4 = time.perf_counter()
        fill.append(t1 - t0)
        mask.append(t2 - t1)
        accept.append(t4 - t3)
    return {"fill_ms": round(min(fill) * 1e3, 3), "mask_ms": round(min(mask) * 1e3, 3),
            "accept_ms": round(min(accept) * 1e3, 3),
            "grammar_per_token_us": round((min(fill) + min(mask) + min(accept)) / batch * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import xgrammar as xgr

    device = torch.device(args.device)
    info = xgr.TokenizerInfo(synthetic_vocab(args.vocab), xgr.VocabType.RAW, vocab_size=args.vocab,
                             stop_token_ids=[EOS])
    engine = GrammarEngine(info)
    t0 = time.perf_counter()
    engine.compile(StructuredOutputsParams(json=SCHEMA))
    compile_s = time.perf_counter() - t0
    results = {"machine": f"{platform.machine()} {platform.processor() or ''} torch threads={torch.get_num_threads()}",
               "device": str(device), "vocab": args.vocab, "steps": args.steps,
               "schema_compile_ms": round(compile_s * 1e3, 1), "rows": []}
    for batch in args.batches:
        med = {}
        for constrained in (False, True):
            sampler = Sampler(device)
            sampler.grammar_engine = engine
            reqs = make_requests(batch, constrained, engine)
            run(sampler, reqs, args.vocab, args.warmup, device, engine)
            med[constrained] = statistics.median(run(sampler, reqs, args.vocab, args.steps, device, engine))
        parts = components(engine, batch, args.vocab, args.steps)
        extra = med[True] - med[False]
        results["rows"].append({"batch": batch, "sampler_step_ms_free": round(med[False] * 1e3, 3),
                                "sampler_step_ms_json_schema": round(med[True] * 1e3, 3),
                                "overhead_per_step_ms": round(extra * 1e3, 3),
                                "overhead_per_token_us": round(extra / batch * 1e6, 1), **parts})
        print(json.dumps(results["rows"][-1]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
