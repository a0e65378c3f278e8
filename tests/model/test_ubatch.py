"""Dual-batch overlap on one rank: the split forward equals the plain forward; split points and
per-micro-batch metadata."""
from __future__ import annotations

import pytest
import torch

from wideep.model.attention import AttentionMetadata
from wideep.model.ubatch import DBOConfig, slice_metadata, split_point


def _meta(query_lens, seq_lens, num_decodes):
    tables = [[2 * i, 2 * i + 1] for i in range(len(query_lens))]
    return AttentionMetadata.build(query_lens, seq_lens, tables, 64, num_decodes=num_decodes)


def test_split_points():
    assert split_point(_meta([1] * 5, [9] * 5, 5)) == 3           # decodes: A gets the extra one
    assert split_point(_meta([1, 1, 30, 30], [5, 5, 30, 30], 2)) == 3
    assert split_point(_meta([40], [40], 0)) == 1                 # one prefill: B is empty
    assert split_point(_meta([1, 1, 100], [3, 3, 100], 2)) == 2


def test_slice_metadata_rebases_tokens():
    m = _meta([1, 1, 5, 3], [4, 4, 5, 3], 2)
    b = slice_metadata(m, 1, 3, 1, 7)
    assert b.num_decodes == 1 and b.query_lens == [1, 5] and b.seq_lens_cpu == [4, 5]
    assert b.query_start_loc.tolist() == [0, 1, 6]
    assert torch.equal(b.slot_mapping, m.slot_mapping[1:7])


def test_thresholds_are_strictly_greater():
    c = DBOConfig(True, 32, 512)
    assert not c.should_split(32, True) and c.should_split(33, True)
    assert not c.should_split(512, False) and c.should_split(513, False)
    assert not DBOConfig(False).should_split(10_000, False)
    assert DBOConfig.ubatch_max_tokens(33, True) == 17 and DBOConfig.ubatch_max_tokens(600, False) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_forward_equals_forward(tiny_model_dir, dtype):
    """Each micro-batch runs the unsplit forward's pieces (fused residual + norm, the shared expert as a slot of
    the grouped MLP, the weight in the combine): bit-equal in bf16; in fp32 the CPU's GEMMs round differently at
    small row counts (not batch-invariant), so there only to rounding."""
    from wideep.engine.kv_cache import allocate_kv_caches
    from wideep.model.loader import load_model
    from wideep.model.ubatch import forward_dual_batch

    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), torch.device("cpu"), dtype)
    assert all(m.experts.n_shared == 1 for m in model.moe_layers())     # the fused shared slot is exercised
    lens = [7, 1, 12, 3]
    tables = [[1 + i] for i in range(len(lens))]
    m = AttentionMetadata.build(lens, lens, tables, 16, num_decodes=0)
    ids = torch.randint(0, model.config.vocab_size, (sum(lens),))
    pos = torch.cat([torch.arange(n) for n in lens])
    caches = allocate_kv_caches(model.num_layers, 8, 16, model.kv_cache_dim, dtype, torch.device("cpu"))
    with torch.inference_mode():
        ref = model.forward(ids, pos, m, caches)
        got = forward_dual_batch(model, ids, pos, m, caches)
    if dtype == torch.bfloat16:
        assert torch.equal(got, ref)
    else:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dense_prefix_runs_once_on_the_whole_batch(tiny_model_dir):
    """The leading dense layers make no EP collective: a split step runs them once over all rows (reading their
    weights once), and only the MoE layers per micro-batch."""
    from wideep.engine.kv_cache import allocate_kv_caches
    from wideep.model.loader import load_model
    from wideep.model.ubatch import forward_dual_batch

    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), torch.device("cpu"), torch.bfloat16)
    first = model.dense_prefix_layers
    assert 0 < first < model.num_layers
    rows: dict[int, list[int]] = {0: [], first: []}
    for i in rows:
        model.model.layers[i].self_attn.register_forward_hook(lambda _m, args, _o, i=i: rows[i].append(args[0].shape[0]))
    lens = [1] * 6
    m = AttentionMetadata.build(lens, [5] * 6, [[1 + i] for i in range(6)], 16, num_decodes=6)
    caches = allocate_kv_caches(model.num_layers, 8, 16, model.kv_cache_dim, torch.bfloat16, torch.device("cpu"))
    with torch.inference_mode():
        forward_dual_batch(model, torch.randint(0, 100, (6,)), torch.full((6,), 4), m, caches)
    assert rows == {0: [6], first: [3, 3]}
