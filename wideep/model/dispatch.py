"""The seam between the MoE layer and expert parallelism: dispatch routed tokens to the ranks that own
their experts, run the local experts, combine the results back. The model code only sees this
interface; backends (local, allgather_reducescatter, all_to_all, symmetric-memory ...) plug in behind it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

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


class Pending:
    """A dispatch or combine in flight (dual-batch overlap): `wait()` gives its result. Backends whose
    collectives cannot run in the background return an already-finished one."""

    def __init__(self, finish: Callable[[], Any]):
        self._finish = finish

    def wait(self) -> Any:
        return self._finish()


def done(value: Any) -> Pending:
    return Pending(lambda: value)


class MoEDispatcher:
    """Base class of dispatch/combine backends.

    dispatch(x [T,H], topk_ids [T,K] global physical expert ids, topk_weights [T,K]) -> DispatchResult
    combine(y [N,H] already multiplied by DispatchResult.weights, result) -> [T,H] summed over top-k
    """

    name = "base"
    # True when dispatch/combine use only fixed shapes and no host sync (CUDA-graph capturable).
    graph_capturable = False
    # True while a capturable backend must return fixed-size (padded) DispatchResults (graph steps).
    static_shapes = False

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
        # dual-batch overlap (model/ubatch.py): the micro-batch being run, set before each of its stages:
        # its first row in the step's batch, and its own token bound (None: max_tokens_per_rank)
        self.ubatch_row_offset = 0
        self.ubatch_max_tokens: int | None = None
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

    def set_ubatch(self, row_offset: int = 0, max_tokens: int | None = None, index: int = 0) -> None:
        """Every rank calls this with the same max_tokens before each stage of micro-batch `index`
        (and with the defaults once the split step is over)."""
        self.ubatch_row_offset = row_offset
        self.ubatch_max_tokens = max_tokens

    def set_fp8_payload(self, enabled: bool) -> None:
        """The model says whether its experts take FP8 activations (a native FP8 checkpoint): a backend
        that can move its dispatch payload as FP8 does so only then (vLLM's FP8 dispatch), so a bf16 model's
        tokens are not quantized on the way. No-op here: the others move the activations as they are."""

    @property
    def step_max_tokens(self) -> int | None:
        """The bound on tokens per rank for the forward (or micro-batch) being run."""
        return self.ubatch_max_tokens if self.ubatch_max_tokens is not None else self.max_tokens_per_rank

    def graph_mode(self, size: int, num_real: int | None = None) -> ContextManager[None]:
        """Context of a CUDA-graph capture or replay of `size` tokens per rank (`num_real` of them real);
        EP backends switch to static shapes inside it. Single-rank dispatchers need nothing."""
        return contextlib.nullcontext()

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        raise NotImplementedError

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        raise NotImplementedError

    def dispatch_with_own(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        """dispatch() whose rows start with this rank's own T tokens (x itself), then the dispatched rows: the
        input of a shared expert run as one more group of the grouped MLP. tokens_per_expert, weights and the
        handle describe the dispatched rows only, and combine takes their outputs (rows T onward). Default:
        dispatch_with_own_async, waited for."""
        return self.dispatch_with_own_async(x, topk_ids, topk_weights).wait()

    def combine_weighted(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        """combine() of expert outputs not yet multiplied by result.weights. Default: combine_weighted_async,
        waited for."""
        return self.combine_weighted_async(y, result).wait()

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        """Starts dispatch; the result comes from `.wait()`. Default: synchronous."""
        return done(self.dispatch(x, topk_ids, topk_weights))

    def combine_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        """Starts combine; the [T, H] output comes from `.wait()`. Default: synchronous."""
        return done(self.combine(y, result))

    def dispatch_with_own_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        """Starts dispatch_with_own (the MoE layer's path, split or not). Default: dispatch_async, with the own
        rows put in front at wait(); backends whose dispatch gathers its rows gather both at once."""
        pending = self.dispatch_async(x, topk_ids, topk_weights)

        def finish() -> DispatchResult:
            r = pending.wait()
            r.x = torch.cat([x, r.x])
            return r
        return Pending(finish)

    def combine_weighted_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        """Starts combine_weighted (the MoE layer's path, split or not). Default: the multiply, then
        combine_async; backends whose combine gathers rows fold the weight into that gather."""
        return self.combine_async(y * result.weights.to(y.dtype)[:, None], result)
