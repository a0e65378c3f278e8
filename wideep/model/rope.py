"""Rotary embedding as DeepSeek-V3 uses it: YaRN-scaled frequencies, interleaved (GPT-J) pairs, and the
softmax scale that carries YaRN's mscale squared.

Numerics follow transformers' DeepseekV3 exactly (angles computed in float32 from the positions each call,
so the module is shape-static and CUDA-graph friendly).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(dim: int, base: float, rs: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = rs.get("factor")
    orig = rs["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / orig
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp  # 1: keep the original frequency (high-frequency dims)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_weight) + inv_extra * extrapolation_weight
    return inv_freq, float(attention_factor)


def softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (0.135234 for DeepSeek-R1)."""
    scale = config.qk_head_dim ** -0.5
    rs = config.rope_scaling
    if rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        mscale_all_dim = rs.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(rs["factor"], mscale_all_dim)
            scale = scale * m * m
    return scale


class RotaryEmbedding(nn.Module):
    """Applies DeepSeek's interleaved rope to the last dim of q_pe / k_pe.

    Output layout is de-interleaved ([rotated evens | rotated odds]); q and k get the same permutation,
    so their dot products equal the interleaved form's. The latent cache stores k_pe in this layout.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim = config.qk_rope_head_dim
        rs = config.rope_scaling
        kind = (rs or {}).get("rope_type", (rs or {}).get("type", "default"))
        if kind in (None, "default"):
            inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_scaling = 1.0
        elif kind == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(dim, config.rope_theta, rs, config.max_position_embeddings)
        else:
            raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (field 'rope_scaling')")
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, ..., dim]; cos/sin [T, dim/2]."""
        shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
        cos, sin = cos.view(shape), sin.view(shape)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
