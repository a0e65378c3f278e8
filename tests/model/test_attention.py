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


def _paged(g, lens, page, width, heads, lat=64, rope=16, dtype=torch.float32):
    """A NaN-poisoned pool with shuffled blocks; one table row per sequence."""
    need = [-(-n // page) for n in lens]
    nblocks = sum(need) + 1
    cache = torch.full((nblocks, page, lat + rope), float("nan"), dtype=dtype)
    ids = torch.randperm(nblocks - 1, generator=g).tolist()
    tables = torch.full((len(lens), width), nblocks - 1, dtype=torch.int32)
    for i, n in enumerate(lens):
        for j in range(need[i]):
            blk = ids.pop()
            tables[i, j] = blk
            valid = min(page, n - j * page)
            cache[blk, :valid] = torch.randn(valid, lat + rope, generator=g).to(dtype)
    q_lat = torch.randn(len(lens), heads, lat, generator=g).to(dtype)
    q_pe = torch.randn(len(lens), heads, rope, generator=g).to(dtype)
    return q_lat, q_pe, cache, tables, torch.tensor(lens, dtype=torch.int32)


def test_reference_split_schedule_is_batch_invariant():
    """The same sequence alone and inside a batch of 37 (other lengths, a wider table, padding rows) gives
    bit-identical output on the reference path, for several splits per sequence; and the split result
    matches a one-pass fp64 softmax."""
    from wideep.model.attention import paged_mla_decode_torch

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 700, (37,), generator=g).tolist()
    lens[5], lens[9] = 0, 613   # a padding row, and the probe: 613 tokens = 3 splits of 256 (chunk 256)
    for dtype in (torch.float32, torch.bfloat16):
        q_lat, q_pe, cache, tables, seq_lens = _paged(g, lens, 16, 48, heads=4, dtype=dtype)
        batch = paged_mla_decode_torch(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2, chunk=256)
        alone = paged_mla_decode_torch(q_lat[9:10], q_pe[9:10], cache, tables[9:10, :39], seq_lens[9:10], 64, 0.2,
                                       chunk=256)
        assert torch.equal(batch[9:10], alone)
        assert batch[5].abs().max() == 0 and torch.isfinite(batch).all()
        # the fp64 oracle: one softmax over the whole context
        ctx = cache[tables[9, :39].long()].reshape(-1, 80)[:613].double()
        s = (q_lat[9].double() @ ctx[:, :64].T + q_pe[9].double() @ ctx[:, 64:].T) * 0.2
        want = torch.softmax(s, -1) @ ctx[:, :64]
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(batch[9].double(), want, rtol=tol, atol=tol)


def test_fp8_cache_round_trip_within_e4m3_bounds():
    from wideep.model.attention import FP8_E4M3_MAX, dequantize_latent, resolve_kv_cache_dtype

    g = torch.Generator().manual_seed(1)
    cache = torch.zeros(4, 8, 12, dtype=resolve_kv_cache_dtype("fp8", torch.bfloat16))
    assert cache.dtype == torch.float8_e4m3fn and resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    latent = torch.randn(6, 12, generator=g) * torch.logspace(-3, 1, 12)   # magnitudes 1e-3 .. 1e1
    latent[0, 0] = 1e4                                                       # past e4m3's range: saturates
    for k_scale in (1.0, 0.25):
        write_latent_cache(cache, latent, torch.tensor([0, 3, -1, 17, 31, 8]), k_scale)
        back = dequantize_latent(cache.view(-1, 12)[[0, 3, 17, 31, 8]], k_scale, torch.float32)
        ref = latent[[0, 1, 3, 4, 5]]
        # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 for normals, 2^-10 absolute below 2^-6
        bound = torch.maximum(ref.abs() * 2.0 ** -4, torch.full_like(ref, 2.0 ** -10 * k_scale))
        err = (back - ref).abs()
        err[0, 0] = 0.0
        assert (err <= bound).all(), (err / bound).max()
        assert back[0, 0] == FP8_E4M3_MAX * k_scale          # saturated, not NaN
    assert cache.view(-1, 12)[2].float().abs().sum() == 0     # the padding row wrote nothing


def test_fp8_cache_decode_close_to_bf16_cache():
    from wideep.model.attention import paged_mla_decode_torch, quantize_latent

    g = torch.Generator().manual_seed(2)
    q_lat, q_pe, cache, tables, seq_lens = _paged(g, [300, 17, 0], 16, 20, heads=4)
    cache = torch.nan_to_num(cache, nan=0.0)
    exact = paged_mla_decode_torch(q_lat, q_pe, cache, tables, seq_lens, 64, 0.2)
    c8 = quantize_latent(cache, 1.0)
    got = paged_mla_decode_torch(q_lat, q_pe, c8, tables, seq_lens, 64, 0.2, 1.0)
    rel = (got - exact).norm() / exact.norm()
    assert rel < 0.1, rel       # e4m3 operands: a few percent
    assert got[2].abs().max() == 0


def test_cross_layer_views_behave_like_per_layer_caches():
    """engine/kv_cache.py's block-major layout: each layer's cache is a strided view of one
    [num_blocks, num_layers, block_size, D] tensor; writes land in that layer's slice of the block and
    decode reads the same values as from a separate contiguous tensor (bf16 and fp8 caches)."""
    from wideep.engine.kv_cache import allocate_kv_caches
    from wideep.model.attention import resolve_kv_cache_dtype

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, resolve_kv_cache_dtype("fp8", torch.bfloat16)):
        cross = allocate_kv_caches(3, 6, 4, 10, dtype, torch.device("cpu"), cross_layer=True)
        flat = allocate_kv_caches(3, 6, 4, 10, dtype, torch.device("cpu"))
        assert not cross[1].is_contiguous() and cross[1].stride(0) == 3 * 4 * 10
        slots = torch.tensor([0, 5, -1, 13, 22, 7])
        for layer in range(3):
            latent = torch.randn(6, 10, generator=g)
            write_latent_cache(cross[layer], latent, slots, 0.5)
            write_latent_cache(flat[layer], latent, slots, 0.5)
        for c, f in zip(cross, flat):
            assert torch.equal(c.view(torch.uint8), f.view(torch.uint8))
        backing = cross[0].as_strided((6, 3, 4, 10), (3 * 4 * 10, 4 * 10, 10, 1))
        assert torch.equal(backing[2, 1].view(torch.uint8), flat[1][2].view(torch.uint8))   # block-major
        if dtype == torch.float32:
            q_lat, q_pe = torch.randn(2, 2, 8, generator=g), torch.randn(2, 2, 2, generator=g)
            tables = torch.tensor([[0, 3, 1], [5, 1, 0]], dtype=torch.int32)
            lens = torch.tensor([11, 6], dtype=torch.int32)
            torch.testing.assert_close(paged_mla_decode(q_lat, q_pe, cross[2], tables, lens, 8, 0.3),
                                       paged_mla_decode(q_lat, q_pe, flat[2], tables, lens, 8, 0.3))
