"""EP=1 dispatch: every expert is local, so dispatch is a counting sort of (token, expert) pairs by expert
and combine weights and sums each token's K rows back (fp32, slot order). Shape-static and sync-free (graph
capturable), batch-invariant."""
from __future__ import annotations

import torch

from wideep.model.dispatch import DispatchResult, MoEDispatcher, Pending, done
from wideep.model.moe_permute import gather_sum, group_pairs, own_then


class LocalDispatcher(MoEDispatcher):
    name = "local"
    graph_capturable = True

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        g, pairs, weights = group_pairs(topk_ids, self.num_experts, topk_weights)
        return DispatchResult(x=x[g.rows], tokens_per_expert=g.tokens_per_expert, weights=weights, handle=pairs)

    def dispatch_with_own(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        g, pairs, weights = group_pairs(topk_ids, self.num_experts, topk_weights)
        rows = own_then(g.rows, x.shape[0])
        return DispatchResult(x=x[rows], tokens_per_expert=g.tokens_per_expert, weights=weights, handle=pairs)

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return gather_sum(y, result.handle)  # fp32 accumulation across the top-k experts

    def combine_weighted(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return gather_sum(y, result.handle, weights=result.weights)

    # nothing travels: the async forms are the synchronous ones (one row gather, the weight in the combine)
    def dispatch_with_own_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        return done(self.dispatch_with_own(x, topk_ids, topk_weights))

    def combine_weighted_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        return done(self.combine_weighted(y, result))
