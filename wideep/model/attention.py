"""The batch layout the engine hands the model each step, and the paged latent KV cache primitives.

A batch is a flat list of T new tokens from B sequences: the first `num_decodes` sequences have exactly
one new token each (absorbed MLA over the latent cache, CUDA-graph capturable); the rest are prefills
(whole prompts or chunks on top of a cached prefix) computed in the non-absorbed MHA form.

Cache: one tensor per layer, [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim], the normalized
c_kv followed by the rope'd k_pe of each token. Slot = block_id * block_size + offset. In the model dtype,
or with `--kv-cache-dtype fp8` float8 e4m3 of value / k_scale (quantized on write, widened on read).
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
    # what a kernel derives from these tensors once per step for every layer (a decode schedule), keyed by
    # what it was derived from (mla_decode_flashmla.plan_for); whoever reuses this object for another step with
    # new values in its tensors empties it first
    plans: dict = field(default_factory=dict, repr=False, compare=False)

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


# ---- KV cache dtype -----------------------------------------------------------------------------------
# `--kv-cache-dtype` as vLLM spells it. fp8 follows vLLM's dense MLA cache: every 576-wide latent row
# (c_kv ‖ k_pe) stored as float8 e4m3 of value / k_scale, one per-tensor (per-layer) fp32 scale, 1.0 when
# the checkpoint carries none (DeepSeek's do not). FlashMLA's own fp8 layout (per-128 tile scales and a
# bf16 rope part, 656 bytes per token) is a different format and is not what this cache holds.
FP8_E4M3_MAX = 448.0
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor dtype for a `--kv-cache-dtype` value; `auto` = the model's dtype."""
    key = (name or "auto").strip().lower()
    if key == "auto":
        return model_dtype
    if key in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    if key in ("bfloat16", "float16", "float32"):
        return getattr(torch, key)
    raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r} "
                     "(fp8_e5m2 and FlashMLA's fp8_ds_mla layout are not supported)")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == torch.float8_e4m3fn


