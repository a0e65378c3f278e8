"""`--kv-cache-dtype fp8` end to end on the tiny model: memory accounting, greedy tokens, prefix caching."""
from __future__ import annotations

import pytest
import torch

from wideep import LLM, SamplingParams
from wideep.engine.config import EngineArgs

# random prompts: the tiny model's random weights leave most continuations near ties (its logit leads are
# often < 0.5 while e4m3 moves them by ~0.1-1); of these 20, numbers 5, 9 and 13 are far from ties (a scan
# of all 20 found those three), and the test re-checks that before comparing
_ALL = [torch.randint(3, 400, (int(n),), generator=torch.Generator().manual_seed(i)).tolist()
        for i, n in enumerate(torch.randint(4, 24, (20,), generator=torch.Generator().manual_seed(99)))]
CANDIDATES = [_ALL[i] for i in (5, 9, 13)]
MAX_TOKENS = 3


def _llm(path, kv_cache_dtype):
    return LLM(str(path), block_size=16, kv_cache_memory_bytes=4 << 20, dtype="float32", enforce_eager=True,
               kv_cache_dtype=kv_cache_dtype)


@torch.no_grad()
def test_fp8_cache_greedy_equals_model_dtype_cache(tiny_model_dir, paged_runner):
    """Greedy tokens with an fp8 cache equal those with the model-dtype cache on the prompts where the
    logits are far from ties: the greedy token's lead over the runner-up (teacher-forced, model-dtype
    cache) is more than twice what fp8 moves that lead. The engine runs its own fp8 write, decode and
    prefix-cache paths; the teacher-forced runner only picks the prompts."""
    from wideep.model.loader import load_model

    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    full = _llm(tiny_model_dir, "auto")
    fp8 = _llm(tiny_model_dir, "fp8")
    # the same byte budget holds 4x the blocks (fp32 model here; 2x against a bf16 cache)
    assert fp8.core.runner.kv_caches[0].dtype == torch.float8_e4m3fn
    assert 4 * full.core.num_blocks <= fp8.core.num_blocks < 4 * (full.core.num_blocks + 1)

    model = load_model(tiny_model_dir)
    prompts, want = [], []
    for prompt, out in zip(CANDIDATES, full.generate(CANDIDATES, sp)):
        toks = out.token_ids
        logits = {}
        for dtype in (torch.float32, torch.float8_e4m3fn):
            runner = paged_runner(model, block_size=16)
            runner.caches = [c.to(dtype) for c in runner.caches]
            (logits[dtype],) = runner.step([(0, prompt + toks[:-1])])
        ref = logits[torch.float32][len(prompt) - 1:]
        assert ref.argmax(-1).tolist() == toks
        top2 = ref.topk(2, dim=-1).indices
        lead = {dt: (lg[len(prompt) - 1:].gather(1, top2) @ torch.tensor([1.0, -1.0])) for dt, lg in logits.items()}
        if bool((lead[torch.float32] > 2 * (lead[torch.float32] - lead[torch.float8_e4m3fn]).abs()).all()):
            prompts.append(prompt)
            want.append(toks)
    assert len(prompts) == len(CANDIDATES), "a chosen prompt is no longer far from ties: re-scan _ALL"
    got = [o.token_ids for o in fp8.generate(prompts, sp)]
    assert got == want
    # prefix caching over fp8 blocks: the same prompts again reuse the cached blocks, same tokens
    again = [o.token_ids for o in fp8.generate(prompts, sp)]
    assert again == want


def test_kv_cache_dtype_is_checked_once():
    assert EngineArgs(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8_e4m3"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineArgs(kv_cache_dtype="fp8_e5m2")


def test_serve_flag_reaches_engine_args(tiny_model_dir):
    import argparse

    from wideep.server.args import add_serve_arguments, serve_config_from_args

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    cfg = serve_config_from_args(p.parse_args([str(tiny_model_dir), "--kv-cache-dtype", "fp8"]))
    assert cfg.engine_args.kv_cache_dtype == "fp8"
    assert serve_config_from_args(p.parse_args([str(tiny_model_dir)])).engine_args.kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="--kv-cache-dtype"):
        serve_config_from_args(p.parse_args([str(tiny_model_dir), "--kv-cache-dtype", "fp8_e5m2"]))
