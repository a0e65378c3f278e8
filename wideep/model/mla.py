"""Multi-head Latent Attention (DeepSeek-V2/V3).

Every token's K/V is a compressed latent: c_kv (kv_lora_rank) and one shared rope'd k_pe. Only those go
into the paged cache. Prefill up-projects the latents through kv_b_proj into per-head K/V (MHA form,
cheap when many queries share the context); decode absorbs kv_b_proj into the query and the output
(W_UK, W_UV) so it attends over the latents directly (576 values per token for R1, MQA-shaped).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import AttentionMetadata, dequantize_latent, paged_mla_decode
from .config import ModelConfig
from .fp8 import Fp8Linear, Fp8Rows, make_linear
from .fused_ops import mla_prefill_kv, rope_cache_write
from .layers import RMSNorm
from .rope import softmax_scale


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, fp8_block: tuple[int, int] | None = None):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.q_lora_rank = c.q_lora_rank
        self.kv_lora_rank = c.kv_lora_rank
        self.nope = c.qk_nope_head_dim
        self.rope_dim = c.qk_rope_head_dim
        self.v_dim = c.v_head_dim
        self.qk_head_dim = c.qk_head_dim
        kv_a = c.kv_lora_rank + c.qk_rope_head_dim
        if c.q_lora_rank is None:  # DeepSeek-V2-Lite style: one projection
            self.q_proj = make_linear(c.hidden_size, self.num_heads * self.qk_head_dim, False, fp8_block)
            self.kv_a_proj_with_mqa = make_linear(c.hidden_size, kv_a, c.attention_bias, fp8_block)
        else:
            # q_a_proj ‖ kv_a_proj_with_mqa stacked into one weight (the loader concatenates the checkpoint's
            # two): both read the same x, so one activation quantization and one GEMM instead of two each
            self.fused_qkv_a_proj = make_linear(c.hidden_size, c.q_lora_rank + kv_a, c.attention_bias, fp8_block,
                                                parts=(c.q_lora_rank, kv_a))
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = make_linear(c.q_lora_rank, self.num_heads * self.qk_head_dim, False, fp8_block)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = make_linear(c.kv_lora_rank, self.num_heads * (self.nope + self.v_dim), False, fp8_block)
        self.o_proj = make_linear(self.num_heads * self.v_dim, c.hidden_size, c.attention_bias, fp8_block)
        self.scale = softmax_scale(c)
        self._kv_b_key: tuple | None = None
        self._kv_b_cache: torch.Tensor | None = None
        # Per-tensor scale of an fp8 latent cache (stored = value / k_scale). DeepSeek checkpoints carry
        # none, so 1.0, as vLLM does; unused by a model-dtype cache.
        self.k_scale = 1.0

    # W_UK [H, nope, L] and W_UV [H, v, L]: views of kv_b_proj, so weight reloads (EPLB, P/D) stay consistent.
    def _w_uk_uv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        w = self._kv_b_weight(dtype).view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope], w[:, self.nope :]

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b_proj's weight for the absorbed decode bmm's; an FP8 kv_b is dequantized once and cached
        (16 MB fp8 -> 32 MB bf16 per R1 layer), refreshed if the weight tensor is replaced or written."""
        proj = self.kv_b_proj
        if not isinstance(proj, Fp8Linear):
            return proj.weight
        key = (proj.weight.data_ptr(), proj.weight._version, proj.weight_scale_inv._version, dtype)
        if self._kv_b_key != key:
            self._kv_b_cache = proj.dequantized(dtype)
            self._kv_b_key = key
        return self._kv_b_cache

    def input_quant_pad(self, x: torch.Tensor) -> int | None:
        """Where the normed input x may come quantized (Fp8Rows padded to this many rows; None: it may not): an
        FP8 q_a ‖ kv_a projection that quantizes its input in a separate kernel, which the input norm then does."""
        proj = self.fused_qkv_a_proj if self.q_lora_rank is not None else None
        return proj.quant_pad(x) if isinstance(proj, Fp8Linear) else None

    def _q_b(self, q_a: torch.Tensor) -> torch.Tensor:
        """q_b_proj(q_a_layernorm(q_a)); an FP8 q_b that quantizes its input apart takes it from the norm."""
        norm, proj = self.q_a_layernorm, self.q_b_proj
        pad = proj.quant_pad(q_a) if isinstance(proj, Fp8Linear) and norm.quant_applies(q_a) else None
        return proj(norm(q_a, quant_pad=pad))

    def forward(
        self,
        x: torch.Tensor | Fp8Rows,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x: the normed hidden rows, or those rows quantized where input_quant_pad allowed it."""
        t = x.rows if isinstance(x, Fp8Rows) else x.shape[0]
        if self.q_lora_rank is None:
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
        else:
            q_a, kv = self.fused_qkv_a_proj.forward_parts(x)
            q = self._q_b(q_a)
        q = q.view(t, self.num_heads, self.qk_head_dim)
        q_nope = q[..., : self.nope]
        nd = attn.num_decodes
        decode_only = nd == t and attn.num_seqs == nd
        # decode's query buffer: [q_lat ‖ q_pe] per head, head-major (see _decode); the rope lands in it directly
        q_buf = q_nope.new_empty(self.num_heads, t, self.kv_lora_rank + self.rope_dim) if decode_only else None
        # q_pe roped; the new tokens' latents (c_kv normed ‖ k_pe roped) written into the cache: one kernel
        q_pe = rope_cache_write(q, kv, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, cos, sin, kv_cache,
                                attn.slot_mapping, self.k_scale,
                                q_pe_out=None if q_buf is None else q_buf[..., self.kv_lora_rank:].transpose(0, 1))

        if decode_only:   # no copy into a shared output
            return self.o_proj(self._decode(q_nope, q_pe, attn, kv_cache, q_buf=q_buf)
                               .reshape(t, self.num_heads * self.v_dim))
        out = q.new_empty(t, self.num_heads, self.v_dim)
        if nd > 0:
            self._decode(q_nope[:nd], q_pe[:nd], attn, kv_cache, out[:nd])
        if attn.num_seqs > nd:
            self._prefill(q, attn, kv_cache, out)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))

    def _decode(self, q_nope, q_pe, attn: AttentionMetadata, kv_cache, out: torch.Tensor | None = None,
                q_buf: torch.Tensor | None = None) -> torch.Tensor:
        """Absorbed decode into out [B, H, v] (made when None). The per-head bmm's read q_nope and write the
        W_UV output through strides (head-major operands as transposed views): no copy on either side of
        the MLA kernel. The query is [q_lat ‖ q_pe] per head in one head-major buffer [H, B, L + R] (q_buf,
        whose rope columns already hold q_pe; else made here and q_pe copied in): the bmm writes the latent
        columns in place, and a kernel that reads one 576-wide query row per head (FlashMLA) takes it as is."""
        nd = attn.num_decodes
        w_uk, w_uv = self._w_uk_uv(q_nope.dtype)
        lat = self.kv_lora_rank
        if q_buf is None:
            q_buf = q_nope.new_empty(self.num_heads, nd, lat + self.rope_dim)
            q_buf[..., lat:].copy_(q_pe.transpose(0, 1))
        torch.bmm(q_nope.transpose(0, 1), w_uk, out=q_buf[..., :lat])
        q_all = q_buf.transpose(0, 1)                                           # [B, H, L + R] (head-major)
        o_lat = paged_mla_decode(
            q_all[..., :lat], q_all[..., lat:], kv_cache, attn.block_tables[:nd], attn.seq_lens[:nd],
            self.kv_lora_rank, self.scale, self.k_scale, attn.plans,
        )
        if out is None:
            out = o_lat.new_empty(o_lat.shape[0], self.num_heads, self.v_dim)
        torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out

    def _prefill(self, q, attn: AttentionMetadata, kv_cache, out) -> None:
        """Per sequence: up-project its whole cached context, causal attention with the prefix offset.
        q [T, H, nope + rope] holds the roped q_pe already."""
        block_size = kv_cache.shape[1]
        starts = [0]
        for n in attn.query_lens:
            starts.append(starts[-1] + n)
        for i in range(attn.num_decodes, attn.num_seqs):
            q_len, ctx_len = attn.query_lens[i], attn.seq_lens_cpu[i]
            if q_len == 0:
                continue
            lo, hi = starts[i], starts[i] + q_len
            n_blocks = (ctx_len + block_size - 1) // block_size
            bt = attn.block_tables[i, :n_blocks].to(torch.long)
            # gathered per block: a cross-layer cache's layer is a strided view without a flat one
            rows = kv_cache[bt].reshape(n_blocks * block_size, kv_cache.shape[-1])[:ctx_len]
            latent = dequantize_latent(rows, self.k_scale, q.dtype)
            c_kv, k_pe = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            kv = self.kv_b_proj(c_kv).view(ctx_len, self.num_heads, self.nope + self.v_dim)
            # k = [k_nope ‖ k_pe] per head; v zero-padded to q/k's head dim: fused SDPA kernels need equal
            # q/k/v head dims (192 vs 128 here); without them PyTorch falls back to the math kernel, which
            # materializes H x q_len x ctx fp32 scores (32 GB at 8k)
            k, v = mla_prefill_kv(kv, k_pe, self.v_dim)
            qs = q[lo:hi]
            # query j sits at position ctx_len - q_len + j and sees keys 0..that position
            if q_len == ctx_len:
                mask, causal = None, True
            else:
                qpos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= qpos[:, None]
                causal = False
            # [1, H, L, D]: the fused kernels (flash / memory-efficient) take 4-D inputs only.
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                attn_mask=mask, is_causal=causal, scale=self.scale,
            )[0]
            out[lo:hi] = o.transpose(0, 1)[..., : self.v_dim]
