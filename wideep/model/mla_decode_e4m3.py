"""Hopper (sm_90) paged MLA decode in Gluon over an fp8 (e4m3) latent cache: the half-page kernel's schedule,
the pages widened to bf16 in shared memory.

WHY: over an fp8 cache the Triton pointer-load tile (`64,64,8,2,sv,f16`, 0.371 ms at B=128 ctx 2048 on an
H200) is 2.2x slower than the bf16 Gluon half-page kernel (0.170 ms): it widens e4m3 in registers, spills,
and does not pipeline its loads. The Gluon kernels read the page straight into the wgmma operand, which an
e4m3 page cannot be here: the scores (bf16 query x cache) need both operands in one type, and an fp8 wgmma
for PV would need the value tile K-major (token-contiguous), which the page (column-contiguous) is not
(Hopper transposes shared-memory operands of 16-bit types only). So this kernel (config
`64,64,4,2,gluon,hp,e4m3`, the fp8 default on Hopper) keeps one bf16 page in shared memory and widens into it:

- a 1-warp producer streams each e4m3 page (64 rows x 576 bytes, 9 bulk copies of 64x64) into two 36 KB
  stages (the shared `_producer` of mla_decode_gluon with an fp8 descriptor);
- consumer warpgroup w widens its 32 rows (tokens 32w..32w+31, all 576 columns) from the fp8 stage into
  the bf16 page and zeroes the rows past the split's end in the same pass (so NaN or stale slots of a
  partial last page cannot reach an MMA), then hands its half of the fp8 stage back (stage "empty", count 2):
  the producer may refill it while the page is still being computed, i.e. it runs up to two pages ahead;
- then the half-page schedule of mla_decode_halfpage on the bf16 page: w scores its 32 tokens (m64n32),
  row maxima / probability tiles / row sums are exchanged through shared memory, and w accumulates value
  columns 256w..256w+255 from both probability tiles. The other warpgroup's PV reads the rows w widened,
  so before widening page i+1 w waits until the other has finished its products of page i ("free" barrier).

Numerics: e4m3 -> bf16 is exact (3 mantissa bits, exponent range inside bf16's), so the scores and the
value products are those of the bf16 kernel over the dequantized-by-k_scale cache; the query stays bf16,
the probabilities are rounded to bf16 as in every other kernel. k_scale contract of mla_decode_triton: the
cache holds value / k_scale, k_scale is folded into the scores' scale and applied once to the output.

Shared memory (`shared_bytes`): query 72 KB + bf16 page 72 KB + two fp8 stages 72 KB + two 4 KB probability
tiles + statistics = 225 of the 227 KiB an sm_90 block may have (a third fp8 stage does not fit).
Split schedule, grid, merge kernel, host launcher (mla_decode_gluon.launch) and output contract are
mla_decode_gluon's (batch invariance, CUDA-graph safety carry over). bf16 queries only.
Measured on an H200 (docs/perf.md): 0.280 ms per layer at B=128 ctx 2048 against 0.371 for the Triton
fp8 tile (`64,64,8,2,sv,f16`), 21-27% less time at every measured shape (B 128/256 x ctx 2k/4k/8k); the
fp32 oracle over NaN-poisoned fp8 pages (k_scale 0.5), 4 query tokens x 16 heads, the cross-layer strided
view, batch invariance and graph replay passed there. Still 1.5-1.7x the bf16 kernel's time over the same
tokens (likely the widening pass: shared-memory traffic with the tensor cores idle; not profiled); what fp8
buys is twice the tokens per GiB.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .mla_decode_gluon import (CONSUMER_REGS, PRODUCER_REGS, _load_query, _producer, _split_range, _store_half,
                               layout_unsupported)

HALF = gl.constexpr(32)   # tokens per warpgroup per page
STAGES = 2                # fp8 page stages (36 KB each); a third does not fit beside the bf16 page
SM90_BLOCK_SMEM = 232448  # bytes of shared memory one block may use on sm_90


def shared_bytes(lat: int, rope: int, page: int, stages: int = STAGES) -> int:
    """Shared memory the kernel allocates (bf16 query tile and page, fp8 stages, the two probability half-tiles,
    row statistics, mbarriers), before the compiler's alignment padding."""
    width, half = lat + rope, page // 2
    return 2 * (64 * width + page * width + 2 * 64 * half) + stages * page * width + 4 * 4 * 64 \
        + 8 * (2 * stages + 6)


def supported(kv_cache: torch.Tensor, q_dtype: torch.dtype, lat: int, rope: int, page: int, align: int) -> str | None:
    """Why this kernel cannot serve the call (None = it can)."""
    if kv_cache.dtype != torch.float8_e4m3fn or q_dtype != torch.bfloat16:
        return f"needs an e4m3 cache and bf16 queries, got {kv_cache.dtype}/{q_dtype}"
    if shared_bytes(lat, rope, page) > SM90_BLOCK_SMEM:
        return f"latent {lat} + rope {rope} at page {page} needs more shared memory than an sm_90 block has"
    return layout_unsupported(kv_cache, lat, rope, page, align)


