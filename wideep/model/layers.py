"""Small building blocks shared by attention and MLP code: RMSNorm and the SiLU-gated MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import Fp8Rows, make_linear
from .fused_ops import rms_norm, rms_norm_quant, rms_norm_quant_applies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, quant_pad: int | None = None) -> torch.Tensor | Fp8Rows:
        """quant_pad: the normed rows quantized for an FP8 projection (Fp8Rows padded to quant_pad rows, one
        kernel; see quant_applies), not written in x's dtype."""
        if quant_pad is None:
            return rms_norm(x, self.weight, self.eps)
        q, s = rms_norm_quant(x, self.weight, self.eps, pad_rows=quant_pad)
        return Fp8Rows(q, s, x.numel() // x.shape[-1], x.dtype)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor,
                 quant_pad: int | None = None) -> tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass (one kernel on CUDA); quant_pad as in forward."""
        if quant_pad is None:
            return rms_norm(x, self.weight, self.eps, residual)
        q, s, total = rms_norm_quant(x, self.weight, self.eps, residual, pad_rows=quant_pad)
        return Fp8Rows(q, s, x.numel() // x.shape[-1], x.dtype), total

    def quant_applies(self, x: torch.Tensor) -> bool:
        """Whether forward / add_norm can hand x's normed rows over quantized (quant_pad)."""
        return rms_norm_quant_applies(x, self.weight)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layers' MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.gate_proj = make_linear(hidden_size, intermediate_size, False, fp8_block)
        self.up_proj = make_linear(hidden_size, intermediate_size, False, fp8_block)
        self.down_proj = make_linear(intermediate_size, hidden_size, False, fp8_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
