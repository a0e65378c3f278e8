"""The lean MoE permutation: (token, slot) pairs to expert-contiguous rows and back, graph-capturable and
batch-invariant.

- Grouping is a counting sort (one prefix sum over the bucket indicators gives each pair its slot), not a
  global argsort: the result is exactly the stable order by expert, with fixed shapes and no host sync.
- Combine gathers each token's K expert rows, scales each by its routing weight, and sums them in fp32 in
  slot order, one output row per token: no weighted copy of the rows, no fp32 scatter (index_add) over the
  whole hidden, and the sum order never depends on the batch.
On CUDA the combine is a Triton kernel; elsewhere the same sum in torch (its reference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from wideep.model.triton_compat import constexpr, tl, triton


def counting_sort(key: torch.Tensor, num_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key [N] in [0, num_buckets) -> (order [N]: indices in stable bucket order, counts [num_buckets] int64).

    order equals torch.argsort(key, stable=True). The bucket indicator matrix [buckets, N] is scanned as one
    flat array (a single device-wide prefix sum): at (key_i, i) it has counted every pair of a smaller bucket
    plus the pairs of bucket key_i up to i, which is i's sorted position + 1. (A per-column scan of [N, buckets]
    runs one serial thread per bucket: measured 10 ms per call at 65k pairs on an H200.)
    """
    n = key.shape[0]
    buckets = torch.arange(num_buckets, device=key.device)
    onehot = (key[None, :] == buckets[:, None]).to(torch.int32)                    # [B, N]
    counts = onehot.sum(1, dtype=torch.int64)
    flat = torch.cumsum(onehot.view(-1), 0, dtype=torch.int64)
    pos = flat[key * n + torch.arange(n, device=key.device)] - 1
    order = torch.empty(n, dtype=torch.int64, device=key.device)
    order.scatter_(0, pos, torch.arange(n, device=key.device))
    return order, counts