def quantize_latent(latent: torch.Tensor, k_scale: float) -> torch.Tensor:
    """value / k_scale, saturated to e4m3's finite range (an overflow must not become NaN), as e4m3."""
    return (latent.float() / k_scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_latent(stored: torch.Tensor, k_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows as values in `dtype` (a no-op cast for non-fp8 caches)."""
    if is_fp8(stored.dtype):
        return (stored.float() * k_scale).to(dtype)
    return stored.to(dtype)


def write_latent_cache(kv_cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor,
                       k_scale: float = 1.0) -> None:
    """Write latent [T, D] into the slots of kv_cache (quantized when the cache is fp8); rows with slot -1
    write nothing.

    Shape-static and sync-free (graph capturable): padding rows are redirected to the first real row's
    slot with that row's own value (duplicate writes of identical data), or, when no row is real, to slot
    0 with its current value - both exact no-ops whatever order the scatter runs in.
    """
    # Indexed by (block, offset), not through a flat [slots, D] view: a cross-layer cache's layer is a
    # strided view (engine/kv_cache.py) that has no flat view.
    cache = kv_cache
    slot = slot_mapping.to(torch.long)
    if is_fp8(cache.dtype):   # index_put_ has no fp8 kernel on every device: move the bytes
        latent = quantize_latent(latent, k_scale).view(torch.uint8)
        cache = cache.view(torch.uint8)
    else:
        latent = latent.to(cache.dtype)
    valid = slot >= 0
    first = torch.argmax(valid.to(torch.int32)).reshape(1)  # index_select, not [tensor]: no host sync
    any_valid = valid.any()
    first_slot = slot.index_select(0, first)[0]
    fill_slot = torch.where(any_valid, first_slot, torch.zeros_like(first_slot))
    fill_val = torch.where(any_valid, latent.index_select(0, first)[0], cache[0, 0])
    target = torch.where(valid, slot, fill_slot)
    src = torch.where(valid[:, None], latent, fill_val[None, :])
    bs = cache.shape[1]
    cache.index_put_((target // bs, target % bs), src)


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
    k_scale: float = 1.0,
    plans: dict | None = None,
) -> torch.Tensor:
    """Absorbed-MLA decode: the fused Triton kernel (mla_decode_triton; with FlashMLA where it applies) on CUDA
    when triton imports, else the torch reference below. Env WIDEEP_MLA_DECODE=torch|triton forces one (triton
    on CPU = its interpreter). `plans`: the step's AttentionMetadata.plans (a schedule made once per step)."""
    if q_lat.is_cuda or envs.WIDEEP_MLA_DECODE == "triton":
        from .mla_decode_triton import paged_mla_decode_triton, use_triton

        if use_triton(q_lat):
            return paged_mla_decode_triton(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank, scale,
                                           k_scale, plans)
    return paged_mla_decode_torch(q_lat, q_pe, kv_cache, block_tables, seq_lens, kv_lora_rank, scale, k_scale)


# ---- split-K schedule -------------------------------------------------------------------------------------
# Batch invariance: how a sequence's context is cut into splits depends only on its own length, never on
# the batch size or the block-table width, so a sequence gives the same bits alone, in a batch of 37, or
# in a CUDA graph padded to a larger size. n = min(ceil(len / SPLIT_TOKENS), MAX_SPLITS) splits of
# ceil(len / n) tokens rounded up to SPLIT_ALIGN (a multiple of every kernel tile), merged by their
# log-sum-exp in split order.
SPLIT_TOKENS_ENV = "WIDEEP_MLA_SPLIT_TOKENS"
SPLIT_ALIGN = 128
MAX_SPLITS = 4
# 2048: at B >= 128 (wide-EP decode) one split per 2k context and no merge pass, 8% under the present
# kernel's time on an H200; the price is small batches, which a fixed split cannot spread over the GPU
# (B=1, ctx 2048: 0.14 ms against 0.018 for a batch-dependent split). 1024 halves that (0.078 ms) and costs
# ~15% at B >= 128 ctx 2048. Measured by benchmarks/mla_decode.py --study (docs/perf.md).
DEFAULT_SPLIT_TOKENS = 2048
REF_TILE = 64   # the reference's online-softmax tile (divides SPLIT_ALIGN)


def split_tokens() -> int:
    """Tokens per split before capping at MAX_SPLITS; a process-wide constant (env override)."""
    text = envs.WIDEEP_MLA_SPLIT_TOKENS
    n = int(text) if text.strip() else DEFAULT_SPLIT_TOKENS
    if n <= 0 or n % SPLIT_ALIGN:
        raise ValueError(f"{SPLIT_TOKENS_ENV} must be a positive multiple of {SPLIT_ALIGN}, got {text!r}")
    return n


def split_plan(seq_lens: torch.Tensor, chunk: int, max_splits: int = MAX_SPLITS) -> tuple[torch.Tensor, torch.Tensor]:
    """(splits [B] >= 1, tokens per split [B], a multiple of SPLIT_ALIGN) from each sequence's own length."""
    lens = seq_lens.to(torch.int64)
    n = ((lens + chunk - 1) // chunk).clamp(1, max_splits)
    per = (lens + n - 1) // n
    per = ((per + SPLIT_ALIGN - 1) // SPLIT_ALIGN * SPLIT_ALIGN).clamp_min(SPLIT_ALIGN)
    return n, per


def paged_mla_decode_torch(
    q_lat: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_lora_rank: int,
    scale: float,
    k_scale: float = 1.0,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """Reference absorbed-MLA decode over the paged latent cache, with the kernel's split-K schedule.

    q_lat [B, H, L] (q_nope already through W_UK), q_pe [B, H, R] -> o_lat [B, H, L] (before W_UV); or
    [B, Q, H, *] for Q query tokens per sequence (speculative decoding: token j of Q sees the context up
    to seq_len - (Q - 1 - j)). Scores against c_kv ‖ k_pe (MQA, one latent head), values are c_kv; an fp8
    cache is dequantized with k_scale. Each split runs an online softmax over REF_TILE-token tiles, the
    splits merge by log-sum-exp in order; every reduction has a fixed shape, so a row's bits do not depend
    on the other rows (batch invariance). Rows past seq_len are masked and zeroed so stale cache contents
    never reach real rows; seq_len 0 rows give zeros.
    """
    squeeze = q_lat.dim() == 3
    if squeeze:
        q_lat, q_pe = q_lat[:, None], q_pe[:, None]
    b, nq, h, lat = q_lat.shape
    dtype = q_lat.dtype
    chunk = chunk or split_tokens()
    dev = q_lat.device
    ctx = gather_context(kv_cache, block_tables)  # [B, S, L+R]
    width = ctx.shape[1]
    tiles = -(-width // REF_TILE)
    if tiles * REF_TILE != width:
        ctx = torch.cat([ctx, ctx.new_zeros(b, tiles * REF_TILE - width, ctx.shape[2])], dim=1)
    ctx = dequantize_latent(ctx, k_scale, dtype)
    lens = seq_lens.to(dev).to(torch.int64)
    pos = torch.arange(tiles * REF_TILE, device=dev)
    ctx = torch.where((pos[None, :] < lens[:, None])[:, :, None], ctx, torch.zeros((), dtype=dtype, device=dev))

    rows = nq * h
    ql = q_lat.reshape(b, rows, lat)
    qp = q_pe.reshape(b, rows, q_pe.shape[-1])
    row_end = lens[:, None] - (nq - 1 - torch.arange(nq, device=dev)).repeat_interleave(h)[None, :]  # [B, rows]
    n_splits, per = split_plan(lens, chunk)
    m = torch.full((b, MAX_SPLITS, rows), float("-inf"), device=dev)
    l_sum = torch.zeros(b, MAX_SPLITS, rows, device=dev)
    acc = torch.zeros(b, MAX_SPLITS, rows, lat, device=dev)
    bidx = torch.arange(b, device=dev)
    for t in range(tiles):
        kv = ctx[:, t * REF_TILE:(t + 1) * REF_TILE]
        c_kv, k_pe = kv[..., :kv_lora_rank], kv[..., kv_lora_rank:]
        s = torch.einsum("brl,btl->brt", ql, c_kv).float() + torch.einsum("bre,bte->brt", qp, k_pe).float()
        s = s * scale
        tok = t * REF_TILE + torch.arange(REF_TILE, device=dev)
        s = s.masked_fill(tok[None, None, :] >= row_end[:, :, None], float("-inf"))
        sp = ((t * REF_TILE) // per).clamp_max(MAX_SPLITS - 1)   # [B]: the split this tile belongs to
        m_old, l_old, a_old = m[bidx, sp], l_sum[bidx, sp], acc[bidx, sp]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        alpha = torch.exp(m_old - m_safe)
        p = torch.exp(s - m_safe[..., None])
        l_sum[bidx, sp] = l_old * alpha + p.sum(-1)
        acc[bidx, sp] = a_old * alpha[..., None] + torch.einsum("brt,btl->brl", p.to(dtype), c_kv).float()
        m[bidx, sp] = m_new

    has = l_sum > 0
    lse = torch.where(has, m + torch.log(torch.where(has, l_sum, torch.ones_like(l_sum))), float("-inf"))
    lse = lse.masked_fill((torch.arange(MAX_SPLITS, device=dev)[None, :] >= n_splits[:, None])[:, :, None],
                          float("-inf"))
    mx = lse.amax(1)
    mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    out = torch.zeros(b, rows, lat, device=dev)
    den = torch.zeros(b, rows, device=dev)
    for sidx in range(MAX_SPLITS):   # in split order: the same additions whatever the batch
        w = torch.exp(lse[:, sidx] - mx)
        part = acc[:, sidx] / torch.where(has[:, sidx], l_sum[:, sidx], torch.ones_like(l_sum[:, sidx]))[..., None]
        out = out + w[..., None] * part
        den = den + w
    out = (out / torch.where(den > 0, den, torch.ones_like(den))[..., None]).to(dtype)
    out = out.view(b, nq, h, lat)
    return out[:, 0] if squeeze else out
