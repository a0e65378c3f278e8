"""Triton kernels of the native FP8 path (GPU): per-token-group activation quantization, SiLU-and-mul fused
with that quantization, and a block-scaled FP8 GEMM that serves both plain projections and the routed
experts' grouped GEMM (rows contiguous per expert), in two kernels: pointer loads (any alignment, in-kernel
activation quantization) and copy-engine (TMA) operands with a persistent tile loop (the decode configs of
R1's big weights: it keeps a multi-stage shared-memory ring where the pointer loads were not pipelined).

Why our own GEMM: cuBLAS's block-scaled FP8 matmul has a ~12-25 us floor at decode sizes (M <= 256), so small
projections never reach bandwidth, and it cannot run the routed experts without the per-expert counts on the
host (decode runs in CUDA graphs). This kernel splits K when there are few output tiles (deterministic:
partials are summed in a fixed order, no atomics), can swap operands so weight rows fill the MMA's M side,
can quantize bf16 activations itself, and finds each grouped tile's expert from the counts in-kernel.
Tile configs are chosen per weight shape (GemmConfig, DECODE_CONFIGS), never per row count, so a row's
result does not depend on its batch.
Scales: activations [M, K/128] stored K-block-major (strides (1, M)), weights [N/bn, K/128] per block row,
with a per-output-column index into the scale rows so stacked weights (gate ‖ up) keep their own blocks.
The torch references live in fp8.py; without CUDA these kernels run under Triton's interpreter (tests).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from wideep import envs

from wideep.model.fp8 import CUBLAS_MIN_ROWS, uniform_scale_cols
from wideep.model.triton_compat import constexpr, tl, triton

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - no triton, or one without host tensor descriptors
    TensorDescriptor = None

FP8_MAX = 448.0
GROUP = 128
# the TMA kernel loads one weight scale per tile and K block where the scale index allows it (SCALAR_BS);
# False: always the per-column vector (the same results; benchmarks/fp8_gemm.py times both)
SCALAR_WEIGHT_SCALES = True


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, GROUP_K: constexpr, GROUPS: constexpr):
        """One program per (row, GROUPS 128-column groups): scale = amax / 448 (fp32), q = x / scale in e4m3."""
        m = tl.program_id(0)
        g0 = tl.program_id(1) * GROUPS
        gi = g0 + tl.arange(0, GROUPS)
        offs = gi[:, None] * GROUP_K + tl.arange(0, GROUP_K)[None, :]          # [GROUPS, GROUP_K]
        mask = offs < K
        x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.abs(x), axis=1)
        scale = tl.maximum(amax, 1e-10) / 448.0
        q = tl.clamp(x / scale[:, None], -448.0, 448.0)
        tl.store(q_ptr + m.to(tl.int64) * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + gi * M + m, scale, mask=gi * GROUP_K < K)

    @triton.jit
    def _silu_mul_quant_kernel(h_ptr, q_ptr, s_ptr, M, N_INTER, stride_hm, stride_qm, GROUP_K: constexpr,
                               GROUPS: constexpr):
        """h [M, 2*N_INTER] (gate ‖ up) -> silu(gate) * up quantized per 128-group, in one pass; one program
        per (row, GROUPS groups)."""
        m = tl.program_id(0)
        gi = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        offs = gi[:, None] * GROUP_K + tl.arange(0, GROUP_K)[None, :]
        mask = offs < N_INTER
        row = h_ptr + m.to(tl.int64) * stride_hm
        gate = tl.load(row + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(row + N_INTER + offs, mask=mask, other=0.0).to(tl.float32)
        # round through the activation dtype like the reference (silu(g) * u computed in bf16 there)
        y = (gate / (1.0 + tl.exp(-gate))).to(h_ptr.dtype.element_ty).to(tl.float32) * up
        y = y.to(h_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.max(tl.abs(y), axis=1)
        scale = tl.maximum(amax, 1e-10) / 448.0
        q = tl.clamp(y / scale[:, None], -448.0, 448.0)
        tl.store(q_ptr + m.to(tl.int64) * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + gi * M + m, scale, mask=gi * GROUP_K < N_INTER)

    @triton.jit
    def _expert_tiles(counts_ptr, E, E_POW2: constexpr, BLOCK_M: constexpr):
        """A grouped GEMM's experts (padded to E_POW2): row counts, BLOCK_M row tiles each, and the running
        sums of both (the tiles and rows of every expert up to and including it)."""
        eo = tl.arange(0, E_POW2)
        cnt = tl.load(counts_ptr + eo, mask=eo < E, other=0).to(tl.int32)
        tiles_e = (cnt + BLOCK_M - 1) // BLOCK_M
        cum = tl.cumsum(tiles_e, axis=0)
        ends = tl.cumsum(cnt, axis=0)
        return eo, cnt, tiles_e, cum, ends

    @triton.jit
    def _expert_tile(eo, cnt, tiles_e, cum, ends, pid_m, BLOCK_M: constexpr):
        """Row tile pid_m of a grouped GEMM: its expert (E_POW2-padded count of experts whose tiles all come
        before; past the last expert when the tile is unused), its first row and its expert's row end."""
        e = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
        sel = eo == e                                           # none when the tile is unused
        first_tile = tl.sum(tl.where(sel, cum - tiles_e, 0), axis=0)
        row_end = tl.sum(tl.where(sel, ends, 0), axis=0)
        row0 = row_end - tl.sum(tl.where(sel, cnt, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
        return e, row0, row_end

    @triton.jit
    def _store_tile(c_ptr, acc, pid_k, stride_cs, stride_cm, offs_m, offs_n, mask_m, mask_n, SWAP: constexpr):
        """A tile's result (acc [BN, BM] when SWAP, else [BM, BN]) into K slice pid_k of C."""
        c = c_ptr + pid_k.to(tl.int64) * stride_cs
        if SWAP:
            c = c + offs_m[None, :].to(tl.int64) * stride_cm + offs_n[:, None]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_m[None, :])
        else:
            c = c + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
            tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit(do_not_specialize=["M", "KB_PER_SPLIT"])
    def _fp8_gemm_kernel(
        a_ptr, as_ptr, b_ptr, bs_ptr, sidx_ptr, c_ptr,
        counts_ptr, E,
        M, N, K, stride_am, stride_be, stride_bn, stride_bse, stride_bsn, stride_cs, stride_cm,
        KB_PER_SPLIT,
        GROUPED: constexpr, QUANT_A: constexpr, SWAP: constexpr, PREFETCH: constexpr, E_POW2: constexpr,
        BLOCK_M: constexpr, BLOCK_N: constexpr, BLOCK_K: constexpr,
    ):
        """C[rows, N] (+)= sum_k (A_q * a_s) (B_q * b_s)^T over this program's K slice.

        Plain: M tile pid_m covers rows pid_m*BLOCK_M.. (< M), expert 0. Grouped (rows contiguous per expert,
        counts[E] rows each, in expert order): tile pid_m is found here from the counts (ceil(count/BLOCK_M)
        tiles per expert, in order; tiles past the last are unused), so no tile map is built beforehand.
        QUANT_A: A is bf16/fp32 and each 128-wide K block of a row is quantized here exactly as act_quant does
        (so no separate quantization kernel and no scale tensor). SWAP: the tile is computed as B·Aᵀ, so the
        weight rows fill the MMA's M dimension and a few tokens its N dimension (small-M decode).
        Each output element's K reduction is the same sequence of per-128-block products in every config
        with the same split, whatever the tile shape or the number of rows.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        if GROUPED:
            eo, cnt, tiles_e, cum, ends = _expert_tiles(counts_ptr, E, E_POW2, BLOCK_M)
            e, row0, row_end = _expert_tile(eo, cnt, tiles_e, cum, ends, pid_m, BLOCK_M)
            e = tl.minimum(e, E - 1)
        else:
            e = 0
            row0 = pid_m * BLOCK_M
            row_end = M
        if row0 < row_end:
            offs_m = row0 + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_m = offs_m < row_end
            mask_n = offs_n < N
            sidx = tl.load(sidx_ptr + offs_n, mask=mask_n, other=0)
            n_kb = tl.cdiv(K, BLOCK_K)
            kb_lo = pid_k * KB_PER_SPLIT
            kb_hi = tl.minimum(kb_lo + KB_PER_SPLIT, n_kb)
            b_base = b_ptr + e.to(tl.int64) * stride_be
            bs_base = bs_ptr + e.to(tl.int64) * stride_bse
            a_rows = a_ptr + offs_m.to(tl.int64) * stride_am
            b_rows = b_base + offs_n.to(tl.int64) * stride_bn
            if SWAP:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # PREFETCH: the next K block's scales are loaded one iteration ahead (their latency would
            # otherwise stall every iteration between the MMA and the scaling)
            # (indices clamped to a valid K block instead of masked: the value past the last one goes unused)
            kb_first = tl.minimum(kb_lo, n_kb - 1)
            b_s_next = tl.load(bs_base + sidx * stride_bsn + kb_first, mask=mask_n, other=0.0)
            if QUANT_A:
                a_s_next = tl.zeros((BLOCK_M,), dtype=tl.float32)
            else:
                a_s_next = tl.load(as_ptr + kb_first * M + offs_m, mask=mask_m, other=0.0)
            for kb in range(kb_lo, kb_hi):
                offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
                mask_k = offs_k < K
                if PREFETCH:
                    b_s = b_s_next
                    kb_next = tl.minimum(kb + 1, n_kb - 1)
                    b_s_next = tl.load(bs_base + sidx * stride_bsn + kb_next, mask=mask_n, other=0.0)
                    if not QUANT_A:
                        a_s = a_s_next
                        a_s_next = tl.load(as_ptr + kb_next * M + offs_m, mask=mask_m, other=0.0)
                else:
                    b_s = tl.load(bs_base + sidx * stride_bsn + kb, mask=mask_n, other=0.0)
                    if not QUANT_A:
                        a_s = tl.load(as_ptr + kb * M + offs_m, mask=mask_m, other=0.0)
                if SWAP:
                    a = tl.load(a_rows[None, :] + offs_k[:, None], mask=mask_m[None, :] & mask_k[:, None],
                                other=0.0)                                               # [BK, BM]
                    if QUANT_A:
                        af = a.to(tl.float32)
                        a_s = tl.maximum(tl.max(tl.abs(af), axis=0), 1e-10) / 448.0
                        a = tl.clamp(af / a_s[None, :], -448.0, 448.0).to(b_ptr.dtype.element_ty)
                    b = tl.load(b_rows[:, None] + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :],
                                other=0.0)                                               # [BN, BK]
                    acc += tl.dot(b, a) * a_s[None, :] * b_s[:, None]
                else:
                    a = tl.load(a_rows[:, None] + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                                other=0.0)                                               # [BM, BK]
                    if QUANT_A:
                        af = a.to(tl.float32)
                        a_s = tl.maximum(tl.max(tl.abs(af), axis=1), 1e-10) / 448.0
                        a = tl.clamp(af / a_s[:, None], -448.0, 448.0).to(b_ptr.dtype.element_ty)
                    b = tl.load(b_rows[None, :] + offs_k[:, None], mask=mask_n[None, :] & mask_k[:, None],
                                other=0.0)                                               # [BK, BN]
                    acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
            _store_tile(c_ptr, acc, pid_k, stride_cs, stride_cm, offs_m, offs_n, mask_m, mask_n, SWAP)

    @triton.jit(do_not_specialize=["M", "KB_PER_SPLIT", "NUM_PROGS"])
    def _fp8_gemm_tma_kernel(
        a_desc, as_ptr, b_desc, bs_ptr, sidx_ptr, c_ptr,
        counts_ptr, E,
        M, N, K, stride_bse, stride_bsn, stride_cs, stride_cm,
        KB_PER_SPLIT, NUM_PROGS,
        GROUPED: constexpr, SWAP: constexpr, PREFETCH: constexpr, E_POW2: constexpr, SPLIT: constexpr,
        BLOCK_M: constexpr, BLOCK_N: constexpr, BLOCK_K: constexpr, SCALAR_BS: constexpr = False,
    ):
        """_fp8_gemm_kernel's product with both operands fed by the copy engine (TMA: host tensor descriptors
        over A [M, K] and the weights as [E*N, K], so no address arithmetic or masks in the K loop) and a tile
        loop: program p computes tiles p, p + NUM_PROGS, ... (NUM_PROGS programs: persistent when that is a
        few per SM, one tile each when it is the largest possible tile count). Tiles are numbered row block fastest,
        then weight block, then K slice; grouped row blocks come from the counts as in _fp8_gemm_kernel, so
        the tile count is known only here. A weight block that runs past N reads the next expert's rows (or
        zeros past the end) into output columns that are never stored; likewise A rows past an expert's end.
        Each output element's K reduction is the same per-128-block sequence as _fp8_gemm_kernel's.
        SCALAR_BS: every tile's columns share one weight scale row (the host knows it from how the scale index
        was made), so one scale per K block is loaded instead of a BLOCK_N vector that had to be moved into
        the accumulator's layout through shared memory (a store, a barrier and 8 loads per K block); the
        products are the same ((dot * a_s) * b_s), so the result is bit-identical to the vector path."""
        pid = tl.program_id(0)
        if GROUPED:
            eo, cnt, tiles_e, cum, ends = _expert_tiles(counts_ptr, E, E_POW2, BLOCK_M)
            m_tiles = tl.sum(tiles_e, axis=0)
        else:
            m_tiles = tl.cdiv(M, BLOCK_M)
        n_tiles = tl.cdiv(N, BLOCK_N)
        total = m_tiles * n_tiles * SPLIT
        n_kb = tl.cdiv(K, BLOCK_K)
        for t in range(pid, total, NUM_PROGS):
            pid_m = t % m_tiles
            rest = t // m_tiles
            pid_n = rest % n_tiles
            pid_k = rest // n_tiles
            if GROUPED:
                e, row0, row_end = _expert_tile(eo, cnt, tiles_e, cum, ends, pid_m, BLOCK_M)
            else:
                e = 0
                row0 = pid_m * BLOCK_M
                row_end = M
            offs_m = row0 + tl.arange(0, BLOCK_M)
            n0 = pid_n * BLOCK_N
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_m = offs_m < row_end
            mask_n = offs_n < N
            if SCALAR_BS:
                bs_rows = bs_ptr + e.to(tl.int64) * stride_bse + tl.load(sidx_ptr + n0) * stride_bsn
                bs_mask = True
            else:
                sidx = tl.load(sidx_ptr + offs_n, mask=mask_n, other=0)
                bs_rows = bs_ptr + e.to(tl.int64) * stride_bse + sidx * stride_bsn
                bs_mask = mask_n
            b_row = e * N + n0
            kb_lo = pid_k * KB_PER_SPLIT
            kb_hi = tl.minimum(kb_lo + KB_PER_SPLIT, n_kb)
            if SWAP:
                acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            kb_first = tl.minimum(kb_lo, n_kb - 1)
            b_s_next = tl.load(bs_rows + kb_first, mask=bs_mask, other=0.0)
            a_s_next = tl.load(as_ptr + kb_first * M + offs_m, mask=mask_m, other=0.0)
            for kb in range(kb_lo, kb_hi):
                if PREFETCH:
                    b_s = b_s_next
                    a_s = a_s_next
                    kb_next = tl.minimum(kb + 1, n_kb - 1)
                    b_s_next = tl.load(bs_rows + kb_next, mask=bs_mask, other=0.0)
                    a_s_next = tl.load(as_ptr + kb_next * M + offs_m, mask=mask_m, other=0.0)
                else:
                    b_s = tl.load(bs_rows + kb, mask=bs_mask, other=0.0)
                    a_s = tl.load(as_ptr + kb * M + offs_m, mask=mask_m, other=0.0)
                a = a_desc.load([row0, kb * BLOCK_K])        # [BM, BK]
                b = b_desc.load([b_row, kb * BLOCK_K])       # [BN, BK]
                if SWAP:
                    if SCALAR_BS:
                        acc += tl.dot(b, a.T) * a_s[None, :] * b_s
                    else:
                        acc += tl.dot(b, a.T) * a_s[None, :] * b_s[:, None]
                else:
                    if SCALAR_BS:
                        acc += tl.dot(a, b.T) * a_s[:, None] * b_s
                    else:
                        acc += tl.dot(a, b.T) * a_s[:, None] * b_s[None, :]
            _store_tile(c_ptr, acc, pid_k, stride_cs, stride_cm, offs_m, offs_n, mask_m, mask_n, SWAP)

    @triton.jit
    def _splitk_sum_kernel(p_ptr, out_ptr, counts_ptr, E, MN, N, SPLIT: constexpr, HAS_VALID: constexpr,
                           E_POW2: constexpr, BLOCK: constexpr):
        """out = sum over the SPLIT partial products (fixed order), cast to out's dtype; with HAS_VALID only
        rows below sum(counts) are written (grouped: rows past the counted ones were never computed)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)   # int64: SPLIT * M * N may pass 2^31
        mask = offs < MN
        if HAS_VALID:
            eo = tl.arange(0, E_POW2)
            valid = tl.sum(tl.load(counts_ptr + eo, mask=eo < E, other=0).to(tl.int32), axis=0)
            mask = mask & (offs // N < valid)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(SPLIT):
            acc += tl.load(p_ptr + (offs + i * MN.to(tl.int64)), mask=mask, other=0.0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


if triton is not None:

    @triton.jit
    def _zero_tail_kernel(y_ptr, counts_ptr, E, M, N, stride_y, E_POW2: constexpr, BLOCK_M: constexpr,
                          BLOCK_N: constexpr):
        """Rows [sum(counts), M) of y set to zero; a program whose rows are all counted only reads the counts."""
        eo = tl.arange(0, E_POW2)
        valid = tl.sum(tl.load(counts_ptr + eo, mask=eo < E, other=0).to(tl.int32), axis=0)
        r0 = tl.program_id(0) * BLOCK_M
        if r0 + BLOCK_M > valid:
            rows = r0 + tl.arange(0, BLOCK_M)
            rm = (rows >= valid) & (rows < M)
            for c in range(0, N, BLOCK_N):
                cols = c + tl.arange(0, BLOCK_N)
                tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :],
                         tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                         mask=rm[:, None] & (cols < N)[None, :])


