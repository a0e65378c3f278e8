"""`wideep generate MODEL_DIR --prompt ...`: offline completions with the in-process engine (the demo)."""
from __future__ import annotations

import argparse

from wideep.errors import UsageExit


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="offline completions with the in-process engine")
    p.add_argument("model", help="HF-format checkpoint directory (e.g. made by `wideep make-model tiny`)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto (model dtype), bfloat16, fp8 or fp8_e4m3")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import time

    from wideep.engine.api import InvalidRequest, SamplingParams
    from wideep.engine.llm import LLM

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)
    except InvalidRequest as exc:
        raise UsageExit(f"wideep generate: --{exc.param.replace('_', '-')}: {exc}")
    llm = LLM(args.model, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
              block_size=args.block_size,
              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              enable_prefix_caching=args.enable_prefix_caching)
    prompts = args.prompt
    if args.chat:
        prompts = [{"prompt": p, "prompt_token_ids": llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True)} for p in prompts]
    t0 = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params)
    except InvalidRequest as exc:
        raise UsageExit(f"wideep generate: {exc}")
    dt = time.perf_counter() - t0
    for prompt, out in zip(args.prompt, outputs):
        print(f"--- prompt: {prompt!r}")
        print(f"{out.text}")
        print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outputs)
    print(f"--- {len(outputs)} prompts, {total} tokens in {dt:.2f}s ({total / max(dt, 1e-9):.1f} tok/s)")
    return 0
