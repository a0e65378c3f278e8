"""Turning (row, k) routing pairs into the contiguous per-local-expert layout grouped GEMMs want."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wideep.model.moe_permute import counting_sort, inverse_rows


@dataclass
class Grouping:
    order: torch.Tensor              # [N] flat (row*K + k) indices in expert-sorted order
    rows: torch.Tensor               # [N] source row of each grouped row (order // K)
    tokens_per_expert: torch.Tensor  # [num_local] int64 counts of real (non-padding) rows
    valid: torch.Tensor | None       # [N] bool, only for static layouts (padding rows False)


def group_by_local_expert(local_ids: torch.Tensor, num_local: int, static: bool) -> Grouping:
    """local_ids [M, K]: local expert index of each pair, or anything outside [0, num_local) for "not mine".

    static=False: exactly the real pairs (N = their count; one host sync for N).
    static=True: all M*K pairs, real ones first (fixed shape, no host sync; CUDA-graph capturable).
    """
    k = local_ids.shape[1] if local_ids.dim() == 2 else 1
    flat = local_ids.reshape(-1)
    mine = (flat >= 0) & (flat < num_local)
    key = torch.where(mine, flat, torch.full_like(flat, num_local))
    # counting sort (not argsort, not bincount: no global sort, no data-sized output, no host sync)
    order, counts = counting_sort(key.to(torch.int64), num_local + 1)
    tokens_per_expert = counts[:num_local]
    if static:
        valid = mine[order]
    else:
        n = int(tokens_per_expert.sum().item())
        order = order[:n]
        valid = None
    return Grouping(order=order, rows=torch.div(order, k, rounding_mode="floor"),
                    tokens_per_expert=tokens_per_expert, valid=valid)


def pair_rows(g: Grouping, num_tokens: int, k: int) -> torch.Tensor:
    """[num_tokens, k]: the grouped row holding each (token, slot) pair, -1 where none (for gather_sum)."""
    return inverse_rows(g.order, g.valid, num_tokens * k).view(num_tokens, k)
