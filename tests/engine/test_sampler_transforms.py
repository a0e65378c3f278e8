"""The batched sampler's distribution transforms against a plain-torch, one-row-at-a-time reference
written from the definitions (vLLM's semantics), and its logprobs against log_softmax."""
from __future__ import annotations

import math

import pytest
import torch

from wideep.engine.api import EngineRequest, InvalidRequest, SamplingParams
from wideep.engine.request import Request
from wideep.engine.sampler import Sampler

V = 50
EOS = 1


def make_req(prompt: list[int], output: list[int], **sp) -> Request:
    r = Request(EngineRequest(f"r{id(sp)}", prompt, SamplingParams(**sp)), {EOS}, max_tokens=100)
    for t in output:
        r.append_token(t)
    return r


def reference(logits: torch.Tensor, r: Request) -> torch.Tensor:
    """One row, straight from the definitions; returns the probabilities the token is drawn from."""
    sp = r.sampling_params
    x = logits.clone().double()
    out = r.all_token_ids[r.num_prompt_tokens:]
    if sp.allowed_token_ids:
        for t in range(V):
            if t not in sp.allowed_token_ids:
                x[t] = -math.inf
    for word in sp.bad_words_token_ids:
        if len(word) == 1 or out[-(len(word) - 1):] == word[:-1]:
            x[word[-1]] = -math.inf
    if len(out) < sp.min_tokens:
        for t in set(sp.stop_token_ids) | ({EOS} if not sp.ignore_eos else set()):
            x[t] = -math.inf
    for t, b in sp.logit_bias.items():
        x[t] += b
    for t in range(V):
        if t in r.prompt_token_ids or t in out:
            x[t] = x[t] / sp.repetition_penalty if x[t] > 0 else x[t] * sp.repetition_penalty
        c = out.count(t)
        x[t] -= sp.frequency_penalty * c + sp.presence_penalty * (c > 0)
    if sp.temperature == 0:
        p = torch.zeros(V, dtype=torch.float64)
        p[int(x.argmax())] = 1
        return p
    x = x / sp.temperature
    if sp.min_p > 0:
        p = torch.softmax(x, 0)
        x[p < sp.min_p * p.max()] = -math.inf
    order = sorted(range(V), key=lambda t: -x[t].item())
    if sp.top_k > 0:
        for t in order[sp.top_k:]:
            x[t] = -math.inf
    if sp.top_p < 1:
        p = torch.softmax(x, 0)
        mass = 0.0
        for t in order:
            if mass >= sp.top_p:
                x[t] = -math.inf
            mass += p[t].item()
    return torch.softmax(x, 0)


CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, presence_penalty=0.8),
    dict(temperature=1.3, frequency_penalty=-0.5),
    dict(temperature=0.9, repetition_penalty=1.7),
    dict(temperature=0.9, repetition_penalty=0.6, frequency_penalty=1.1, presence_penalty=-0.3),
    dict(temperature=1.0, logit_bias={3: 5.0, 7: -100.0, 11: 2.5}),
    dict(temperature=1.0, min_p=0.2),
    dict(temperature=0.8, min_p=0.05, top_k=10, top_p=0.9),
    dict(temperature=1.0, allowed_token_ids=[2, 4, 6, 8, 10]),
    dict(temperature=1.0, bad_words_token_ids=[[5], [20, 21, 22], [30, 31]]),
    dict(temperature=1.0, min_tokens=5, stop_token_ids=[9]),
    dict(temperature=0, repetition_penalty=2.0, logit_bias={4: 3.0}),
    dict(temperature=0.5, top_k=3, logit_bias={0: 1.0}, presence_penalty=2.0, bad_words_token_ids=[[12]]),
]


def test_each_transform_equals_the_reference_batched():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), V, generator=g) * 3
    reqs = [make_req([2, 3, 4, 40, 41], [5, 20, 21, 30, 6, 6, 7], **c) for c in CASES]
    got = Sampler(torch.device("cpu")).distribution(logits, reqs)
    for i, r in enumerate(reqs):
        want = reference(logits[i], r).float()
        assert torch.allclose(got[i], want, atol=1e-5), (CASES[i], (got[i] - want).abs().max())
    # the sampled tokens come from those distributions' support
    toks = Sampler(torch.device("cpu"))(logits, reqs)
    for i, t in enumerate(toks):
        assert got[i][t] > 0, CASES[i]


