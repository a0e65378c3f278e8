"""EP=1 dispatch: every expert is local, so dispatch is a sort of (token, expert) rows by expert and
combine is a weighted scatter-add back to tokens. Shape-static and sync-free (graph capturable)."""
from __future__ import annotations

import torch

from wideep.model.dispatch import DispatchResult, MoEDispatcher


class LocalDispatcher(MoEDispatcher):
    name = "local"
    graph_capturable = True

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        t, k = topk_ids.shape
        flat_ids = topk_ids.reshape(-1).to(torch.long)
        order = torch.argsort(flat_ids, stable=True)
        token_idx = order // k
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        return DispatchResult(
            x=x[token_idx],
            tokens_per_expert=counts,
            weights=topk_weights.reshape(-1)[order],
            handle=(token_idx, t),
        )

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        token_idx, t = result.handle
        out = torch.zeros(t, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, token_idx, y.float())  # fp32 accumulation across the top-k experts
        return out.to(y.dtype)