@gluon.jit
def _widen(kv8_smem, kvb_smem, kb8, n0, end, W: gl.constexpr, NC: gl.constexpr):
    """Tokens n0+32W .. n0+32W+31 of the fp8 stage, all NC chunks, widened into the bf16 page; the rows at or
    past `end` (a partial last page: stale or NaN slots) written as zeros."""
    cvt_layout: gl.constexpr = gl.BlockedLayout([1, 16], [8, 4], [4, 1], [1, 0])   # 16 bytes of fp8 per thread
    toks = n0 + W * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, cvt_layout))
    keep = gl.expand_dims(toks < end, 1)
    for c in range(NC):   # a run-time loop: one chunk's values live at a time beside the 128 accumulator registers
        x = kv8_smem.index(kb8 + c).slice(W * HALF, HALF, dim=0).load(cvt_layout).to(kvb_smem.dtype)
        kvb_smem.index(c).slice(W * HALF, HALF, dim=0).store(gl.where(keep, x, gl.zeros_like(x)))
    fence_async_shared()   # the widened rows are read by wgmma (async proxy), here and in the other warpgroup
    gl.thread_barrier()


@gluon.jit
def _half8(q_smem, kv8_smem, kvb_smem, p_smem, ready, empty, free, xmax, xp, mx_own, mx_oth, sum_own, sum0_s, sum1_s,
           SEQ_LENS, OUT, LSE, FIN, sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
           stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
           W: gl.constexpr, NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
           ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    """Warpgroup W: widens tokens 32W..32W+31, scores them, accumulates value columns 256W..256W+255."""
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 32, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_l: gl.constexpr = gl.SliceLayout(0, o_layout)
    cdt: gl.constexpr = q_smem.dtype
    OTHER: gl.constexpr = 1 - W

    seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)

    rows = pid_h * 64 + gl.arange(0, 64, layout=row_l)
    row_end = seq_len - (NUM_Q - 1 - rows // H)
    m_i = gl.full([64], float("-inf"), gl.float32, layout=row_l)
    l_i = gl.full([64], 0.0, gl.float32, layout=row_l)
    acc0 = gl.zeros([64, 64], gl.float32, layout=o_layout)
    acc1 = gl.zeros([64, 64], gl.float32, layout=o_layout)
    acc2 = gl.zeros([64, 64], gl.float32, layout=o_layout)
    acc3 = gl.zeros([64, 64], gl.float32, layout=o_layout)
    vbase: gl.constexpr = W * 4
    for i in range(n_pages):
        st = i % STAGES
        ph = i & 1
        n0 = start + i * PAGE
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        # the other warpgroup's products of page i-1 read the rows this one is about to overwrite (for i = 0 the
        # fresh barrier's "previous phase" passes at once); it cannot run two pages ahead: it needs this one's P
        mbarrier.wait(free.index(OTHER), ph ^ 1)
        # pz is 0 (n0 >= 0) but not provably so: indexing the single bf16 page by `c ^ pz` keeps its 26 wgmma
        # descriptors computed in the loop, as in the staged kernels; with constant indices the compiler hoists
        # them (~52 registers beside the 128 accumulator ones) and spills (sm_90 AOT: 240 B stack -> 0)
        pz = n0 >> 31
        _widen(kv8_smem, kvb_smem, st * NC, n0, end, W, NC)
        mbarrier.arrive(empty.index(st), count=1)   # this half of the fp8 stage is consumed: the producer may refill
        s = gl.zeros([64, HALF], gl.float32, layout=s_layout)
        for c in gl.static_range(NC):
            s = warpgroup_mma(q_smem.index(c), kvb_smem.index(c ^ pz).slice(W * HALF, HALF, dim=0).permute((1, 0)), s,
                              is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        toks = n0 + W * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, s_layout))
        visible = gl.expand_dims(toks, 0) < gl.expand_dims(row_end, 1)
        s = gl.where(visible, s * sm_scale_log2, float("-inf"))
        mx = gl.max(s, 1)
        mx_own.store(mx)
        gl.thread_barrier()
        mbarrier.arrive(xmax.index(W), count=1)
        mbarrier.wait(xmax.index(OTHER), ph)
        m_new = gl.maximum(m_i, gl.maximum(mx, mx_oth.load(row_l)))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.expand_dims(m_safe, 1))
        pb = p.to(cdt)
        p_smem.index(W).store(pb)
        sum_own.store(gl.sum(p, 1))
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(xp.index(W), count=1)
        pa = gl.convert_layout(pb, p_layout)
        a2 = gl.convert_layout(gl.expand_dims(alpha, 1), o_layout)
        acc0 = warpgroup_mma(pa, kvb_smem.index((vbase + 0) ^ pz).slice(W * HALF, HALF, dim=0), acc0 * a2,
                              is_async=True)
        acc1 = warpgroup_mma(pa, kvb_smem.index((vbase + 1) ^ pz).slice(W * HALF, HALF, dim=0), acc1 * a2,
                              is_async=True)
        acc2 = warpgroup_mma(pa, kvb_smem.index((vbase + 2) ^ pz).slice(W * HALF, HALF, dim=0), acc2 * a2,
                              is_async=True)
        acc3 = warpgroup_mma(pa, kvb_smem.index((vbase + 3) ^ pz).slice(W * HALF, HALF, dim=0), acc3 * a2,
                              is_async=True)
        mbarrier.wait(xp.index(OTHER), ph)   # the other's P, row sum, and (widened before its max) its rows
        sums = sum0_s.load(row_l) + sum1_s.load(row_l)   # one order in both warpgroups
        l_i = l_i * alpha + sums
        m_i = m_new
        po = p_smem.index(OTHER)
        acc0 = warpgroup_mma(po, kvb_smem.index((vbase + 0) ^ pz).slice(OTHER * HALF, HALF, dim=0), acc0, is_async=True)
        acc1 = warpgroup_mma(po, kvb_smem.index((vbase + 1) ^ pz).slice(OTHER * HALF, HALF, dim=0), acc1, is_async=True)
        acc2 = warpgroup_mma(po, kvb_smem.index((vbase + 2) ^ pz).slice(OTHER * HALF, HALF, dim=0), acc2, is_async=True)
        acc3 = warpgroup_mma(po, kvb_smem.index((vbase + 3) ^ pz).slice(OTHER * HALF, HALF, dim=0), acc3, is_async=True)
        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
        gl.thread_barrier()
        mbarrier.arrive(free.index(W), count=1)   # done reading the bf16 page (both halves) of page i

    m_o = gl.convert_layout(m_i, orow_l)
    l_o = gl.convert_layout(l_i, orow_l)
    orows = pid_h * 64 + gl.arange(0, 64, layout=orow_l)
    _store_half(OUT, LSE, FIN, acc0, acc1, acc2, acc3, m_o, l_o, orows, gl.arange(0, 64, layout=ocol_l), out_scale, H, b,
                split, n_splits, stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r, W, NUM_Q, SPLIT)