def test_logprobs_are_log_softmax_of_the_logits_with_rank_and_top_k():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g) * 2
    reqs = [make_req([1, 2], [], temperature=0, logprobs=5),
            make_req([1, 2], [], temperature=1.0, logprobs=0, repetition_penalty=3.0, seed=3),
            make_req([1, 2], [], temperature=0.5)]
    toks = Sampler(torch.device("cpu"))(logits, reqs)
    ref = torch.log_softmax(logits.double(), dim=-1)
    for i in range(2):
        lp, rank, top_ids, top_lps = reqs[i].pending_logprobs[0]
        assert lp == pytest.approx(ref[i, toks[i]].item(), abs=1e-5)   # raw: before penalties
        assert rank == 1 + int((ref[i] > ref[i, toks[i]]).sum())
        k = reqs[i].sampling_params.logprobs
        want_ids = ref[i].topk(k).indices.tolist() if k else []
        assert top_ids == want_ids
        assert top_lps == pytest.approx(ref[i, want_ids].tolist(), abs=1e-5)
    assert reqs[0].pending_logprobs[0][1] == 1       # greedy: the top token
    assert reqs[2].pending_logprobs == []


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, V, generator=g)
    a = [make_req([1], [], temperature=1.0, seed=s) for s in (7, 8, 9, 10)]
    b = [make_req([1], [], temperature=1.0, seed=s) for s in (7, 8, 9, 10)]
    s = Sampler(torch.device("cpu"))
    first = [s(logits, a) for _ in range(5)]
    second = [s(logits[2:3], [b[2]]) for _ in range(5)]
    assert [x[2] for x in first] == [x[0] for x in second]


def test_mixed_batch_rows_draw_as_in_uniform_batches():
    """A batch of seeded, unseeded and greedy rows (mask and row index copied to the device) gives each row
    what a batch without that mixing gives (no mask / index at all): the seeded stream, the sampler's own
    stream over the rows without a seed in order (a greedy row takes its draw too), and the argmax."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, V, generator=g)
    mixed = [make_req([1], [], temperature=0.8, seed=7), make_req([1], [], temperature=0.8),
             make_req([1], [], temperature=1.3), make_req([1], [], temperature=0.0)]
    got = Sampler(torch.device("cpu"), seed=5)(logits, mixed)
    assert got[0] == Sampler(torch.device("cpu"))(logits[:1], [make_req([1], [], temperature=0.8, seed=7)])[0]
    unseeded = [make_req([1], [], temperature=0.8), make_req([1], [], temperature=1.3),
                make_req([1], [], temperature=0.5)]
    assert got[1:3] == Sampler(torch.device("cpu"), seed=5)(logits[1:], unseeded)[:2]
    assert got[3] == int(logits[3].argmax())


def test_kept_batch_settings_follow_the_batch():
    """The sampler keeps a batch's per-row settings while the same requests come back; a reordered,
    shrunk or changed batch gets its own (each call equals a fresh sampler's on that batch)."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, V, generator=g)
    reqs = [make_req([1], [], temperature=0.7, top_k=3, seed=1), make_req([1], [], temperature=0.0),
            make_req([1, 2], [3], temperature=1.1, top_p=0.5, seed=2, repetition_penalty=1.5),
            make_req([1], [], temperature=0.9, min_p=0.2, seed=3, logit_bias={5: 4.0})]
    kept = Sampler(torch.device("cpu"))
    for batch in (reqs, reqs, reqs[::-1], reqs[1:3], reqs[:1] + reqs[3:], reqs):
        for r in batch:
            r.generator = None      # the seeded streams restart, for the fresh sampler and for the kept one
        want = Sampler(torch.device("cpu")).distribution(logits[:len(batch)], batch)
        assert torch.allclose(kept.distribution(logits[:len(batch)], batch), want)
        for r in batch:
            r.generator = None
        fresh = Sampler(torch.device("cpu"))(logits[:len(batch)], batch)
        for r in batch:
            r.generator = None
        assert kept(logits[:len(batch)], batch) == fresh


@pytest.mark.parametrize("field,value", [
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("repetition_penalty", 0.0), ("min_p", 1.5),
    ("allowed_token_ids", []), ("bad_words_token_ids", [[]]), ("logprobs", -2), ("logit_bias", {-1: 1.0}),
])
def test_out_of_range_fields_name_themselves(field, value):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
