"""Thin collective helpers that behave the same on gloo (CPU) and NCCL (GPU), across torch versions."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None)


def all_gather_rows(x: torch.Tensor, world: int, group: Any = None, async_op: bool = False):
    """[T, ...] on every rank (same T) -> [world*T, ...] in rank order (async_op: (out, work))."""
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = _all_gather_single(out, x.contiguous(), group=group, async_op=async_op)
    return (out, work) if async_op else out


def reduce_scatter_rows(x: torch.Tensor, world: int, group: Any = None, async_op: bool = False):
    """[world*T, ...] summed over ranks, rank r keeps rows r*T:(r+1)*T (async_op: (out, work))."""
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if _reduce_scatter_single is not None:
        work = _reduce_scatter_single(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    else:
        work = dist.reduce_scatter_tensor(out, x.contiguous(), op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    return (out, work) if async_op else out


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int], group: Any = None) -> torch.Tensor:
    """Rank r sends x's rows in blocks of send_counts[i] to rank i and receives recv_counts[i] rows from rank i."""
    out = torch.empty((sum(recv_counts),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=group)
    return out


def all_reduce_max_int(value: int, device: torch.device, group: Any = None) -> int:
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())
