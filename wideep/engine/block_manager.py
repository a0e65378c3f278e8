"""Paged KV block allocator with prefix caching.

Blocks are ref-counted; a block whose tokens are all computed gets a chained hash and stays
findable after its last user frees it, until the allocator needs it back (LRU over free blocks).
Events (BlockStored / BlockRemoved / AllBlocksCleared) are recorded in the order they happen, for
the KV-event publisher and the router's precise prefix scorer.
"""
from __future__ import annotations

from collections import OrderedDict

from wideep.engine.api import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from wideep.engine.block_hash import hash_block_tokens
from wideep.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Free blocks, least recently freed first; allocation takes from the front.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_cache_queries = 0   # tokens looked up
        self.prefix_cache_hits = 0      # tokens found
        self.events: list[KVEvent] = []

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's tokens. At least one token
        is always left to compute (its logits are needed), so a full hit stops one block short."""
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        found: list[int] = []
        parent = None
        for i in range(max_blocks):
            h = hash_block_tokens(parent, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.hash_to_block.get(h)
            if block is None:
                break
            found.append(block)
            parent = h
        return found

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_cache_queries += num_query_tokens
        self.prefix_cache_hits += num_hit_tokens

    # ---- allocation ----------------------------------------------------------------------
    def can_allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        total = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        need = self.blocks_needed(total) - len(request.block_ids) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return need <= len(self.free_queue) - revived

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Gives the request blocks for `num_new_tokens` more tokens (after `cached_blocks`, a prefix
        from find_cached_prefix that becomes computed). False, changing nothing, if they don't fit."""
        if not cached_blocks and request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size:
            return True     # its blocks hold them already (a decode inside its last block: most steps)
        if not self.can_allocate(request, num_new_tokens, cached_blocks):
            return False
        for b in cached_blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
            request.block_ids.append(b)
            request.block_hashes.append(self.block_hash[b])
        request.num_computed_tokens += len(cached_blocks) * self.block_size
        need = self.blocks_needed(request.num_computed_tokens + num_new_tokens) - len(request.block_ids)
        # The same blocks the LRU gives, in ascending order: adjacent ids stay adjacent in the request,
        # so a P/D transfer of them is one descriptor per run instead of one per block (cached blocks
        # come back from the LRU tail-first, i.e. descending).
        request.block_ids.extend(sorted(self._take_free_block() for _ in range(need)))
        return True

    def _take_free_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:
            self.block_hash[block] = None
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
                self.events.append(BlockRemoved(block_hashes=[h]))
        self.ref_counts[block] = 1
        return block

    def free(self, request: Request) -> None:
        """Drops the request's references; tail blocks go first in the LRU so prefixes live longest."""
        for b in reversed(request.block_ids):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                if self.block_hash[b] is None:
                    # Never-cached blocks are useless once free: reuse them first.
                    self.free_queue[b] = None
                    self.free_queue.move_to_end(b, last=False)
                else:
                    self.free_queue[b] = None
        request.block_ids = []
        request.block_hashes = []

    # ---- caching -------------------------------------------------------------------------
    def cache_full_blocks(self, request: Request) -> None:
        """Hashes the request's blocks that became full and computed; records one BlockStored."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        start = len(request.block_hashes)
        if num_full <= start:
            return
        parent = request.block_hashes[-1] if request.block_hashes else None
        run: BlockStored | None = None   # consecutive newly stored blocks share one event
        for i in range(start, num_full):
            tokens = request.all_token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = hash_block_tokens(parent, tokens)
            block = request.block_ids[i]
            request.block_hashes.append(h)
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                if run is None:
                    run = BlockStored(block_hashes=[], parent_block_hash=parent, token_ids=[],
                                      block_size=self.block_size)
                    self.events.append(run)
                run.block_hashes.append(h)
                run.token_ids.extend(tokens)
            else:
                run = None
            parent = h

    def reset_prefix_cache(self) -> bool:
        """Forgets every cached hash; only possible when no block is in use."""
        if len(self.free_queue) != self.num_blocks:
            return False
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.events.append(AllBlocksCleared())
        return True

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events
