"""The static decode path's staged inputs (the host block table kept across steps, vectorized slots and
positions) equal inputs built afresh from each step's batch, through block growth, batch-size changes,
preemption and aborts, synchronous and with async scheduling."""
from __future__ import annotations

import numpy as np
import pytest
from engine_test_utils import random_prompts

from wideep.engine.api import EngineRequest, SamplingParams


def _fresh(out, size: int, width: int, bs: int) -> list[np.ndarray]:
    """The decode inputs of `out`, built row by row from the requests (the reference)."""
    ids = np.zeros(size, dtype=np.int64)
    pos = np.zeros(size, dtype=np.int64)
    slots = np.full(size, -1, dtype=np.int64)
    lens = np.zeros(size, dtype=np.int32)
    table = np.zeros((size, width), dtype=np.int32)
    for i, s in enumerate(out.seqs):
        req, p = s.request, s.start
        ids[i] = req.all_token_ids[p] if p < req.num_tokens else -1
        pos[i] = p
        slots[i] = req.block_ids[p // bs] * bs + p % bs
        lens[i] = p + 1
        table[i, :len(req.block_ids)] = req.block_ids
    return [ids, pos, slots, lens, table]


def _run_with_churn(core, n: int, seed: int, base_tokens: int, step_tokens: int, abort: tuple[int, str],
                    add_at: int) -> None:
    """Greedy requests r0..r{n-1} of three lengths: all but the last two from the start, `abort` = (step,
    request) aborted then, the last two added at step `add_at` (taking rows freed by the abort and by
    finished requests); run to the end."""
    prompts = random_prompts(n, [9, 3, 14, 6, 11], seed=seed)
    params = [SamplingParams(max_tokens=base_tokens + step_tokens * (i % 3), temperature=0, ignore_eos=True)
              for i in range(n)]
    for i in range(n - 2):
        core.add_request(EngineRequest(f"r{i}", prompts[i], params[i]))
    steps = 0
    while core.has_unfinished():
        steps += 1
        assert steps < 500
        if steps == abort[0]:
            assert core.abort_request(abort[1])
        if steps == add_at:
            for i in (n - 2, n - 1):
                core.add_request(EngineRequest(f"r{i}", prompts[i], params[i]))
        core.step()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_staged_decode_inputs_equal_fresh_ones(make_core, async_scheduling):
    bs = 4
    per_block = 4 * bs * make_core().model.kv_cache_dim * 4
    core = make_core(block_size=bs, kv_cache_memory_bytes=16 * per_block, async_scheduling=async_scheduling,
                     max_model_len=128)
    core.runner.use_static_decode([2, 4, 8])
    runner = core.runner
    checked = []
    stage = runner._stage

    def checking_stage(g, out, st):
        res = stage(g, out, st)
        want = _fresh(out, g.input_ids.shape[0], g.block_tables.shape[1], bs)
        for name, got, ref in zip(("ids", "positions", "slots", "seq_lens", "block_table"), st.arrays[:5], want):
            assert np.array_equal(got, ref), f"step {len(checked)}: {name} differs"
        rows = [i for i, s in enumerate(out.seqs) if s.start >= s.request.num_tokens]
        assert res[0] == rows and [r.request_id for r in res[1]] == [out.seqs[i].request.request_id for i in rows]
        checked.append(len(out.seqs))
        return res
    runner._stage = checking_stage

    _run_with_churn(core, 7, seed=3, base_tokens=10, step_tokens=6, abort=(6, "r2"), add_at=8)
    assert core.stats().num_preemptions > 0
    assert len(set(checked)) > 1 and len(checked) > 10


def _fresh_eager(out, bs: int) -> dict:
    """The eager path's inputs of `out`, sequence by sequence (the reference)."""
    ids, pos, slots, qsl, lens, tables = [], [], [], [0], [], []
    for s in out.seqs:
        req, end = s.request, s.start + s.num_new_tokens
        ids.extend([-1] if end > req.num_tokens else req.all_token_ids[s.start:end])
        for p in range(s.start, end):
            pos.append(p)
            slots.append(req.block_ids[p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + s.num_new_tokens)
        lens.append(end)
        tables.append(req.block_ids)
    width = max(len(t) for t in tables)
    return dict(pos=pos, slots=slots, qsl=qsl, lens=lens, table=[t + [0] * (width - len(t)) for t in tables],
                ids=ids)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_eager_inputs_equal_fresh_ones(make_core, async_scheduling):
    """Prefill chunks, mixed batches and eager decodes (no static path): the vectorized inputs equal
    sequence-by-sequence ones."""
    bs = 4
    per_block = 4 * bs * make_core().model.kv_cache_dim * 4
    core = make_core(block_size=bs, kv_cache_memory_bytes=16 * per_block, async_scheduling=async_scheduling,
                     max_model_len=128, max_num_batched_tokens=12)
    runner = core.runner
    prepare = runner._prepare
    checked = []

    def checking_prepare(out, *args):
        want = _fresh_eager(out, bs)
        ids, pos, attn, qsl = prepare(out, *args)
        assert pos.tolist() == want["pos"] and attn.slot_mapping.tolist() == want["slots"]
        assert qsl == want["qsl"] and attn.query_start_loc.tolist() == want["qsl"]
        assert attn.seq_lens.tolist() == want["lens"] == attn.seq_lens_cpu
        assert attn.query_lens == [s.num_new_tokens for s in out.seqs]
        assert attn.block_tables.tolist() == want["table"]
        known = [i for i, t in enumerate(want["ids"]) if t != -1]
        assert [ids.tolist()[i] for i in known] == [want["ids"][i] for i in known]
        checked.append(out.num_decodes < len(out.seqs))
        return ids, pos, attn, qsl
    runner._prepare = checking_prepare

    _run_with_churn(core, 6, seed=7, base_tokens=8, step_tokens=5, abort=(5, "r1"), add_at=7)
    assert core.stats().num_preemptions > 0
    assert any(checked) and not all(checked)    # mixed / prefill steps and pure decode steps


def test_host_block_table_keeps_the_first_width_blocks_of_longer_lists():
    """A narrow decode graph's table holds each row's first `width` blocks, while requests grow, are replaced
    and leave, even when a request holds more blocks than that (it may: only its length picks the graph)."""
    from wideep.engine.model_runner import _HostBlockTable

    rng = np.random.default_rng(0)
    rows, width = 4, 5
    ht = _HostBlockTable(rows, width)
    lists: list[list[int]] = [[] for _ in range(rows)]
    for _ in range(300):
        b = int(rng.integers(0, rows + 1))
        for i in range(b):
            op = rng.integers(0, 3)
            if op == 0:       # the running request gained blocks
                lists[i].extend(rng.integers(1, 99, size=int(rng.integers(1, 4))).tolist())
            elif op == 1:     # another request took the row (or this one was preempted and came back)
                lists[i] = rng.integers(1, 99, size=int(rng.integers(0, 2 * width))).tolist()
            ht.set_row(i, lists[i])
        ht.clear_from(b)
        want = np.zeros((rows, width), dtype=np.int32)
        for i in range(b):
            want[i, :min(len(lists[i]), width)] = lists[i][:width]
        assert np.array_equal(ht.table, want)
        assert ht.num_blocks[:b].tolist() == [len(x) for x in lists[:b]]
        for i in range(b, rows):
            lists[i] = []