if triton is not None:

    @triton.jit
    def _gather_sum_kernel(y_ptr, idx_ptr, w_ptr, out_ptr, H, stride_y, stride_o, K: constexpr, BLOCK_H: constexpr,
                           HAS_W: constexpr):
        """out[t, h] = sum_k y[idx[t, k], h] (HAS_W: y * w[idx] rounded to y's dtype first) in fp32, slot order;
        idx < 0 contributes nothing."""
        t = tl.program_id(0)
        hb = tl.program_id(1)
        offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for k in tl.static_range(K):
            r = tl.load(idx_ptr + t * K + k)
            rr = tl.maximum(r, 0).to(tl.int64)
            v = tl.load(y_ptr + rr * stride_y + offs, mask=mask, other=0.0)
            if HAS_W:
                w = tl.load(w_ptr + rr).to(y_ptr.dtype.element_ty).to(tl.float32)
                v = (v.to(tl.float32) * w).to(y_ptr.dtype.element_ty)
            acc += tl.where(r >= 0, v.to(tl.float32), 0.0)
        tl.store(out_ptr + t.to(tl.int64) * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def gather_sum(y: torch.Tensor, idx: torch.Tensor, out_dtype: torch.dtype | None = None,
               impl: str = "auto", weights: torch.Tensor | None = None) -> torch.Tensor:
    """y [N, H] rows, idx [T, K] row of each (token, slot) or -1 -> [T, H]: per token, the fp32 sum of its rows
    in slot order, cast to out_dtype (default y's). weights [N]: each row is first scaled by its weight exactly
    as `y * weights.to(y.dtype)[:, None]` rounds it (the routing weight folded into the combine: no weighted
    copy of y). impl: auto (Triton on CUDA), triton, torch."""
    t, k = idx.shape
    out_dtype = out_dtype or y.dtype
    if y.shape[0] == 0:  # nothing received: every slot is empty
        return torch.zeros((t, y.shape[1]), dtype=out_dtype, device=y.device)
    if impl == "triton" or (impl == "auto" and y.is_cuda and triton is not None):
        y = y.contiguous()
        out = torch.empty((t, y.shape[1]), dtype=out_dtype, device=y.device)
        if t:
            bh = 1024
            w = weights.contiguous() if weights is not None else y
            _gather_sum_kernel[(t, triton.cdiv(y.shape[1], bh))](
                y, idx.to(torch.int32).contiguous(), w, out, y.shape[1], y.stride(0), out.stride(0), K=k, BLOCK_H=bh,
                HAS_W=weights is not None, num_warps=4)
        return out
    if impl not in ("auto", "torch"):
        raise ValueError(f"gather_sum: unknown impl {impl!r}")
    if weights is not None:
        y = y * weights.to(y.dtype)[:, None]
    acc = torch.zeros((t, y.shape[1]), dtype=torch.float32, device=y.device)
    zero = torch.zeros((), dtype=torch.float32, device=y.device)
    for j in range(k):
        r = idx[:, j]
        acc += torch.where((r >= 0)[:, None], y[r.clamp(min=0)].float(), zero)
    return acc.to(out_dtype)


def inverse_rows(order: torch.Tensor, valid: torch.Tensor | None, num_pairs: int) -> torch.Tensor:
    """For grouped row j holding flat pair order[j]: inv[pair] = j, or -1 for pairs not grouped (or padding)."""
    inv = torch.full((num_pairs,), -1, dtype=torch.int64, device=order.device)
    rows = torch.arange(order.shape[0], device=order.device)
    if valid is not None:
        rows = torch.where(valid, rows, torch.full_like(rows, -1))
    inv.scatter_(0, order, rows)
    return inv


# ---- (row, slot) pairs -> per-local-expert layout ---------------------------------------------------------

@dataclass
class Grouping:
    order: torch.Tensor              # [N] flat (row*K + k) indices in expert-sorted order
    rows: torch.Tensor               # [N] source row of each grouped row (order // K)
    tokens_per_expert: torch.Tensor  # [num_local] int64 counts of real (non-padding) rows
    valid: torch.Tensor | None       # [N] bool, only for static layouts (padding rows False)


GROUP_KERNEL_MAX_PAIRS = 4096
# pairs per program, pairs per histogram step and warps of the grouping kernel (capped by the bucket count: a
# step holds buckets x pairs flags); the integers do not depend on them; benchmarks/rank.py times alternatives.
# H200, 8 local experts, graph us per call at 1,024 / 2,048 pairs: 32 / 1024 / 4 warps 3.95 / 5.71, 128 / 512 / 4
# 5.41 / 7.05 (the single-program kernel before: 9.3 us per layer at 1,024 in the step's profile)
GROUP_BLOCK, GROUP_SCAN, GROUP_WARPS = 32, 1024, 4
# from this many buckets (local experts + 1) on, each program reads the per-chunk histograms of a first pass
# instead of histogramming all pairs itself: O(chunks x buckets) per program, not O(pairs x buckets). H200, 128
# local experts (EP=2 of 256), 2,048 pairs: one pass 190 us per call
GROUP_HIST_MIN_BUCKETS = 64

if triton is not None:

    @triton.jit
    def _group_hist_kernel(ids_ptr, hist_ptr, N, NUM_LOCAL, NB: constexpr, BLOCK: constexpr):
        """Program p: the bucket histogram of pairs [p*BLOCK, (p+1)*BLOCK) into hist[p] (first pass of
        _group_kernel with HIST)."""
        pid = tl.program_id(0)
        b = tl.arange(0, NB)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        e = tl.load(ids_ptr + i, mask=m, other=-1)
        key = tl.where((e >= 0) & (e < NUM_LOCAL), e, NUM_LOCAL).to(tl.int32)
        hit = ((key[None, :] == b[:, None]) & m[None, :]).to(tl.int32)
        tl.store(hist_ptr + pid * NB + b, tl.sum(hit, axis=1))

    @triton.jit
    def _group_kernel(ids_ptr, w_ptr, order_ptr, rows_ptr, valid_ptr, inv_ptr, wout_ptr, counts_ptr, hist_ptr, N,
                      NUM_LOCAL, NCHUNK, K: constexpr, NB: constexpr, BLOCK: constexpr, SCAN: constexpr,
                      HAS_W: constexpr, HIST: constexpr):
        """Program p: the stable counting sort's slots of pairs [p*BLOCK, (p+1)*BLOCK) by local expert (not-mine
        pairs last). Each program finds per bucket the pairs of all chunks and of the chunks before its own, so no
        program waits for another: by histogramming all N pairs itself, or (HIST) by summing the first pass's
        per-chunk histograms, SCAN chunks a step. slot = start of the pair's bucket + the bucket's pairs before
        the chunk + those before it within the chunk. Writes the grouped layout (order, source row, valid,
        weight) at the slots, each pair's slot (or -1); program 0 the per-expert counts."""
        pid = tl.program_id(0)
        lo = pid * BLOCK
        b = tl.arange(0, NB)
        counts = tl.zeros((NB,), dtype=tl.int32)
        before = tl.zeros((NB,), dtype=tl.int32)
        if HIST:
            for c in range(0, NCHUNK, SCAN):
                j = c + tl.arange(0, SCAN)
                h = tl.load(hist_ptr + j[:, None] * NB + b[None, :], mask=(j < NCHUNK)[:, None], other=0)
                counts += tl.sum(h, axis=0)
                before += tl.sum(h * (j < pid).to(tl.int32)[:, None], axis=0)
        else:
            for c in range(0, N, SCAN):
                i = c + tl.arange(0, SCAN)
                m = i < N
                e = tl.load(ids_ptr + i, mask=m, other=-1)
                key = tl.where((e >= 0) & (e < NUM_LOCAL), e, NUM_LOCAL).to(tl.int32)
                hit = ((key[None, :] == b[:, None]) & m[None, :]).to(tl.int32)
                counts += tl.sum(hit, axis=1)
                before += tl.sum(hit * (i < lo).to(tl.int32)[None, :], axis=1)
        if pid == 0:
            tl.store(counts_ptr + b, counts.to(tl.int64), mask=b < NUM_LOCAL)
        run = tl.cumsum(counts, axis=0) - counts + before      # this chunk's first slot in each bucket
        i = lo + tl.arange(0, BLOCK)
        m = i < N
        e = tl.load(ids_ptr + i, mask=m, other=-1)
        mine = (e >= 0) & (e < NUM_LOCAL)
        key = tl.where(mine, e, NUM_LOCAL).to(tl.int32)
        hit = ((key[None, :] == b[:, None]) & m[None, :]).to(tl.int32)         # [NB, BLOCK]
        at = tl.cumsum(hit, axis=1) - hit + run[:, None]                       # slot if the pair is in bucket b
        slot = tl.sum(hit * at, axis=0)                                        # [BLOCK]
        tl.store(order_ptr + slot, i.to(tl.int64), mask=m)
        tl.store(rows_ptr + slot, (i // K).to(tl.int64), mask=m)
        tl.store(valid_ptr + slot, mine.to(tl.int8), mask=m)
        tl.store(inv_ptr + i, tl.where(mine, slot, -1).to(tl.int64), mask=m)
        if HAS_W:
            w = tl.load(w_ptr + i, mask=m, other=0.0)
            tl.store(wout_ptr + slot, tl.where(mine, w, 0.0), mask=m)


def group_pairs(local_ids: torch.Tensor, num_local: int, weights: torch.Tensor | None = None,
                impl: str = "auto") -> tuple[Grouping, torch.Tensor, torch.Tensor | None]:
    """The static grouping of group_by_local_expert(static=True) with what dispatch needs next: (grouping,
    pair_rows [M, K], each grouped row's weight from weights [M, K] (0 on padding rows) or None). On CUDA, up
    to GROUP_KERNEL_MAX_PAIRS pairs, one kernel instead of ~25 small ones; else the torch reference (the same
    integers)."""
    m, k = local_ids.shape
    # every program histograms all pairs (O(N) each: the kernel serves decode sizes, up to a few thousand
    # pairs; the device-wide scan beyond, the same integers either way). The earlier single-program kernel
    # (one CTA walking the pairs twice) took 9.3 us per layer at 1k pairs on an H200.
    if impl == "triton" or (impl == "auto" and local_ids.is_cuda and triton is not None and m * k <= GROUP_KERNEL_MAX_PAIRS):
        n = m * k
        dev = local_ids.device
        order = torch.empty(n, dtype=torch.int64, device=dev)
        rows = torch.empty(n, dtype=torch.int64, device=dev)
        valid = torch.empty(n, dtype=torch.int8, device=dev)
        inv = torch.empty(n, dtype=torch.int64, device=dev)
        counts = torch.empty(num_local, dtype=torch.int64, device=dev)
        w_in = weights.reshape(-1).contiguous() if weights is not None else order
        w_out = torch.empty(n, dtype=weights.dtype, device=dev) if weights is not None else order
        nb = triton.next_power_of_2(num_local + 1)
        if n:
            block = max(16, min(GROUP_BLOCK, 16384 // nb))
            chunks = triton.cdiv(n, block)
            flat = local_ids.reshape(-1).contiguous()
            hist = nb >= GROUP_HIST_MIN_BUCKETS
            hist_buf = torch.empty((chunks, nb) if hist else (1,), dtype=torch.int32, device=dev)
            if hist:
                _group_hist_kernel[(chunks,)](flat, hist_buf, n, num_local, NB=nb, BLOCK=block, num_warps=GROUP_WARPS)
            _group_kernel[(chunks,)](
                flat, w_in, order, rows, valid, inv, w_out, counts, hist_buf, n, num_local, chunks, K=k,
                NB=nb, BLOCK=block, SCAN=max(16, min(GROUP_SCAN, 16384 // nb)), HAS_W=weights is not None,
                HIST=hist, num_warps=GROUP_WARPS)
        else:
            counts.zero_()
        g = Grouping(order=order, rows=rows, tokens_per_expert=counts, valid=valid.view(torch.bool))
        return g, inv.view(m, k), (w_out if weights is not None else None)
    if impl not in ("auto", "torch"):
        raise ValueError(f"group_pairs: unknown impl {impl!r}")
    g = group_by_local_expert(local_ids, num_local, static=True)
    w = None
    if weights is not None:
        w = weights.reshape(-1)[g.order]
        w = torch.where(g.valid, w, torch.zeros((), dtype=w.dtype, device=w.device))
    return g, pair_rows(g, m, k), w


def own_then(rows: torch.Tensor, num_own: int, first_own: int = 0) -> torch.Tensor:
    """Source rows [first_own, first_own + num_own) (this rank's own tokens, a fused shared expert's input)
    followed by `rows`: one gather builds both."""
    own = torch.arange(first_own, first_own + num_own, dtype=rows.dtype, device=rows.device)
    return torch.cat([own, rows])


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
