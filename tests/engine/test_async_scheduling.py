"""--async-scheduling: step n+1 is scheduled before step n's tokens are applied, and the result is the
same as synchronous scheduling token for token (chunked prefill, stops, min_tokens, max_model_len,
preemption, aborts, stop strings, the static decode path, seeded sampling)."""
from __future__ import annotations

from engine_test_utils import random_prompts, run

from wideep.engine.api import EngineRequest, SamplingParams


def _mixed_params(n: int, stop_token: int | None = None) -> list[SamplingParams]:
    out = []
    for i in range(n):
        kw = dict(max_tokens=3 + 5 * (i % 4), temperature=0, ignore_eos=True)
        if i % 3 == 1 and stop_token is not None:
            kw.update(stop_token_ids=[stop_token], min_tokens=2)
        out.append(SamplingParams(**kw))
    return out


def test_async_equals_sync_with_chunked_prefill_and_stops(make_core):
    prompts = random_prompts(7, [5, 40, 17, 70, 3], seed=21)
    sync = make_core(max_num_batched_tokens=48)
    ref = run(sync, prompts, _mixed_params(len(prompts)))
    # a stop token that greedy decoding actually produces: the 4th token of a request that stops on it
    stop = ref[1][0][3]
    ref = run(make_core(max_num_batched_tokens=48), prompts, _mixed_params(len(prompts), stop), prefix="s")
    assert any(r[1] == "stop" for r in ref.values())
    core = make_core(max_num_batched_tokens=48, async_scheduling=True)
    got = run(core, prompts, _mixed_params(len(prompts), stop), prefix="s")
    assert got == ref


def test_async_reports_one_step_late_and_max_model_len(make_core):
    core = make_core(async_scheduling=True, max_model_len=40)
    core.add_request(EngineRequest("x", list(range(2, 34)), SamplingParams(max_tokens=None, temperature=0, ignore_eos=True)))
    first = core.step()     # the prefill is launched; nothing is applied yet
    assert first == []
    toks, reason = [], None
    while core.has_unfinished():
        for o in core.step():
            toks += o.new_token_ids
            reason = o.finish_reason or reason
    assert reason == "length" and len(toks) == 40 - 32
    sync = make_core(max_model_len=40)
    ref = run(sync, [list(range(2, 34))], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))
    assert ref[0][0] == toks


def test_async_preemption_equals_sync(make_core):
    prompts = random_prompts(6, [30, 31, 29, 28], seed=5)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ref = run(make_core(), prompts, params)
    per_block = 4 * 16 * make_core().model.kv_cache_dim * 4
    tight = make_core(kv_cache_memory_bytes=8 * per_block, async_scheduling=True)
    got = run(tight, prompts, params)
    assert tight.stats().num_preemptions > 0
    assert {i: g[:2] for i, g in got.items()} == {i: r[:2] for i, r in ref.items()}


def test_async_seeded_sampling_equals_sync(make_core):
    prompts = random_prompts(3, [12, 20, 7], seed=9)
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_k=40, seed=s, ignore_eos=True, min_tokens=4)
              for s in (1, 2, 3)]
    ref = run(make_core(), prompts, params)
    got = run(make_core(async_scheduling=True), prompts, params)
    assert got == ref


def test_async_static_decode_path_equals_sync(make_core):
    prompts = random_prompts(5, [9, 14, 3], seed=13)
    params = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    ref = run(make_core(), prompts, params)
    core = make_core(async_scheduling=True)
    core.runner.use_static_decode([2, 4, 8])
    assert run(core, prompts, params) == ref


def test_async_abort_in_flight_frees_blocks_and_keeps_a_prefix(make_core):
    prompts = random_prompts(3, [20, 33, 8], seed=4)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ref = run(make_core(), prompts, params)
    core = make_core(async_scheduling=True, max_num_batched_tokens=32)
    for i, p in enumerate(prompts):
        core.add_request(EngineRequest(f"r{i}", p, params))
    toks = {i: [] for i in range(3)}
    reasons = {}
    steps = 0
    while core.has_unfinished():
        steps += 1
        if steps == 2:
            assert core.abort_request("r1")     # mid-prefill, a chunk in flight
        for o in core.step():
            i = int(o.request_id[1:])
            toks[i] += o.new_token_ids
            if o.finished:
                reasons[i] = o.finish_reason
        if len(toks[0]) == 5 and 0 not in reasons:
            assert core.abort_request("r0")     # decoding, a step of it in flight
    assert reasons == {0: "abort", 1: "abort", 2: "length"}
    assert toks[2] == ref[2][0]
    assert toks[0] == ref[0][0][:len(toks[0])] and len(toks[0]) >= 5


def test_llm_async_stop_strings_equal_sync(tiny_model_dir):
    from wideep.engine.llm import LLM

    kw = dict(block_size=16, kv_cache_memory_bytes=8 << 20)
    sync = LLM(str(tiny_model_dir), **kw)
    base = sync.generate(["hello world", "the cat"], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    # a stop string taken from the middle of what greedy decoding writes
    text = base[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop=[stop])
    ref = sync.generate(["hello world", "the cat"], sp)
    got = LLM(str(tiny_model_dir), async_scheduling=True, **kw).generate(["hello world", "the cat"], sp)
    assert ref[0].finish_reason == "stop"
    assert [(g.text, g.token_ids, g.finish_reason, g.stop_reason) for g in got] == \
        [(r.text, r.token_ids, r.finish_reason, r.stop_reason) for r in ref]
