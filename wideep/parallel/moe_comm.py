"""The seam between the MoE layer and expert parallelism: dispatch routed tokens to the ranks that own
their experts, run the local experts, combine the results back. The model code only sees this
interface; backends (local, allgather_reducescatter, all_to_all, symmetric-memory ...) plug in behind it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class DispatchResult:
    """Tokens this rank received for its local experts, grouped by local expert (contiguous rows)."""

    x: torch.Tensor                  # [N, hidden] rows for local experts, sorted by local expert
    tokens_per_expert: torch.Tensor  # [num_local_experts] int64 row counts (may be a padded layout's counts)
    weights: torch.Tensor            # [N] routing weight of each row (applied by the expert computation)
    handle: Any                      # backend state needed by combine


class MoEDispatcher:
    """Base class of dispatch/combine backends.

    dispatch(x [T,H], topk_ids [T,K] global physical expert ids, topk_weights [T,K]) -> DispatchResult
    combine(y [N,H] already multiplied by DispatchResult.weights, result) -> [T,H] summed over top-k
    """

    name = "base"
    # True when dispatch/combine use only fixed shapes and no host sync (CUDA-graph capturable).
    graph_capturable = False

    def __init__(self, num_experts: int, ep_rank: int = 0, ep_size: int = 1):
        self.num_experts = num_experts
        self.ep_rank = ep_rank
        self.ep_size = ep_size

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        raise NotImplementedError
