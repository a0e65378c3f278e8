"""Hopper (sm_90) paged MLA decode in Gluon, "seesaw" schedule: each consumer warpgroup scores its own page.

WHY: the warp-specialized kernel in mla_decode_gluon has both consumer warpgroups compute the same 64x64
score tile, so the tensor cores issue 1.53x the needed work (QK^T is 53% of the FLOPs). Here the pages of
a split go in pairs: warpgroup 0 scores the even page (stage 0), warpgroup 1 the odd one (stage 1), at the
same time; the probability tiles and row statistics are exchanged through shared memory, and each
warpgroup accumulates its own 256 of the 512 value columns from BOTH pages:

- WG0: S0 = Q K0^T, m0 = max(m, rowmax S0), P0 = exp2(S0 - m0); publishes P0 (bf16, written over the
  page's rope columns, which nobody reads after the scores), m0 and rowsum(P0); issues O_L = O_L * alpha
  + P0 V0_L; then waits for WG1's P1 and m1, rescales O_L by exp2(m0 - m1) and adds P1 V1_L (P1 straight
  from shared memory as the wgmma A operand).
- WG1: S1 = Q K1^T (in parallel with WG0's scores); waits for m0, m1 = max(m0, rowmax S1),
  P1 = exp2(S1 - m1); publishes P1, m1, rowsum(P1); O_R = O_R * alpha * beta + (P0 * beta) V0_R + P1 V1_R.
  Both warpgroups update the row sum l with the same operations on the same values, so their halves are
  normalized by identical statistics (WG0 writes the split's log-sum-exp).

Shared memory: query 72 KB + two 72 KB page stages (the P tiles live in the stages' rope slots) + 1 KB of
row statistics. The producer warp, the split schedule, masking (rows past seq_len are -inf in the scores
and zeroed in all value chunks by the page's owner before it publishes), merge kernel and output contract
are mla_decode_gluon's, so batch invariance and CUDA-graph safety carry over. bf16 caches only.
Measured on an H200 (docs/perf.md): 0.215 ms per layer at B=128 ctx 2048, slower than mla_decode_gluon
(0.181) and the half-page kernel (0.171): both stages are in use at once, so a pair's pages are refilled
only after the pair's products (no prefetch), and WG1's softmax waits for WG0's. Opt-in ("ss").
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .mla_decode_gluon import CONSUMER_REGS, MAXNREG, NUM_WARPS, PRODUCER_REGS, _producer, make_descriptor

STAGES = 2   # one page per warpgroup in flight; a third 72 KB stage does not fit beside the query tile


@gluon.jit
def _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE: gl.constexpr, ALIGN: gl.constexpr):
    seq_len = gl.load(SEQ_LENS + b)
    n_splits = gl.minimum(gl.maximum((seq_len + chunk - 1) // chunk, 1), max_splits)
    per = (seq_len + n_splits - 1) // n_splits
    per = gl.maximum((per + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    start = split * per
    end = gl.minimum(seq_len, start + per)
    n_pages = gl.maximum(end - start + PAGE - 1, 0) // PAGE
    return seq_len, n_splits, start, end, n_pages


@gluon.jit
def _zero_tail(kv_smem, st, n0, end, NC: gl.constexpr, PAGE: gl.constexpr):
    """The page's rows at or past `end` (stale or NaN) set to 0 in every value chunk, for both warpgroups."""
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    toks = n0 + gl.arange(0, PAGE, layout=gl.SliceLayout(1, ld_layout))
    keep = gl.expand_dims(toks < end, 1)
    for c in gl.static_range(NC - 1):
        buf = kv_smem.index(st * NC + c)
        x = buf.load(ld_layout)
        buf.store(gl.where(keep, x, gl.zeros_like(x)))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _scores(q_smem, kv_smem, st, n0, row_end, sm_scale_log2, NC: gl.constexpr, PAGE: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    s = gl.zeros([64, 64], gl.float32, layout=s_layout)
    for c in gl.static_range(NC):
        s = warpgroup_mma(q_smem.index(c), kv_smem.index(st * NC + c).permute((1, 0)), s, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s, ))
    toks = n0 + gl.arange(0, PAGE, layout=gl.SliceLayout(0, s_layout))
    visible = gl.expand_dims(toks, 0) < gl.expand_dims(row_end, 1)
    return gl.where(visible, s * sm_scale_log2, float("-inf"))