@gluon.jit
def _half8_1(q_smem, kv8_smem, kvb_smem, p_smem, ready, empty, free, xmax, xp, mx_own, mx_oth, sum_own, sum0_s,
             sum1_s, SEQ_LENS, OUT, LSE, FIN, sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
             stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
             NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
             ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    _half8(q_smem, kv8_smem, kvb_smem, p_smem, ready, empty, free, xmax, xp, mx_own, mx_oth, sum_own, sum0_s, sum1_s,
           SEQ_LENS, OUT, LSE, FIN, sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
           stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
           1, NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)


@gluon.jit
def _mla_decode_e4m3_kernel(
    Q_LAT, Q_PE, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
    sm_scale_log2, out_scale, chunk, max_splits, H, blk_rows,
    stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h, stride_bt_b,
    stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
    L: gl.constexpr, R: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
    ALIGN: gl.constexpr, SPLIT: gl.constexpr,
):
    pid_h = gl.program_id(0)
    b = gl.program_id(1)
    split = gl.program_id(2)
    NC: gl.constexpr = (L + R) // 64
    cdt: gl.constexpr = Q_LAT.dtype.element_ty
    bf_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, 64], cdt)
    q_smem = gl.allocate_shared_memory(cdt, [NC, 64, 64], bf_layout)
    kvb_smem = gl.allocate_shared_memory(cdt, [NC, PAGE, 64], bf_layout)   # the widened page
    kv8_smem = gl.allocate_shared_memory(kv_desc.dtype, [STAGES * NC, PAGE, 64], kv_desc.layout)
    p_smem = gl.allocate_shared_memory(cdt, [2, 64, HALF], gl.NVMMASharedLayout.get_default_for([64, HALF], cdt))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # w done with the bf16 page
    xmax = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # warpgroup w's row max out
    xp = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())     # w's P tile and row sum out
    # one buffer each suffices (as in mla_decode_halfpage): a warpgroup rewrites its row max only after it has
    # seen the other's P of the page before, and its P and row sum only after the other's next row max
    stat_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    mx0_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    mx1_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    sum0_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    sum1_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    for s in gl.static_range(2):
        mbarrier.init(free.index(s), count=1)
        mbarrier.init(xmax.index(s), count=1)
        mbarrier.init(xp.index(s), count=1)

    _load_query(q_smem, Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q,
                stride_qp_h, NC, NUM_Q)

    gl.warp_specialize([
        (_half8, (q_smem, kv8_smem, kvb_smem, p_smem, ready, empty, free, xmax, xp, mx0_s, mx1_s, sum0_s, sum0_s,
                  sum1_s, SEQ_LENS, OUT, LSE, FIN,
                  sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
                  stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                  0, NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
        (_half8_1, (q_smem, kv8_smem, kvb_smem, p_smem, ready, empty, free, xmax, xp, mx1_s, mx0_s, sum1_s, sum0_s,
                    sum1_s, SEQ_LENS, OUT, LSE, FIN,
                    sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
                    stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                    NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
        (_producer, (q_smem, kv8_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
                     sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split, blk_rows, stride_bt_b,
                     stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                     NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

