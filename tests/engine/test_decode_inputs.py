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

    prompts = random_prompts(7, [9, 3, 14, 6, 11], seed=3)
    params = [SamplingParams(max_tokens=10 + 6 * (i % 3), temperature=0, ignore_eos=True) for i in range(7)]
    for i in range(5):
        core.add_request(EngineRequest(f"r{i}", prompts[i], params[i]))
    steps = 0
    while core.has_unfinished():
        steps += 1
        assert steps < 500
        if steps == 6:
            assert core.abort_request("r2")
        if steps == 8:      # new requests take rows freed by the abort (and by finished ones later)
            core.add_request(EngineRequest("r5", prompts[5], params[5]))
            core.add_request(EngineRequest("r6", prompts[6], params[6]))
        core.step()
    assert core.stats().num_preemptions > 0
    assert len(set(checked)) > 1 and len(checked) > 10
