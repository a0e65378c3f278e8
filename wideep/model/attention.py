"""The batch layout the engine hands the model each step, and the paged latent KV cache primitives.

A batch is a flat list of T new tokens from B sequences: the first `num_decodes` sequences have exactly
one new token each (absorbed MLA over the latent cache, CUDA-graph capturable); the rest are prefills
(whole prompts or chunks on top of a cached prefix) computed in the non-absorbed MHA form.

Cache: one tensor per layer, [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim], the normalized
c_kv followed by the rope'd k_pe of each token. Slot = block_id * block_size + offset.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wideep import envs


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor      # LongTensor[T]: cache slot of each new token, -1 = padding (not written)
    query_start_loc: torch.Tensor   # IntTensor[B+1]: token offsets of each sequence in the flat batch
    seq_lens: torch.Tensor          # IntTensor[B]: context length after this step (incl. new tokens); 0 = padding
    block_tables: torch.Tensor      # IntTensor[B, max_blocks]: padded block ids of each sequence
    num_decodes: int = 0            # the first num_decodes sequences have one new token each
    query_lens: list[int] = field(default_factory=list)    # host copy of new-token counts (prefill loop)
    seq_lens_cpu: list[int] = field(default_factory=list)  # host copy of seq_lens (prefill loop)

    @property
    def num_seqs(self) -> int:
        return int(self.block_tables.shape[0])

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        num_decodes: int = 0,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Convenience constructor (tests, simple runners): derives slots from positions and block tables.

        Sequence i's new tokens occupy positions seq_lens[i]-query_lens[i] .. seq_lens[i]-1.
        """
        if len(query_lens) != len(seq_lens) or len(seq_lens) != len(block_tables):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        slots: list[int] = []
        for q, s, bt in zip(query_lens, seq_lens, block_tables):
            for pos in range(s - q, s):
                slots.append(bt[pos // block_size] * block_size + pos % block_size)
        max_blocks = max([len(bt) for bt in block_tables] + [1])
        padded = [list(bt) + [0] * (max_blocks - len(bt)) for bt in block_tables]
        qsl = [0]
        for q in query_lens:
            qsl.append(qsl[-1] + q)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(block_tables), max_blocks),
            num_decodes=num_decodes,
            query_lens=list(query_lens),
            seq_lens_cpu=list(seq_lens),
        )


def write_latent_cache(kv_cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write latent [T, D] into the slots of kv_cache; rows with slot -1 write nothing.

    Shape-static and sync-free (graph capturable): padding rows are redirected to the first real row's
    slot with that row's own value (duplicate writes of identical data), or, when no row is real, to slot
    0 with its current value - both exact no-ops whatever order the scatter runs in.
    """
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    slot = slot_mapping.to(torch.long)
    latent = latent.to(flat.dtype)
    valid = slot >= 0
    first = torch.argmax(valid.to(torch.int32)).reshape(1)  # index_select, not [tensor]: no host sync
    any_valid = valid.any()
    first_slot = slot.index_select(0, first)[0]
    fill_slot = torch.where(any_valid, first_slot, torch.zeros_like(first_slot))
    fill_val = torch.where(any_valid, latent.index_select(0, first)[0], flat[0])
    target = torch.where(valid, slot, fill_slot)
    src = torch.where(valid[:, None], latent, fill_val[None, :])
    flat.index_copy_(0, target, src)


def gather_context(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[B, max_blocks] block ids -> [B, max_blocks*block_size, D] cached latents (padding included)."""
    b, nb = block_tables.shape
    blocks = kv_cache[block_tables.to(torch.long).reshape(-1)]  # [B*nb, bs, D]
    return blocks.view(b, nb * kv_cache.shape[1], kv_cache.shape[2])


def paged_mla_decode(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:
    """Absorbed-MLA decode: the fused Triton kernel (mla_decode_triton) on CUDA when triton imports, else the
    torch reference below. Env WIDEEP_MLA_DECODE=torch|triton forces one (triton on CPU = its interpreter)."""
    if q_lat.is_cuda or envs.WIDEEP_MLA_DECODE == "triton":
        from .mla_decode_triton import paged_mla_decode_triton, use_triton

        if use_triton(q_lat):
            return paged_mla_decode_triton(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank, scale)
    return paged_mla_decode_torch(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank, scale)


def paged_mla_decode_torch(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:
    """Reference absorbed-MLA decode over the paged latent cache (torch ops; a Triton kernel can replace it).

    q_lat [B, H, L] (q_nope already through W_UK), q_pe [B, H, R] -> o_lat [B, H, L] (before W_UV).
    Scores against c_kv ‖ k_pe (MQA, one latent head), values are c_kv. Rows past seq_len are masked and
    zeroed so stale/uninitialized cache contents never reach real rows; seq_len 0 rows give zeros.
    """
    ctx = gather_context(kv_cache, block_tables)  # [B, S, L+R]
    s = ctx.shape[1]
    valid = torch.arange(s, device=ctx.device)[None, :] < seq_lens.to(ctx.device)[:, None]  # [B, S]
    ctx = torch.where(valid[:, :, None], ctx, torch.zeros((), dtype=ctx.dtype, device=ctx.device))
    c_kv, k_pe = ctx[..., :kv_lora_rank], ctx[..., kv_lora_rank:]
    scores = torch.einsum("bhl,bsl->bhs", q_lat, c_kv).float()
    scores = scores + torch.einsum("bhr,bsr->bhs", q_pe, k_pe).float()
    scores = scores * scale
    scores = scores.masked_fill(~valid[:, None, :], torch.finfo(torch.float32).min)
    probs = torch.softmax(scores, dim=-1)
    probs = probs * valid[:, None, :]  # seq_len 0 rows: all-zero instead of uniform over padding
    return torch.einsum("bhs,bsl->bhl", probs.to(c_kv.dtype), c_kv).to(q_lat.dtype)
