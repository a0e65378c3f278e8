"""Dual-batch overlap (vLLM's --enable-dbo): one step's forward as two interleaved micro-batches.

The batch is cut at a sequence boundary into micro-batches A and B. The embedding and the dense prefix
layers (no EP collectives there) run once on the whole batch (forward_prefix); then each micro-batch runs
the remaining layers as a generator that yields while its MoE dispatch or combine is in flight; the driver
alternates them, so A's all-to-all overlaps B's attention/experts and the other way round. Every rank
of the EP group must split the same steps (the same number of collectives in the same order): the
decision depends only on the group's agreed step shape (`should_split`), and a rank whose batch cannot
be cut (one sequence, or a dummy token) runs B with zero tokens.

Each micro-batch runs the model's own forward_stages: the pieces of the unsplit forward (residual carried
into the next fused add + norm, the shared expert as slot 0 of the grouped MLP, the routing weight folded
into the combine), so results equal the unsplit forward row for row: attention is per sequence, experts
per token. Overlap comes from the dispatcher's async dispatch/combine (dispatch_with_own_async and
combine_weighted_async, or their plain forms without a fused shared expert): allgather_reducescatter
issues NCCL (or gloo) async collectives, symm_mem_ll writes peers from a side stream; a backend without
them (all_to_all, whose host-side count exchange blocks) runs its collectives in place: same result, no
overlap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttentionMetadata


@dataclass(frozen=True)
class DBOConfig:
    enabled: bool = False
    decode_token_threshold: int = 32
    prefill_token_threshold: int = 512

    @classmethod
    def from_args(cls, args) -> "DBOConfig":
        return cls(bool(args.enable_dbo), int(args.dbo_decode_token_threshold), int(args.dbo_prefill_token_threshold))

    def should_split(self, tokens_per_rank: int, decode_only: bool) -> bool:
        """The group's decision from its agreed shape (max tokens per rank, no rank has prefill tokens)."""
        if not self.enabled:
            return False
        return tokens_per_rank > (self.decode_token_threshold if decode_only else self.prefill_token_threshold)

    @staticmethod
    def ubatch_max_tokens(tokens_per_rank: int, decode_only: bool) -> int | None:
        """Bound on one micro-batch's tokens per rank: half (rounded up) for decode-only steps, where A
        takes ceil(n/2) one-token sequences; None (the step's bound) when prefill chunks may not halve."""
        return -(-tokens_per_rank // 2) if decode_only else None


def split_point(attn: AttentionMetadata) -> int:
    """Number of sequences in micro-batch A: decodes split in half (A gets the extra one); with
    prefills, the sequence boundary closest to half the tokens."""
    n = attn.num_seqs
    if n <= 1:
        return n
    if attn.num_decodes == n:
        return -(-n // 2)
    total = sum(attn.query_lens)
    best, acc, best_gap = 1, 0, None
    for i, q in enumerate(attn.query_lens[:-1]):
        acc += q
        gap = abs(2 * acc - total)
        if best_gap is None or gap < best_gap:
            best, best_gap = i + 1, gap
    return best


def slice_metadata(attn: AttentionMetadata, s0: int, s1: int, t0: int, t1: int) -> AttentionMetadata:
    """Sequences [s0, s1) whose tokens are rows [t0, t1) of the batch (host ints only: graph capturable)."""
    return AttentionMetadata(
        slot_mapping=attn.slot_mapping[t0:t1],
        query_start_loc=attn.query_start_loc[s0:s1 + 1] - t0,
        seq_lens=attn.seq_lens[s0:s1],
        block_tables=attn.block_tables[s0:s1],
        num_decodes=max(0, min(attn.num_decodes, s1) - s0),
        query_lens=list(attn.query_lens[s0:s1]),
        seq_lens_cpu=list(attn.seq_lens_cpu[s0:s1]))


def forward_dual_batch(model, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                       kv_caches: list[torch.Tensor], ubatch_max_tokens: int | None = None) -> torch.Tensor:
    """model.forward over two interleaved micro-batches; same result. `ubatch_max_tokens`: the bound on
    each micro-batch's tokens per rank that every rank passes (None: the step's own bound)."""
    split = split_point(attn)
    t_split = sum(attn.query_lens[:split]) if attn.query_lens else split
    t_total = input_ids.shape[0]
    n = attn.num_seqs
    parts = [(0, split, 0, t_split), (split, n, t_split, t_total)]
    h, residual, cos, sin = model.forward_prefix(input_ids, positions, attn, kv_caches)
    gens = [model.forward_stages(h[t0:t1], None if residual is None else residual[t0:t1], cos[t0:t1], sin[t0:t1],
                                 slice_metadata(attn, s0, s1, t0, t1), kv_caches)
            for s0, s1, t0, t1 in parts]
    dispatcher = model.dispatcher
    results: list[torch.Tensor | None] = [None, None]
    live = [0, 1]
    try:
        while live:
            for i in list(live):
                dispatcher.set_ubatch(parts[i][2], ubatch_max_tokens, i)
                try:
                    next(gens[i])
                except StopIteration as stop:
                    results[i] = stop.value
                    live.remove(i)
    finally:
        dispatcher.set_ubatch()
    return torch.cat(results, dim=0)