@gluon.jit
def _store_out(acc0, acc1, acc2, acc3, m_i, l_i, OUT, LSE, out_scale, H, b, pid_h, split, n_splits,
               stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r,
               HALF_IDX: gl.constexpr, NUM_Q: gl.constexpr, SPLIT: gl.constexpr):
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows = pid_h * 64 + gl.arange(0, 64, layout=row_l)
    live = (rows < H * NUM_Q) & ((rows * 0 + split) < n_splits)
    has = l_i > 0.0
    inv2 = gl.expand_dims(out_scale / gl.where(has, l_i, 1.0), 1)   # empty range: the accumulators are 0
    cols = gl.arange(0, 64, layout=col_l)
    omask = gl.expand_dims(live, 1) & gl.expand_dims(cols < 64, 0)
    if SPLIT:
        base = OUT + b * stride_o_b + gl.expand_dims(rows, 1) * stride_o_r + split * stride_o_s
        if HALF_IDX == 0:
            lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
            gl.store(LSE + b * stride_lse_b + rows * stride_lse_r + split, lse, mask=live)
    else:
        base = OUT + b * stride_o_b + gl.expand_dims(rows, 1) * stride_o_r
    ptr = base + gl.expand_dims(cols, 0) + HALF_IDX * 256
    gl.store(ptr, (acc0 * inv2).to(OUT.dtype.element_ty), mask=omask)
    gl.store(ptr + 64, (acc1 * inv2).to(OUT.dtype.element_ty), mask=omask)
    gl.store(ptr + 128, (acc2 * inv2).to(OUT.dtype.element_ty), mask=omask)
    gl.store(ptr + 192, (acc3 * inv2).to(OUT.dtype.element_ty), mask=omask)


