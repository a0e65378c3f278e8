"""EngineCore end to end on the tiny checkpoint: correctness against transformers and against itself
under batching, chunked prefill, prefix caching, preemption; sampling; stops; aborts; bad input."""
from __future__ import annotations

import pytest
import torch

from wideep.engine.api import BlockStored, EngineRequest, InvalidRequest, SamplingParams
from wideep.engine.block_hash import hash_prompt_blocks

from engine_test_utils import random_prompts, run

GREEDY = SamplingParams(max_tokens=10, temperature=0)


def test_greedy_matches_transformers(make_core, tiny_model_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    prompts = random_prompts(3, [7, 40, 93], seed=1)
    # Small token budget: the 40/93-token prompts are prefilled in chunks on top of their own cache.
    core = make_core(max_num_batched_tokens=32)
    ours = run(core, prompts, SamplingParams(max_tokens=12, temperature=0))
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)
        ref = out[0, len(p):].tolist()
        if 1 in ref:                      # eos (id 1) ends both
            ref = ref[:ref.index(1) + 1]
        assert ours[i][0] == ref, f"prompt {i}"


def test_batched_equals_alone(make_core):
    prompts = random_prompts(32, [3, 17, 64, 65, 130, 31, 100, 9], seed=2)
    sp = SamplingParams(max_tokens=6, temperature=0)
    # token budget 128 < sum of prompts: chunked prefills mixed with decodes; 16 seqs at most
    core = make_core(enable_prefix_caching=False, max_num_batched_tokens=128, max_num_seqs=16)
    together = run(core, prompts, sp)
    for i, p in enumerate(prompts):
        alone = run(core, [p], sp, prefix=f"alone{i}-")
        assert alone[0][:2] == together[i][:2], f"prompt {i}"


def test_warm_prefix_cache_equals_cold_and_reports_hits(make_core):
    shared = random_prompts(1, [100], seed=3)[0]
    prompts = [shared + tail for tail in random_prompts(4, [5, 20, 33, 1], seed=4)]
    core = make_core()
    cold = run(core, prompts, GREEDY, prefix="cold")
    hits_after_cold = core.stats().prefix_cache_hits
    warm = run(core, prompts, GREEDY, prefix="warm")
    stats = core.stats()
    for i in range(len(prompts)):
        assert warm[i][:2] == cold[i][:2]
        assert warm[i][3] >= 96          # 6 full blocks of the shared prefix were found
    assert stats.prefix_cache_hits > hits_after_cold
    assert stats.prefix_cache_queries >= stats.prefix_cache_hits
    # every stored hash is the chained hash of the tokens it says it holds
    events = [e for e in core.take_kv_events() if isinstance(e, BlockStored)]
    assert events
    first = next(e for e in events if e.parent_block_hash is None)
    assert first.block_hashes == hash_prompt_blocks(first.token_ids, 16)


def test_preemption_equals_no_preemption(make_core):
    # 2 blocks of prompt each, a 3rd needed after a few tokens: 4 admitted requests outgrow 8 blocks
    prompts = random_prompts(6, [30, 31, 29, 28], seed=5)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    roomy = make_core()
    ref = run(roomy, prompts, params)
    per_block = 4 * 16 * roomy.model.kv_cache_dim * 4     # layers x block x dim x fp32
    tight = make_core(kv_cache_memory_bytes=8 * per_block)
    assert tight.num_blocks == 8
    got = run(tight, prompts, params)
    assert tight.stats().num_preemptions > 0
    for i in range(len(prompts)):
        assert got[i][:2] == ref[i][:2], f"prompt {i}"


def test_seeded_sampling_is_reproducible_and_seed_dependent(make_core):
    core = make_core()
    prompt = random_prompts(1, [20], seed=6)[0]
    sp = lambda seed: SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)
    # two identical seeded requests in one batch, plus an unseeded one alongside
    a = run(core, [prompt, prompt, prompt], [sp(7), sp(7), SamplingParams(max_tokens=16, temperature=1.0)])
    b = run(core, [prompt], [sp(7)], prefix="b")
    c = run(core, [prompt], [sp(8)], prefix="c")
    assert a[0][0] == a[1][0] == b[0][0]
    assert c[0][0] != b[0][0]


def test_top_k_one_is_greedy(make_core):
    core = make_core()
    prompts = random_prompts(2, [12, 30], seed=7)
    greedy = run(core, prompts, GREEDY, prefix="g")
    topk1 = run(core, prompts, SamplingParams(max_tokens=10, temperature=0.8, top_k=1), prefix="k")
    assert [greedy[i][0] for i in range(2)] == [topk1[i][0] for i in range(2)]


def test_stop_token_ids_min_tokens_and_length(make_core):
    core = make_core()
    prompt = random_prompts(1, [15], seed=8)[0]
    base = run(core, [prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), prefix="base")[0]
    assert base[1] == "length" and len(base[0]) == 8
    stop_tok = base[0][2]
    stopped = run(core, [prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_tok]), prefix="s")[0]
    assert stopped[0] == base[0][:3] and stopped[1] == "stop" and stopped[2] == stop_tok
    held = run(core, [prompt], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_tok], min_tokens=5),
               prefix="m")[0]
    assert len(held[0]) >= 5 and stop_tok not in held[0][:5]


