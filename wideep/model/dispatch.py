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
    """Tokens this rank received for its local experts, grouped by local expert (contiguous rows).

    Rows past tokens_per_expert.sum() exist only in static-shape layouts (CUDA graphs): they are
    padding with weight 0; the expert computation may skip them or compute garbage, combine ignores them.
    """

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

    def __init__(self, num_experts: int, ep_rank: int = 0, ep_size: int = 1, group: Any = None, **options: Any):
        if num_experts % ep_size:
            raise ValueError(
                f"num_experts (physical, incl. redundant) = {num_experts} must be divisible by the EP size {ep_size}")
        self.num_experts = num_experts
        self.ep_rank = ep_rank
        self.ep_size = ep_size
        self.group = group            # torch.distributed ProcessGroup of the EP ranks (None = WORLD)
        # Upper bound on tokens per rank for this step, the same on every rank (set by DP lockstep);
        # None: the backend agrees on it itself where it needs one.
        self.max_tokens_per_rank: int | None = None
        self.options = options

    def set_max_tokens_per_rank(self, n: int | None) -> None:
        """Every rank of the group calls this with the same n before a forward (padded batch size)."""
        self.max_tokens_per_rank = n

    @property
    def local_expert_range(self) -> tuple[int, int]:
        """[first, last) physical expert ids owned by this rank: rank r owns r*L .. (r+1)*L-1."""
        n = self.num_local_experts
        return self.ep_rank * n, (self.ep_rank + 1) * n

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        raise NotImplementedError
