"""Chained xxhash64 block keys (docs/protocols.md, "Prefix block keys"), shared by the approximate and precise prefix index.

h0 = xxh64(model || cache_salt); h_i = xxh64(LE64(xxh64(block_i tokens as LE uint32)) || LE64(h_{i-1})).
Only full blocks are hashed: a partial tail block cannot be cached by the engine either.
"""
from __future__ import annotations

import struct
import sys
from array import array

import xxhash


def root_hash(model: str, cache_salt: str = "") -> int:
    return xxhash.xxh64_intdigest((model + cache_salt).encode())


_LITTLE = sys.byteorder == "little" and array("I").itemsize == 4


def _le_u32(tokens) -> bytes:
    if _LITTLE:
        try:
            return array("I", tokens).tobytes()          # C speed; ids outside uint32 fall through
        except OverflowError:
            pass
    return struct.pack(f"<{len(tokens)}I", *[t & 0xFFFFFFFF for t in tokens])


def chain_block(parent: int, tokens: list[int] | tuple[int, ...]) -> int:
    inner = xxhash.xxh64_intdigest(_le_u32(tokens))
    return xxhash.xxh64_intdigest(struct.pack("<QQ", inner, parent))


def block_hashes(token_ids: list[int], block_size: int, parent: int, max_tokens: int | None = None) -> list[int]:
    n = len(token_ids) if max_tokens is None else min(len(token_ids), max_tokens)
    out = []
    h = parent
    for start in range(0, n - block_size + 1, block_size):
        h = chain_block(h, token_ids[start:start + block_size])
        out.append(h)
    return out
