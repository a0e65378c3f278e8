"""Chained prefix-block hashes over token ids: the engine's prefix-cache keys, which KV events carry.
The router does not compute these; it keys blocks its own way (docs/protocols.md, "Prefix block keys").

hash(block i) = xxh3_64(parent_hash as 8 bytes big-endian || token ids as little-endian uint32),
with parent_hash = 0 for the first block. Only full blocks are hashed. The result is an unsigned
64-bit int, the form KV events carry (llm-d reads int hashes as uint64).
"""
from __future__ import annotations

import struct
from typing import Sequence

import xxhash

ROOT_PARENT_HASH = 0


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    parent = ROOT_PARENT_HASH if parent_hash is None else parent_hash
    data = parent.to_bytes(8, "big") + struct.pack(f"<{len(token_ids)}I", *token_ids)
    return xxhash.xxh3_64_intdigest(data)


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int, parent_hash: int | None = None) -> list[int]:
    """Hashes of every full block of `token_ids`, chained from `parent_hash`."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start:start + block_size])
        hashes.append(parent_hash)
    return hashes