@gluon.jit
def _wg0(q_smem, kv_smem, ready, empty, xbar, m0_s, sum0_s, m1_s, sum1_s, SEQ_LENS, OUT, LSE,
         sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
         stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r,
         NC: gl.constexpr, PAGE: gl.constexpr, NUM_Q: gl.constexpr, ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    """Even pages: scores, softmax, publish P0; value columns 0..255 from both pages."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    cdt: gl.constexpr = q_smem.dtype
    seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)
    rows = pid_h * 64 + gl.arange(0, 64, layout=row_l)
    row_end = seq_len - (NUM_Q - 1 - rows // H)
    m_i = gl.full([64], float("-inf"), gl.float32, layout=row_l)
    l_i = gl.full([64], 0.0, gl.float32, layout=row_l)
    acc0 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc1 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc2 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc3 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    for k in range((n_pages + 1) // 2):
        ph = k & 1
        n0 = start + 2 * k * PAGE
        mbarrier.wait(ready.index(0), ph)
        if n0 + PAGE > end:
            _zero_tail(kv_smem, 0, n0, end, NC, PAGE)
        s = _scores(q_smem, kv_smem, 0, n0, row_end, sm_scale_log2, NC, PAGE)
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.expand_dims(m_safe, 1))
        psum = gl.sum(p, 1)
        pb = p.to(cdt)
        kv_smem.index(NC - 1).store(pb)          # P0 over the page's rope columns (read by WG1's PV)
        m0_s.store(m_new)
        sum0_s.store(psum)
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.arrive(xbar.index(0), count=1)
        pa = gl.convert_layout(pb, p_layout)
        a2 = gl.expand_dims(alpha, 1)
        acc0 = warpgroup_mma(pa, kv_smem.index(0), acc0 * a2, is_async=True)
        acc1 = warpgroup_mma(pa, kv_smem.index(1), acc1 * a2, is_async=True)
        acc2 = warpgroup_mma(pa, kv_smem.index(2), acc2 * a2, is_async=True)
        acc3 = warpgroup_mma(pa, kv_smem.index(3), acc3 * a2, is_async=True)
        l_i = l_i * alpha + psum
        m_i = m_new
        has1 = 2 * k + 1 < n_pages
        if has1:   # WG1's P1 and statistics (and its zeroed tail) are out; ready[1] is already complete here
            mbarrier.wait(xbar.index(1), ph)      # and orders the copy engine's writes for this warpgroup too
            mbarrier.wait(ready.index(1), ph)
        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
        gl.thread_barrier()
        mbarrier.arrive(empty.index(0), count=1)
        if has1:
            m1 = m1_s.load(row_l)
            sum1 = sum1_s.load(row_l)
            m1_safe = gl.where(m1 == float("-inf"), 0.0, m1)
            beta = gl.where(m_i == float("-inf"), 0.0, gl.exp2(m_safe - m1_safe))
            b2 = gl.expand_dims(beta, 1)
            p1 = gl.convert_layout(kv_smem.index(2 * NC - 1).load(s_layout), p_layout)
            acc0 = warpgroup_mma(p1, kv_smem.index(NC + 0), acc0 * b2, is_async=True)
            acc1 = warpgroup_mma(p1, kv_smem.index(NC + 1), acc1 * b2, is_async=True)
            acc2 = warpgroup_mma(p1, kv_smem.index(NC + 2), acc2 * b2, is_async=True)
            acc3 = warpgroup_mma(p1, kv_smem.index(NC + 3), acc3 * b2, is_async=True)
            l_i = l_i * beta + sum1
            m_i = m1
            acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(1), count=1)
    _store_out(acc0, acc1, acc2, acc3, m_i, l_i, OUT, LSE, out_scale, H, b, pid_h, split, n_splits,
               stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, 0, NUM_Q, SPLIT)


@gluon.jit
def _wg1(q_smem, kv_smem, ready, empty, xbar, m0_s, sum0_s, m1_s, sum1_s, SEQ_LENS, OUT, LSE,
         sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
         stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r,
         NC: gl.constexpr, PAGE: gl.constexpr, NUM_Q: gl.constexpr, ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    """Odd pages: scores, softmax against WG0's max, publish P1; value columns 256..511 from both pages."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    cdt: gl.constexpr = q_smem.dtype
    seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)
    rows = pid_h * 64 + gl.arange(0, 64, layout=row_l)
    row_end = seq_len - (NUM_Q - 1 - rows // H)
    m_i = gl.full([64], float("-inf"), gl.float32, layout=row_l)
    l_i = gl.full([64], 0.0, gl.float32, layout=row_l)
    acc0 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc1 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc2 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc3 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    for k in range((n_pages + 1) // 2):
        ph = k & 1
        n1 = start + (2 * k + 1) * PAGE
        if 2 * k + 1 < n_pages:
            mbarrier.wait(ready.index(1), ph)
            if n1 + PAGE > end:
                _zero_tail(kv_smem, 1, n1, end, NC, PAGE)
            s = _scores(q_smem, kv_smem, 1, n1, row_end, sm_scale_log2, NC, PAGE)
            mbarrier.wait(xbar.index(0), ph)       # WG0's P0 and statistics
            mbarrier.wait(ready.index(0), ph)
            m0 = m0_s.load(row_l)
            sum0 = sum0_s.load(row_l)
            m1 = gl.maximum(m0, gl.max(s, 1))
            m1_safe = gl.where(m1 == float("-inf"), 0.0, m1)
            m0_safe = gl.where(m0 == float("-inf"), 0.0, m0)
            alpha = gl.exp2(m_i - m0_safe)
            beta = gl.where(m0 == float("-inf"), 0.0, gl.exp2(m0_safe - m1_safe))
            # page 0's product first (it needs only the new max): it runs under this warpgroup's exponentials
            # and hands stage 0 back to the producer sooner
            p0 = kv_smem.index(NC - 1).load(s_layout).to(gl.float32) * gl.expand_dims(beta, 1)
            p0a = gl.convert_layout(p0.to(cdt), p_layout)
            ab = gl.expand_dims(alpha * beta, 1)
            acc0 = warpgroup_mma(p0a, kv_smem.index(4), acc0 * ab, is_async=True)
            acc1 = warpgroup_mma(p0a, kv_smem.index(5), acc1 * ab, is_async=True)
            acc2 = warpgroup_mma(p0a, kv_smem.index(6), acc2 * ab, is_async=True)
            acc3 = warpgroup_mma(p0a, kv_smem.index(7), acc3 * ab, is_async=True)
            p = gl.exp2(s - gl.expand_dims(m1_safe, 1))
            sum1 = gl.sum(p, 1)
            pb = p.to(cdt)
            kv_smem.index(2 * NC - 1).store(pb)   # P1 over page 1's rope columns (read by WG0's PV)
            m1_s.store(m1)
            sum1_s.store(sum1)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(xbar.index(1), count=1)
            p1 = gl.convert_layout(pb, p_layout)
            acc0 = warpgroup_mma(p1, kv_smem.index(NC + 4), acc0, is_async=True)
            acc1 = warpgroup_mma(p1, kv_smem.index(NC + 5), acc1, is_async=True)
            acc2 = warpgroup_mma(p1, kv_smem.index(NC + 6), acc2, is_async=True)
            acc3 = warpgroup_mma(p1, kv_smem.index(NC + 7), acc3, is_async=True)
            l_i = (l_i * alpha + sum0) * beta + sum1   # WG0's operations in WG0's order: the same bits
            m_i = m1
            acc0, acc1, acc2, acc3 = warpgroup_mma_wait(4, deps=(acc0, acc1, acc2, acc3))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(0), count=1)   # page 0's products are done: its refill may start
            acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(1), count=1)
        else:   # the split's odd page count: the last pair has only WG0's page
            mbarrier.wait(xbar.index(0), ph)
            mbarrier.wait(ready.index(0), ph)
            m0 = m0_s.load(row_l)
            sum0 = sum0_s.load(row_l)
            m0_safe = gl.where(m0 == float("-inf"), 0.0, m0)
            alpha = gl.exp2(m_i - m0_safe)
            p0a = gl.convert_layout(kv_smem.index(NC - 1).load(s_layout), p_layout)
            a2 = gl.expand_dims(alpha, 1)
            acc0 = warpgroup_mma(p0a, kv_smem.index(4), acc0 * a2, is_async=True)
            acc1 = warpgroup_mma(p0a, kv_smem.index(5), acc1 * a2, is_async=True)
            acc2 = warpgroup_mma(p0a, kv_smem.index(6), acc2 * a2, is_async=True)
            acc3 = warpgroup_mma(p0a, kv_smem.index(7), acc3 * a2, is_async=True)
            l_i = l_i * alpha + sum0
            m_i = m0
            acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
            gl.thread_barrier()
            mbarrier.arrive(empty.index(0), count=1)
    _store_out(acc0, acc1, acc2, acc3, m_i, l_i, OUT, LSE, out_scale, H, b, pid_h, split, n_splits,
               stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, 1, NUM_Q, SPLIT)


