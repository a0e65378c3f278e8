"""DeepSeek's FP8 checkpoint format: e4m3 weights in 128x128 blocks, each with an fp32 `weight_scale_inv`
(the multiplier that restores the block: w ≈ fp8 × scale_inv). Dequantized at load; native FP8 GEMMs are later work.
"""
from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def _expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    return scale.repeat_interleave(block[0], 0)[: shape[0]].repeat_interleave(block[1], 1)[:, : shape[1]]


def dequantize_block_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128), dtype=torch.float32
) -> torch.Tensor:
    """weight fp8 [out, in], scale_inv fp32 [ceil(out/bo), ceil(in/bi)] -> dequantized [out, in] in dtype."""
    expect = (-(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1]))
    if tuple(scale_inv.shape) != expect:
        raise ValueError(f"scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(weight.shape)} "
                         f"in {block[0]}x{block[1]} blocks (expected {expect})")
    return (weight.to(torch.float32) * _expand(scale_inv.float(), weight.shape, block)).to(dtype)


def quantize_block_fp8(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (fp8 weight, fp32 scale_inv) with scale_inv = block amax / 448."""
    out_f, in_f = weight.shape
    nb0, nb1 = -(-out_f // block[0]), -(-in_f // block[1])
    w = weight.float()
    padded = torch.zeros(nb0 * block[0], nb1 * block[1], dtype=torch.float32, device=w.device)
    padded[:out_f, :in_f] = w
    blocks = padded.view(nb0, block[0], nb1, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, weight.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
