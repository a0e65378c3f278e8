"""wideep's DeepSeek-V3 equals transformers' DeepseekV3ForCausalLM on the same checkpoint (float32)."""
from __future__ import annotations

import pytest
import torch

from wideep.model.loader import load_model

TOL = 1e-4


def _prompt(n: int, seed: int, vocab: int = 4096) -> list[int]:
    return torch.randint(6, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, hf_logits):
    ids = _prompt(14, 1)
    return load_model(tiny_model_dir), ids, hf_logits(tiny_model_dir, ids)


def test_full_prompt_matches(tiny, rel_err, paged_runner):
    model, ids, ref = tiny
    (logits,) = paged_runner(model).step([(0, ids)])
    assert rel_err(logits, ref) < TOL


def test_step_by_step_decode_matches(tiny, rel_err, paged_runner):
    """Prefill 4 tokens, then one token per step through the absorbed path over the paged latent cache."""
    model, ids, ref = tiny
    runner = paged_runner(model)
    outs = runner.step([(0, ids[:4])])
    for t in range(4, len(ids)):
        outs += runner.step([(0, [ids[t]])], num_decodes=1)
    assert rel_err(torch.cat(outs), ref) < TOL


def test_chunked_prefill_on_cached_prefix_matches(tiny, rel_err, paged_runner):
    model, ids, ref = tiny
    runner = paged_runner(model)
    outs = runner.step([(0, ids[:5])]) + runner.step([(0, ids[5:11])]) + runner.step([(0, ids[11:])])
    assert rel_err(torch.cat(outs), ref) < TOL


def test_mixed_batch_decodes_and_prefills(tiny, tiny_model_dir, rel_err, paged_runner, hf_logits):
    """Two sequences decode while a third prefills in chunks, all in the same steps."""
    model, ids, ref = tiny
    other = _prompt(9, 2)
    ref_other = hf_logits(tiny_model_dir, other)
    runner = paged_runner(model)
    got: dict[int, list[torch.Tensor]] = {0: [], 1: [], 2: []}
    a, b = runner.step([(0, ids[:6]), (1, ids[:3])])
    got[0].append(a); got[1].append(b)
    chunks_of_other = [other[:4], other[4:5], other[5:7], other[7:9]]
    for step, chunk in enumerate(chunks_of_other):
        x0, x1, x2 = runner.step([(0, [ids[6 + step]]), (1, [ids[3 + step]]), (2, chunk)], num_decodes=2)
        got[0].append(x0); got[1].append(x1); got[2].append(x2)
    assert rel_err(torch.cat(got[0]), ref[:10]) < TOL
    assert rel_err(torch.cat(got[1]), ref[:7]) < TOL
    assert rel_err(torch.cat(got[2]), ref_other) < TOL


@pytest.mark.parametrize("variant", ["no_q_lora", "dense2"])
def test_variants_match(variant, variant_dir, rel_err, paged_runner, hf_logits):
    path = variant_dir(variant)
    ids = _prompt(10, 3)
    ref = hf_logits(path, ids)
    model = load_model(path)
    runner = paged_runner(model)
    outs = runner.step([(0, ids[:6])])
    for t in range(6, len(ids)):
        outs += runner.step([(0, [ids[t]])], num_decodes=1)
    assert rel_err(torch.cat(outs), ref) < TOL
