"""Small building blocks shared by attention and MLP code: RMSNorm and the SiLU-gated MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import make_linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layers' MLP and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int, fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.gate_proj = make_linear(hidden_size, intermediate_size, False, fp8_block)
        self.up_proj = make_linear(hidden_size, intermediate_size, False, fp8_block)
        self.down_proj = make_linear(intermediate_size, hidden_size, False, fp8_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
