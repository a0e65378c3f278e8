"""Paged latent cache primitives: padded writes are no-ops, padded decode rows stay finite and isolated."""
from __future__ import annotations

import torch

from wideep.model.attention import AttentionMetadata, paged_mla_decode, write_latent_cache
from wideep.model.loader import load_model


def test_write_skips_padding_slots():
    cache = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3)
    before = cache.clone()
    latent = torch.full((4, 3), -1.0)
    latent[1] = 7.0
    write_latent_cache(cache, latent, torch.tensor([-1, 5, -1, -1]))
    expect = before.clone()
    expect.view(-1, 3)[5] = 7.0
    assert torch.equal(cache, expect)
    write_latent_cache(cache, latent, torch.tensor([-1, -1, -1, -1]))  # all padding: nothing changes
    assert torch.equal(cache, expect)


def test_decode_padding_rows_are_finite_and_do_not_touch_real_rows():
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(6, 4, 10, generator=g)
    cache[5] = float("nan")  # a block nobody owns, referenced by padded table entries
    q_lat, q_pe = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 2, generator=g)
    tables = torch.tensor([[0, 1, 5], [2, 5, 5], [5, 5, 5]], dtype=torch.int32)
    seq_lens = torch.tensor([7, 3, 0], dtype=torch.int32)
    out = paged_mla_decode(q_lat, q_pe, cache, tables, seq_lens, kv_lora_rank=8, scale=0.3)
    assert torch.isfinite(out).all() and out[2].abs().max() == 0
    alone = paged_mla_decode(q_lat[:1], q_pe[:1], cache, tables[:1, :2], seq_lens[:1], 8, 0.3)
    torch.testing.assert_close(out[:1], alone)


@torch.no_grad()
def test_padded_decode_batch_matches_unpadded(tiny_model_dir, paged_runner):
    """A graph-style padded batch (slot -1, seq_len 0 rows) gives the real row the same logits."""
    model = load_model(tiny_model_dir)
    runner = paged_runner(model)
    ids = [11, 22, 33, 44, 55]
    runner.step([(0, ids)])
    caches_copy = [c.clone() for c in runner.caches]
    (ref,) = runner.step([(0, [66])], num_decodes=1)

    table = runner.tables[0]
    attn = AttentionMetadata(
        slot_mapping=torch.tensor([table[5 // 4] * 4 + 1, -1, -1, -1]),
        query_start_loc=torch.arange(5, dtype=torch.int32),
        seq_lens=torch.tensor([6, 0, 0, 0], dtype=torch.int32),
        block_tables=torch.tensor([table + [0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.int32),
        num_decodes=4,
        query_lens=[1, 1, 1, 1],
        seq_lens_cpu=[6, 0, 0, 0],
    )
    hidden = model(torch.tensor([66, 0, 0, 0]), torch.tensor([5, 0, 0, 0]), attn, caches_copy)
    logits = model.compute_logits(hidden)
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[:1], ref, rtol=1e-5, atol=1e-5)