@gluon.jit
def _mla_decode_seesaw_kernel(
    Q_LAT, Q_PE, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE,
    sm_scale_log2, out_scale, chunk, max_splits, H, blk_rows,
    stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h, stride_bt_b,
    stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r,
    L: gl.constexpr, R: gl.constexpr, PAGE: gl.constexpr, NUM_Q: gl.constexpr,
    ALIGN: gl.constexpr, SPLIT: gl.constexpr,
):
    pid_h = gl.program_id(0)
    b = gl.program_id(1)
    split = gl.program_id(2)
    NC: gl.constexpr = (L + R) // 64
    smem_layout: gl.constexpr = kv_desc.layout
    cdt: gl.constexpr = kv_desc.dtype
    q_smem = gl.allocate_shared_memory(cdt, [NC, 64, 64], smem_layout)
    kv_smem = gl.allocate_shared_memory(cdt, [2 * NC, PAGE, 64], smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    xbar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # P0 out / P1 out
    # one buffer each suffices: WG0 rewrites m0/sum0 only after WG1 has published the pair's P1 (so read
    # them), and WG1 rewrites m1/sum1 only after WG0 has published the next pair's P0 (so read them)
    stat_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    m0_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    sum0_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    m1_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    sum1_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    for s in gl.static_range(2):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
        mbarrier.init(xbar.index(s), count=1)

    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = pid_h * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, ld_layout))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, ld_layout))
    rmask = gl.expand_dims(rows < H * NUM_Q, 1) & gl.expand_dims(cols < 64, 0)
    qi = rows // H
    head = rows % H
    ql = Q_LAT + b.to(gl.int64) * stride_ql_b + gl.expand_dims(qi * stride_ql_q + head * stride_ql_h, 1) \
        + gl.expand_dims(cols, 0)
    for c in gl.static_range(NC - 1):
        q_smem.index(c).store(gl.load(ql + c * 64, mask=rmask, other=0.0))
    qp = Q_PE + b.to(gl.int64) * stride_qp_b + gl.expand_dims(qi * stride_qp_q + head * stride_qp_h, 1) \
        + gl.expand_dims(cols, 0)
    q_smem.index(NC - 1).store(gl.load(qp, mask=rmask, other=0.0))
    fence_async_shared()
    gl.thread_barrier()

    gl.warp_specialize([
        (_wg0, (q_smem, kv_smem, ready, empty, xbar, m0_s, sum0_s, m1_s, sum1_s, SEQ_LENS, OUT, LSE,
                sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
                stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r,
                NC, PAGE, NUM_Q, ALIGN, SPLIT)),
        (_wg1, (q_smem, kv_smem, ready, empty, xbar, m0_s, sum0_s, m1_s, sum1_s, SEQ_LENS, OUT, LSE,
                sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
                stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r,
                NC, PAGE, NUM_Q, ALIGN, SPLIT)),
        (_producer, (q_smem, kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE,
                     sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split, blk_rows, stride_bt_b,
                     stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r,
                     NC, PAGE, 2, NUM_Q, ALIGN, SPLIT, False)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def launch(q_lat, q_pe, kv_cache, block_tables, seq_lens, out, lse, sm_scale_log2, out_scale, chunk, max_splits,
           grid, split: bool, align: int):
    """As mla_decode_gluon.launch (same arguments and output contract), seesaw schedule, two stages."""
    b, nq, h, lat = q_lat.shape
    desc, blk_rows = make_descriptor(kv_cache)
    if split:
        so = (out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1))
    else:
        so = (out.stride(0), out.stride(1), 0, 0, 0)
    _mla_decode_seesaw_kernel[grid](
        q_lat, q_pe, desc, block_tables, seq_lens, out, lse,
        sm_scale_log2, out_scale, chunk, max_splits, h, blk_rows,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        block_tables.stride(0), *so,
        L=lat, R=q_pe.shape[3], PAGE=kv_cache.shape[1], NUM_Q=nq, ALIGN=align, SPLIT=split,
        num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
