"""allgather_reducescatter: every rank sees every token, computes its own experts, sums go home by reduce-scatter.

Fixed shapes (each rank pads to the group's max tokens per rank), no host sync in static mode, so it
can be captured in a CUDA graph: the decode backend for small EP (vLLM's "naive"/allgather path).
Traffic is EP× the tokens regardless of routing, which is why all_to_all wins for prefill/large EP.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wideep.model.dispatch import DispatchResult, MoEDispatcher, Pending, done
from wideep.model.moe_permute import gather_sum, group_by_local_expert, group_pairs, own_then, pair_rows
from wideep.parallel import _comm


@dataclass
class _Handle:
    num_tokens: int          # this rank's real T
    padded_tokens: int       # T padded to the group's max
    rows: torch.Tensor       # [N] row of the gathered batch each dispatched row came from
    valid: torch.Tensor | None
    pair_rows: torch.Tensor  # [T_gathered, K] grouped row of each (token, slot), -1 when not this rank's


def pack_rows(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One byte row per token (x's bytes, int32 expert ids, fp32 weights): the dispatch is one collective,
    not three (each NCCL call costs its fixed latency). Exact: ids fit int32, weights are cast back. Checked
    here, before the collective: the int32/fp32 columns need x's row bytes to be a multiple of 4."""
    t, hb = x.shape[0], x.shape[1] * x.element_size()
    if hb % 4:
        raise ValueError(f"allgather_reducescatter packs rows of 4-byte multiples; hidden bytes {hb}")
    return torch.cat([x.contiguous().view(torch.uint8).view(t, -1), ids.to(torch.int32).view(torch.uint8).view(t, -1),
                      weights.float().view(torch.uint8).view(t, -1)], dim=1)


def unpack_rows(packed: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
    """Views of gathered packed rows as (x, ids, weights) with the dtypes of the local originals."""
    hb, k = x.shape[1] * x.element_size(), ids.shape[1]
    return (packed[:, :hb].view(x.dtype), packed[:, hb:hb + 4 * k].view(torch.int32).to(ids.dtype),
            packed[:, hb + 4 * k:].view(torch.float32).to(weights.dtype))


class AllGatherReduceScatterDispatcher(MoEDispatcher):
    name = "allgather_reducescatter"
    graph_capturable = True

    def __init__(self, num_experts: int, ep_rank: int = 0, ep_size: int = 1, group=None,
                 static_shapes: bool = False, **options):
        super().__init__(num_experts, ep_rank, ep_size, group, **options)
        # static_shapes: fixed-size DispatchResult (padding rows past tokens_per_expert.sum()); set by
        # the model runner while capturing/replaying CUDA graphs.
        self.static_shapes = static_shapes

    def _padded_tokens(self, t: int, device: torch.device) -> int:
        if self.ep_size == 1:
            return t
        bound = self.step_max_tokens
        if bound is not None:
            if t > bound:
                raise ValueError(f"{t} tokens on rank {self.ep_rank} exceed max_tokens_per_rank="
                                 f"{bound} agreed for this step")
            return bound
        return _comm.all_reduce_max_int(t, device, self.group)

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        return self.dispatch_async(x, topk_ids, topk_weights).wait()

    def dispatch_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       own_first: bool = False) -> Pending:
        """own_first: this rank's own tokens head the rows (dispatch_with_own), gathered with the rest."""
        t = x.shape[0]
        tp = self._padded_tokens(t, x.device)
        pad = tp - t
        works = []
        if self.ep_size > 1:
            if pad:
                x = F.pad(x, (0, 0, 0, pad))
                topk_ids = F.pad(topk_ids, (0, 0, 0, pad), value=-1)
                topk_weights = F.pad(topk_weights, (0, 0, 0, pad))
            packed, work = _comm.all_gather_rows(pack_rows(x, topk_ids, topk_weights), self.ep_size, self.group,
                                                 async_op=True)
            works = [work]
        first, _ = self.local_expert_range
        static = self.static_shapes

        def finish() -> DispatchResult:
            nonlocal x, topk_ids, topk_weights
            for w in works:
                w.wait()
            if works:
                x, topk_ids, topk_weights = unpack_rows(packed, x, topk_ids, topk_weights)
            if static:   # one kernel on CUDA (graph steps)
                g, pairs, weights = group_pairs(topk_ids - first, self.num_local_experts, topk_weights)
            else:
                g = group_by_local_expert(topk_ids - first, self.num_local_experts, static)
                weights = topk_weights.reshape(-1)[g.order]
                pairs = pair_rows(g, topk_ids.shape[0], topk_ids.shape[1])
            rows = own_then(g.rows, t, self.ep_rank * tp if works else 0) if own_first else g.rows
            return DispatchResult(x=x[rows], tokens_per_expert=g.tokens_per_expert, weights=weights,
                                  handle=_Handle(t, tp, g.rows, g.valid, pairs))
        return Pending(finish)

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        return self.combine_async(y, result).wait()

    def combine_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        return self._combine(y, result, None)

    def dispatch_with_own_async(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Pending:
        return self.dispatch_async(x, topk_ids, topk_weights, own_first=True)

    def combine_weighted_async(self, y: torch.Tensor, result: DispatchResult) -> Pending:
        return self._combine(y, result, result.weights)

    def _combine(self, y: torch.Tensor, result: DispatchResult, weights: torch.Tensor | None) -> Pending:
        h: _Handle = result.handle
        # fp32 sums over the top-k experts and over ranks, one rounding at the end: the numerics of
        # EP=1 (LocalDispatcher), so EP=N greedy tokens match EP=1 in bf16 too (2x reduce-scatter bytes);
        # weights (unweighted y): each row scaled inside the gather, rounded as y * w would be
        out = gather_sum(y, h.pair_rows, torch.float32, weights=weights)
        dtype = y.dtype
        if self.ep_size == 1:
            return done(out[: h.num_tokens].to(dtype))
        out, work = _comm.reduce_scatter_rows(out, self.ep_size, self.group, async_op=True)

        def finish() -> torch.Tensor:
            work.wait()
            return out[: h.num_tokens].to(dtype)
        return Pending(finish)
