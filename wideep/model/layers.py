"""Small building blocks shared by attention and MLP code: RMSNorm and the SiLU-gated MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import make_linear
from .fused_ops import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one pass (one kernel on CUDA)."""
        return rms_norm(x, self.weight, self.eps, residual)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layers' MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.gate_proj = make_linear(hidden_size, intermediate_size, False, fp8_block)
        self.up_proj = make_linear(hidden_size, intermediate_size, False, fp8_block)
        self.down_proj = make_linear(intermediate_size, hidden_size, False, fp8_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