def zero_tail(y: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y [M, N] with its rows past sum(counts) (padding rows of a grouped layout) zeroed, in place, reading the
    counts on the device: a whole-tensor fill costs a pass over y even when no row is padding (decode at
    uniform routing), this only a launch then."""
    m, n = y.shape
    if m:
        bm = 16
        _zero_tail_kernel[(triton.cdiv(m, bm),)](y, counts, counts.shape[0], m, n, y.stride(0),
                                                 E_POW2=triton.next_power_of_2(counts.shape[0]), BLOCK_M=bm,
                                                 BLOCK_N=min(512, triton.next_power_of_2(n)), num_warps=4)
    return y


def _quantize_rows(kernel, src: torch.Tensor, m: int, width: int, pad_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a per-token-group quantization kernel over m rows of `width` output channels: e4m3 [M', width] and
    fp32 scales [M', ceil(width/128)] with strides (1, M'), M' = m rounded up to pad_rows (cuBLAS's block scaling
    wants 16-byte aligned scale columns); rows past m are left unset."""
    ng = triton.cdiv(width, GROUP)
    mp = -(-m // pad_rows) * pad_rows
    q = torch.empty((mp, width), dtype=torch.float8_e4m3fn, device=src.device)
    s = torch.empty((ng, mp), dtype=torch.float32, device=src.device)
    if m:
        groups = 8 if ng >= 8 else triton.next_power_of_2(ng)
        kernel[(m, triton.cdiv(ng, groups))](src, q, s, mp, width, src.stride(0), q.stride(0), GROUP_K=GROUP,
                                             GROUPS=groups, num_warps=4 if groups >= 4 else 1)
    return q, s.t()


def act_quant(x: torch.Tensor, pad_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (e4m3 [M', K], fp32 scales [M', ceil(K/128)]), as _quantize_rows lays them out."""
    x = x.contiguous()
    return _quantize_rows(_act_quant_kernel, x, x.shape[0], x.shape[1], pad_rows)


def silu_mul_quant(h: torch.Tensor, pad_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """h [M, 2I] -> quantized silu(h[:, :I]) * h[:, I:]: (e4m3 [M', I], fp32 scales [M', ceil(I/128)]), as
    _quantize_rows lays them out."""
    h = h.contiguous()
    return _quantize_rows(_silu_mul_quant_kernel, h, h.shape[0], h.shape[1] // 2, pad_rows)


class GemmConfig(NamedTuple):
    """One tile configuration of the FP8 GEMM. split: K slices summed in a fixed order afterwards; swap:
    compute B·Aᵀ (weights on the MMA's M side); fuse_quant: the GEMM quantizes bf16 activations itself."""
    block_m: int
    block_n: int
    warps: int
    stages: int
    split: int = 1
    swap: bool = False
    fuse_quant: bool = False
    prefetch: bool = False
    tma: bool = False
    persist: int = 0
    maxnreg: int = 0

    @classmethod
    def parse(cls, text: str) -> "GemmConfig":
        """'block_m,block_n,warps,stages[,split[,swap[,fuse_quant[,prefetch[,tma[,persist[,maxnreg]]]]]]]'
        (flags as 0/1; persist: programs per SM, 0 = one program per tile; maxnreg: a register cap per thread
        so more programs fit on an SM, 0 = the compiler's choice)."""
        parts = [int(t) for t in text.split(",")]
        if not 4 <= len(parts) <= 11:
            raise ValueError(f"{CONFIG_ENV}: expected 4 to 11 integers, got {text!r}")
        cfg = cls(*parts[:5], *(bool(p) for p in parts[5:9]), *parts[9:])
        if cfg.split < 1 or any(v & (v - 1) or v < 1 for v in (cfg.block_m, cfg.block_n)):
            raise ValueError(f"{CONFIG_ENV}: block sizes must be powers of two and split >= 1, got {text!r}")
        cfg.check()
        return cfg

    def check(self) -> None:
        """Rejects combinations the kernels do not implement."""
        if self.persist < 0 or self.maxnreg < 0:
            raise ValueError(f"GemmConfig: persist and maxnreg must be >= 0, got {self.persist}, {self.maxnreg}")
        if self.persist and not self.tma:
            raise ValueError("GemmConfig: the persistent tile loop exists in the TMA kernel only (tma=1)")
        if self.tma and self.fuse_quant:
            raise ValueError("GemmConfig: the TMA kernel reads quantized activations (fuse_quant=0)")

    def __str__(self) -> str:
        return ",".join(str(int(v)) for v in self)


CONFIG_ENV = "WIDEEP_FP8_GEMM_CONFIG"   # forces one GemmConfig (GemmConfig.parse) for every FP8 GEMM
LARGE_ROWS = CUBLAS_MIN_ROWS   # rows (plain) or mean rows per expert (grouped) from which the prefill configs apply

# Decode-regime configs for DeepSeek-R1's weights, keyed by ("plain", N, K) / ("grouped", E, N, K), chosen
# from the sweep of benchmarks/fp8_gemm.py on an H200 (docs/perf.md). They depend only on the weight's shape
# (and the number of local experts, a constant of the model), never on the number of rows: a row's K
# reduction is the same whatever batch it shares (batch invariance).
DECODE_CONFIGS: dict[tuple, GemmConfig] = {
    ("plain", 1536, 7168): GemmConfig(64, 128, 4, 3, split=5),        # q_a
    ("plain", 576, 7168): GemmConfig(64, 64, 4, 4, split=7),          # kv_a (q_lora_rank null)
    ("plain", 2112, 7168): GemmConfig(64, 64, 4, 3, split=4, tma=True, persist=3, maxnreg=168),
    # (q_a ‖ kv_a stacked, MLAttention: 12.4 / 14.2 / 23.8 us at 64 / 128 / 256 rows incl. act quant, against
    # 16.2 / 17.6 / 20.8 for the 128 x 64 swapped tile it replaced; 64 rows are a DBO micro-batch at B=128)
    # (served by cuBLAS at decode, fp8.CUBLAS_DECODE; these are the Triton fallbacks)
    ("plain", 24576, 1536): GemmConfig(64, 128, 4, 3, tma=True, persist=3, maxnreg=168),   # q_b
    ("plain", 7168, 16384): GemmConfig(64, 128, 4, 3, split=3, tma=True, persist=3, maxnreg=168),  # o
    ("plain", 4096, 7168): GemmConfig(64, 128, 4, 3, split=2),        # shared / dense-slice w13
    ("plain", 7168, 2048): GemmConfig(128, 64, 4, 4, swap=True),      # shared w2
    ("plain", 36864, 7168): GemmConfig(64, 64, 4, 4, swap=True),      # dense w13
    ("plain", 7168, 18432): GemmConfig(64, 128, 4, 3, split=2),       # dense w2
    # routed experts (+ the shared slot), EP=32: 8 local experts. The TMA kernel, persistent, 64 rows x 128
    # weight rows per tile (one weight scale per tile and K block); w13: 3 programs per SM (the register cap
    # makes room for the third), scales loaded one K block ahead; w2: 4 stages, 2 per SM (picked over 64, 128
    # and 256 rows per group: 41.3 / 53.0 / 93.9 us against 45.3 / 54.8 / 90.2): docs/perf.md
    ("grouped", 8, 4096, 7168): GemmConfig(64, 128, 4, 3, prefetch=True, tma=True, persist=3, maxnreg=168),
    ("grouped", 8, 7168, 2048): GemmConfig(64, 128, 4, 4, tma=True, persist=2),
    # EP=8: 32 local experts x 32 rows (4.0 / 3.7 TB/s against 3.5 / 3.6 for the pointer kernel's 32 x 64)
    ("grouped", 32, 4096, 7168): GemmConfig(64, 128, 4, 4, tma=True, persist=2),
    ("grouped", 32, 7168, 2048): GemmConfig(64, 128, 4, 3, tma=True, persist=3, maxnreg=168),
}


def _forced() -> GemmConfig | None:
    v = envs.WIDEEP_FP8_GEMM_CONFIG
    return GemmConfig.parse(v) if v else None


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(n: int, k: int, experts: int = 0, large: bool = False, device: torch.device | None = None
                ) -> GemmConfig:
    """The config of an [N, K] weight (experts > 0: grouped over that many experts). large: the prefill regime
    (>= LARGE_ROWS rows, eager); otherwise the decode regime, whose choice ignores the row count."""
    forced = _forced()
    if forced:
        return forced
    block_n = 128 if n >= 128 else max(16, triton.next_power_of_2(n))
    if large:
        return GemmConfig(64, block_n, 4, 3)
    key = ("grouped", experts, n, k) if experts else ("plain", n, k)
    if key in DECODE_CONFIGS:
        return DECODE_CONFIGS[key]
    if experts:
        return GemmConfig(64, block_n, 4, 3)
    # split K when the output tiles of one row block cannot fill the GPU; >= 4 K blocks per split
    sms = _num_sms(device) if device is not None else 132
    split = max(1, min(triton.cdiv(2 * sms, triton.cdiv(n, block_n)), triton.cdiv(k, GROUP) // 4))
    return GemmConfig(64, block_n, 4, 3, split=split)


def _reg_cap(cfg: GemmConfig, a: torch.Tensor) -> dict:
    """The launch option capping registers per thread (a compile option: on the GPU only)."""
    return {"maxnreg": cfg.maxnreg} if cfg.maxnreg and a.is_cuda else {}


def _tma_ok(a: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the copy engine can read both operands: e4m3 A and weights, each row-contiguous with 16-byte
    aligned rows and base, the weights' experts back to back (one [E*N, K] view). A config with tma=1 runs
    the pointer kernel with the same tiles otherwise (the choice depends on the shapes only)."""
    k = a.shape[1]
    return (TensorDescriptor is not None and a.dtype == torch.float8_e4m3fn and k % 16 == 0
            and a.stride(1) == 1 and a.stride(0) % 16 == 0 and a.data_ptr() % 16 == 0
            and w.is_contiguous() and w.data_ptr() % 16 == 0)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor | None, w: torch.Tensor, w_s: torch.Tensor, sidx: torch.Tensor,
             out_dtype: torch.dtype, cfg: GemmConfig, counts: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K]: e4m3 with a_s [M, K/128] (strides (1, M)), or bf16/fp32 with a_s None (quantized in the
    GEMM, needs cfg.fuse_quant); w [N, K] or [E, N, K] e4m3; w_s [N/bn, K/128] or [E, ...]; sidx [N] int32
    scale row of each output column. counts (grouped only): rows of each expert, contiguous in expert order
    (rows past their sum are not computed)."""
    m, k = a.shape
    grouped = w.dim() == 3
    n = w.shape[-2]
    quant_a = a_s is None
    if quant_a != (a.dtype != torch.float8_e4m3fn):
        raise ValueError("fp8_gemm: pass e4m3 activations with their scales, or unquantized ones without")
    if quant_a:
        a = a.contiguous()
        a_s = a   # unused by the kernel
    elif a_s.stride(0) != 1 and m > 1:
        a_s = a_s.t().contiguous().t()
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    n_kb = triton.cdiv(k, GROUP)
    bm = cfg.block_m
    if grouped:
        if counts is None or counts.shape != (w.shape[0],):
            raise ValueError("fp8_gemm: a grouped GEMM needs the row count of each of its experts")
        counts = counts.contiguous()
        n_exp = w.shape[0]
        grid_m = triton.cdiv(m, bm) + n_exp   # ceil(count_e / bm) summed over experts never exceeds this
        we, ws_e = w.stride(0), w_s.stride(0)
        w2d, ws2d = w[0], w_s[0]
    else:
        grid_m = triton.cdiv(m, bm)
        counts, n_exp = sidx, 1  # unused
        we = ws_e = 0
        w2d, ws2d = w, w_s
    grid_n = triton.cdiv(n, cfg.block_n)
    kb_per = triton.cdiv(n_kb, min(cfg.split, n_kb))
    split = triton.cdiv(n_kb, kb_per)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=a.device)
    stride_cs = 0 if split == 1 else target.stride(0)
    cfg.check()
    if cfg.tma and _tma_ok(a, w):
        tiles = grid_m * grid_n * split
        progs = min(tiles, cfg.persist * _num_sms(a.device)) if cfg.persist else tiles
        a_desc = TensorDescriptor(a, [m, k], [a.stride(0), 1], [bm, GROUP])
        b_desc = TensorDescriptor(w, [w.numel() // k, k], [k, 1], [cfg.block_n, GROUP])
        _fp8_gemm_tma_kernel[(progs,)](
            a_desc, a_s, b_desc, w_s, sidx, target, counts, n_exp,
            m, n, k, ws_e, ws2d.stride(0), stride_cs, target.stride(-2), kb_per, progs,
            GROUPED=grouped, SWAP=cfg.swap, PREFETCH=cfg.prefetch, E_POW2=triton.next_power_of_2(n_exp),
            SPLIT=split, BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=GROUP,
            SCALAR_BS=SCALAR_WEIGHT_SCALES and cfg.block_n <= uniform_scale_cols(sidx),
            num_warps=cfg.warps, num_stages=cfg.stages if a.is_cuda else 1, **_reg_cap(cfg, a),
        )
    else:
        _fp8_gemm_kernel[(grid_m, grid_n, split)](
            a, a_s, w, w_s, sidx, target, counts, n_exp,
            m, n, k, a.stride(0), we, w2d.stride(0), ws_e, ws2d.stride(0), stride_cs, target.stride(-2),
            kb_per, GROUPED=grouped, QUANT_A=quant_a, SWAP=cfg.swap, PREFETCH=cfg.prefetch,
            E_POW2=triton.next_power_of_2(n_exp), BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=GROUP,
            num_warps=cfg.warps, num_stages=cfg.stages if a.is_cuda else 1, **_reg_cap(cfg, a),
        )
    if split > 1:
        if not out.is_contiguous():
            raise ValueError("fp8_gemm: split-K needs a contiguous output")
        _splitk_sum_kernel[(triton.cdiv(m * n, 1024),)](target, out, counts, n_exp, m * n, n, SPLIT=split,
                                                        HAS_VALID=grouped, E_POW2=triton.next_power_of_2(n_exp),
                                                        BLOCK=1024, num_warps=4)
    return out
