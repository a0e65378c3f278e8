"""Block manager: chained hashes, ref counts, LRU eviction and the KV events they produce."""
from __future__ import annotations

from wideep.engine.api import AllBlocksCleared, BlockRemoved, BlockStored, EngineRequest, SamplingParams
from wideep.engine.block_hash import hash_block_tokens, hash_prompt_blocks
from wideep.engine.block_manager import BlockManager
from wideep.engine.request import Request

BS = 4


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(EngineRequest(rid, tokens, SamplingParams(max_tokens=4)), eos_token_ids={1}, max_tokens=4)


def compute_all(bm: BlockManager, req: Request) -> None:
    cached = bm.find_cached_prefix(req)
    assert bm.allocate(req, req.num_tokens - len(cached) * BS - req.num_computed_tokens, cached)
    req.num_computed_tokens = req.num_tokens
    bm.cache_full_blocks(req)


def test_hashes_are_chained_and_stable():
    a = hash_prompt_blocks(list(range(12)), BS)
    assert len(a) == 3
    assert a[1] == hash_block_tokens(a[0], [4, 5, 6, 7])
    assert hash_prompt_blocks([9, 9] + list(range(2, 12)), BS)[2] != a[2]  # parent changes the child
    assert all(0 <= h < 2**64 for h in a)


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    bm = BlockManager(16, BS)
    r1 = make_request("a", list(range(10, 22)))          # 3 full blocks
    compute_all(bm, r1)
    events = bm.take_events()
    assert len(events) == 1 and isinstance(events[0], BlockStored)
    assert events[0].parent_block_hash is None and len(events[0].block_hashes) == 3
    assert events[0].token_ids == list(range(10, 22))

    r2 = make_request("b", list(range(10, 22)))          # identical prompt: 2 blocks reused, last recomputed
    cached = bm.find_cached_prefix(r2)
    assert cached == r1.block_ids[:2]
    r3 = make_request("c", list(range(10, 22)) + [5, 6])  # longer: all 3 cached
    assert bm.find_cached_prefix(r3) == r1.block_ids
    assert bm.allocate(r3, 2, bm.find_cached_prefix(r3))
    assert r3.num_computed_tokens == 12 and r3.block_ids[:3] == r1.block_ids
    assert bm.ref_counts[r1.block_ids[0]] == 2
    bm.free(r1)
    bm.free(r3)
    assert bm.num_free_blocks == 16


def test_lru_eviction_emits_block_removed():
    bm = BlockManager(3, BS)
    r1 = make_request("a", list(range(100, 108)))   # 2 blocks, both cached after
    compute_all(bm, r1)
    stored = bm.take_events()[0].block_hashes
    blocks = list(r1.block_ids)
    bm.free(r1)
    assert bm.num_free_blocks == 3 and bm.find_cached_prefix(make_request("x", list(range(100, 109)))) == blocks
    r2 = make_request("b", list(range(200, 212)))   # needs all 3 blocks: evicts both cached ones, tail first
    assert bm.allocate(r2, 12)
    events = bm.take_events()
    assert [type(e) for e in events] == [BlockRemoved, BlockRemoved]
    assert [e.block_hashes[0] for e in events] == [stored[1], stored[0]]
    assert not bm.hash_to_block
    assert not bm.allocate(make_request("c", [1, 2, 3]), 3)   # nothing left, nothing changed
    bm.free(r2)
    assert bm.num_free_blocks == 3


def test_reset_prefix_cache():
    bm = BlockManager(4, BS)
    r = make_request("a", list(range(8)))
    compute_all(bm, r)
    assert not bm.reset_prefix_cache()   # blocks in use
    bm.free(r)
    bm.take_events()
    assert bm.reset_prefix_cache()
    assert isinstance(bm.take_events()[0], AllBlocksCleared)
    assert bm.find_cached_prefix(make_request("b", list(range(9)))) == []


def test_counters_and_disabled_caching():
    bm = BlockManager(4, BS, enable_prefix_caching=False)
    r = make_request("a", list(range(8)))
    compute_all(bm, r)
    assert bm.take_events() == [] and bm.find_cached_prefix(make_request("b", list(range(9)))) == []
    bm.free(r)


def test_new_blocks_are_handed_out_in_ascending_order():
    """Cached blocks return to the LRU tail-first (descending); a request reusing them still gets
    adjacent ids in ascending order (a P/D transfer of them merges into one descriptor per run),
    and the same blocks are evicted, in the same order, as without the sort."""
    bm = BlockManager(8, BS)
    r1 = make_request("a", list(range(100, 116)))   # 4 blocks, all cached after
    compute_all(bm, r1)
    assert r1.block_ids == [0, 1, 2, 3]
    stored = bm.take_events()[0].block_hashes
    r2 = make_request("b", list(range(200, 216)))   # blocks 4..7
    compute_all(bm, r2)
    bm.take_events()
    bm.free(r1)                                     # LRU tail now 3, 2, 1, 0
    bm.free(r2)                                     # then 7, 6, 5, 4
    r3 = make_request("c", list(range(300, 316)))
    assert bm.allocate(r3, 16)
    assert r3.block_ids == [0, 1, 2, 3]
    assert [e.block_hashes[0] for e in bm.take_events()] == [stored[3], stored[2], stored[1], stored[0]]
    bm.free(r3)