def test_eos_stops_unless_ignored(make_core):
    core = make_core()
    eos = next(iter(core.eos_token_ids))
    prompt = random_prompts(1, [15], seed=9)[0]
    base = run(core, [prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), prefix="b")[0]
    # make EOS the model's own next choice by treating its first greedy token as EOS
    core.eos_token_ids.add(base[0][0])
    try:
        stopped = run(core, [prompt], SamplingParams(max_tokens=6, temperature=0), prefix="e")[0]
        ignored = run(core, [prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), prefix="i")[0]
    finally:
        core.eos_token_ids.discard(base[0][0])
        core.eos_token_ids.add(eos)
    assert stopped[0] == base[0][:1] and stopped[1] == "stop" and stopped[2] is None
    assert ignored[0] == base[0]


def test_abort_anywhere_frees_blocks(make_core):
    core = make_core(max_num_seqs=2, max_num_batched_tokens=32)
    prompts = random_prompts(4, [50, 70, 20, 90], seed=10)
    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(f"a{i}", p, SamplingParams(max_tokens=20, temperature=0)))
    core.step()                         # a0 mid-prefill (chunk of 32), others waiting
    assert core.abort_request("a0")      # running, mid-prefill
    assert core.abort_request("a3")      # waiting
    assert not core.abort_request("nope")
    finished = {}
    while core.has_unfinished():
        for out in core.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
                if out.request_id == "a1" and "a2" not in finished:
                    pass
        if "a2" not in finished and core.stats().num_running == 2 and core.abort_request("a2"):
            pass                        # a2 aborted while decoding
    assert finished["a0"] == finished["a3"] == finished["a2"] == "abort"
    assert finished["a1"] in ("length", "stop")


@pytest.mark.parametrize("bad, param", [
    (dict(prompt=[]), "prompt"),
    (dict(prompt=list(range(2, 300))), "prompt"),          # longer than max_model_len 256
    (dict(prompt=[5, 6], max_tokens=255), "max_tokens"),    # prompt + max_tokens > max_model_len
    (dict(prompt=[5, 99999]), "prompt"),                    # not a token id
    (dict(prompt=[5, -1]), "prompt"),
    (dict(prompt=[5, 6.0]), "prompt"),                      # not an integer
    (dict(prompt=[5, "6"]), "prompt"),
    (dict(prompt=[5, 2 ** 70]), "prompt"),                  # beyond int64
])
def test_bad_requests_name_the_field(make_core, bad, param):
    core = make_core(max_model_len=256)
    sp = SamplingParams(max_tokens=bad.get("max_tokens", 4))
    with pytest.raises(InvalidRequest) as err:
        core.add_request(EngineRequest("bad", bad["prompt"], sp))
    assert err.value.param == param and param in str(err.value)
    assert not core.has_unfinished()


@pytest.mark.parametrize("kwargs, param", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.5), "temperature"), (dict(top_k=-2), "top_k"),
])
def test_bad_sampling_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    assert err.value.param == param and param in str(err.value)


def test_dummy_batch_writes_nothing(make_core):
    core = make_core()
    before = [c.clone() for c in core.runner.kv_caches]
    core.execute_dummy_batch(4)
    core.execute_dummy_batch(8, decode=False)
    assert all(torch.equal(a, b) for a, b in zip(before, core.runner.kv_caches))


@pytest.mark.parametrize("split_tokens", [None, 128])
def test_static_decode_path_equals_eager(make_core, monkeypatch, split_tokens):
    """The CUDA-graph path's static buffers (padded batch, full-width block table, slot -1 and
    seq_len 0 padding rows), run eagerly on CPU, give the same tokens as plain eager decode. With a
    128-token attention split each size also has an 8-block-wide twin, replayed while every sequence fits
    it: the 124-token prompt crosses 128 tokens while it decodes."""
    if split_tokens:
        monkeypatch.setenv("WIDEEP_MLA_SPLIT_TOKENS", str(split_tokens))
    prompts = random_prompts(5, [20, 45, 7, 124 if split_tokens else 70, 33], seed=11)
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = run(make_core(max_model_len=256), prompts, sp)
    core = make_core(max_model_len=256)
    core.runner.use_static_decode([2, 8])        # 5 and 3 running seqs pad to 8, 1 and 2 fit in 2
    replays: list[int] = []
    for g in core.runner.graphs.values():
        assert (g.short is not None) == bool(split_tokens)
        for twin in (g, g.short) if g.short else (g,):
            width = twin.block_tables.shape[1]
            inner = twin.graph.replay
            twin.graph.replay = lambda inner=inner, width=width: (replays.append(width), inner())
    got = run(core, prompts, sp)
    assert replays, "decode steps did not take the static path"
    if split_tokens:
        assert set(replays) == {8, 16}
    for i in range(len(prompts)):
        assert got[i][:2] == ref[i][:2], f"prompt {i}"
    # a dummy decode batch through the static path writes nothing
    before = [c.clone() for c in core.runner.kv_caches]
    core.execute_dummy_batch(3)
    assert all(torch.equal(a, b) for a, b in zip(before, core.runner.kv_caches))
    # DP lockstep padding: every decode step padded to 8 sequences gives the same tokens
    core.step = lambda: core.execute(core.schedule(), pad_to=8)
    padded = run(core, prompts[:2], sp, prefix="pad")
    assert [padded[i][0] for i in range(2)] == [ref[i][0] for i in range(2)]
