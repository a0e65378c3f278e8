"""all_to_all: a token travels only to the ranks that own one of its experts, once per rank.

Counts go first (one tiny all_to_all), then rows, then routing metadata; the host needs the counts
to size buffers, so this is not CUDA-graph capturable: the prefill / large-EP backend, shaped
like DeepEP's high-throughput mode (dispatch once per destination rank, combine sums on the owner).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wideep.model.dispatch import DispatchResult, MoEDispatcher
from wideep.model.moe_permute import gather_sum, group_by_local_expert, pair_rows
from wideep.parallel import _comm


@dataclass
class _Handle:
    num_tokens: int
    send_token: torch.Tensor      # [S] local token index of each sent row (grouped by destination rank)
    send_counts: list[int]
    recv_counts: list[int]
    num_recv: int
    rows: torch.Tensor            # [N] received row of each dispatched (grouped) row
    pair_rows: torch.Tensor       # [num_recv, K] grouped row of each received (row, slot), -1 when none


class AllToAllDispatcher(MoEDispatcher):
    name = "all_to_all"
    graph_capturable = False

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        t, k = topk_ids.shape
        nl = self.num_local_experts
        dest = torch.div(topk_ids, nl, rounding_mode="floor")                   # [T, K] owner rank
        need = torch.zeros((t, self.ep_size), dtype=torch.bool, device=x.device)
        routed = topk_ids >= 0
        need.scatter_(1, torch.where(routed, dest, torch.zeros_like(dest)), routed)
        pairs = need.t().nonzero()                                                 # (rank, token), rank-major
        send_rank, send_token = pairs[:, 0], pairs[:, 1]
        send_counts_t = need.sum(0).to(torch.int64)
        # routing of each sent row, rewritten to the destination's local expert ids (-1: not for that rank)
        ids = topk_ids[send_token]
        local = ids - (send_rank * nl).unsqueeze(1)
        local = torch.where((ids >= 0) & (local >= 0) & (local < nl), local, torch.full_like(local, -1))
        meta = torch.cat([local.to(torch.float32), topk_weights[send_token].to(torch.float32)], dim=1)  # [S, 2K]
        send_x = x[send_token]

        if self.ep_size > 1:
            recv_counts_t = torch.empty_like(send_counts_t)
            torch.distributed.all_to_all_single(recv_counts_t, send_counts_t, group=self.group)
            counts = torch.stack([send_counts_t, recv_counts_t]).cpu()
            send_counts, recv_counts = counts[0].tolist(), counts[1].tolist()
            recv_x = _comm.all_to_all_rows(send_x, send_counts, recv_counts, self.group)
            meta = _comm.all_to_all_rows(meta, send_counts, recv_counts, self.group)
        else:
            send_counts = recv_counts = [send_token.shape[0]]
            recv_x = send_x
        recv_local = meta[:, :k].to(torch.int64)
        recv_w = meta[:, k:]
        g = group_by_local_expert(recv_local, nl, static=False)
        return DispatchResult(
            x=recv_x[g.rows], tokens_per_expert=g.tokens_per_expert,
            weights=recv_w.reshape(-1)[g.order].to(topk_weights.dtype),
            handle=_Handle(t, send_token, send_counts, recv_counts, recv_x.shape[0], g.rows,
                           pair_rows(g, recv_x.shape[0], k)))

    def combine(self, y: torch.Tensor, result: DispatchResult) -> torch.Tensor:
        h: _Handle = result.handle
        # fp32 sums (per rank, then over ranks), partials travel in the activation dtype (as DeepEP's combine)
        per_row = gather_sum(y, h.pair_rows)
        if self.ep_size > 1:
            back = _comm.all_to_all_rows(per_row, h.recv_counts, h.send_counts, self.group)
        else:
            back = per_row
        out = torch.zeros((h.num_tokens, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, h.send_token, back.float())
        return out.to(y.dtype)
