"""Hopper (sm_90) paged MLA decode in Gluon: the two consumer warpgroups score the two halves of each page.

WHY: the warp-specialized kernel in mla_decode_gluon has both consumer warpgroups compute the same 64x64
score tile (the tensor cores issue 1.53x the needed work, and each warpgroup runs the whole page's
exponentials). A seesaw schedule (a page per warpgroup) removes that too, but with two 72 KB stages both
pages are in use at once, so nothing is prefetched (measured slower and removed). Here the page pipeline stays as in
mla_decode_gluon (a page per stage, two stages, the producer loads page i+1 while page i is computed) and
the page is split between the warpgroups instead:

- warpgroup w scores tokens 32w..32w+31 of the page (m64n32 wgmma over the resident query tile);
- the two row maxima are exchanged through shared memory, so both use the same new running max;
- each writes its 64x32 probability tile (bf16) and row sum to shared memory and reads the other's;
- each accumulates its own 256 of the 512 value columns from both tiles (its own from registers, the
  other's as the wgmma A operand from shared memory): O_w = O_w * alpha + P0 V[0:32, w] + P1 V[32:64, w].

Both warpgroups apply the same operations to the same statistics (max is exact; the two row sums are added
in one fixed order), so their halves are normalized identically. Shared memory: query 72 KB + two 72 KB
stages + two 4 KB probability tiles + 1 KB of statistics (`shared_bytes`: 225 of the 227 KiB an sm_90
block may have; the sm_90 build reports 230,728 bytes with alignment).
Split schedule, masking (scores past seq_len -inf; each warpgroup zeroes the rows past seq_len of its own
value chunks before its products), merge kernel and output contract are mla_decode_gluon's, so batch
invariance and CUDA-graph safety carry over. bf16 caches only.
ABLATE (benchmark-only, default 0 = the kernel that ships; `benchmarks/mla_decode.py --ablate`) leaves one part
out to see what is on the critical path: 1 the cross-warpgroup exchanges (own row max and sum only), 2 all PV
products, 3 the QK products, 4 everything but the page ring (wait for a page, hand it back), 5 the PV products
over the other warpgroup's probabilities. Results are wrong under ABLATE != 0.
Measured on an H200 (docs/perf.md, two runs): 0.170 ms per layer at B=128 ctx 2048 against 0.182 for the
full-tile kernel, 3-12% faster on average at every measured shape. The one-scorer kernel (mla_decode_scorer)
measured faster still and comes first on Hopper; this one is its fallback.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .mla_decode_gluon import CONSUMER_REGS, PRODUCER_REGS, _load_query, _producer, _split_range, _store_half

HALF = gl.constexpr(32)   # tokens per warpgroup per page
SM90_BLOCK_SMEM = 232448  # bytes of shared memory one block may use on sm_90


def shared_bytes(lat: int, rope: int, page: int, stages: int = 2) -> int:
    """Shared memory the kernel allocates (query tile, page stages, the two probability half-tiles, row
    statistics, mbarriers), before the compiler's alignment padding."""
    width, half = lat + rope, page // 2
    return 2 * (64 * width + stages * page * width + 2 * 64 * half) + 4 * 4 * 64 + 8 * (2 * stages + 4)


@gluon.jit
def _half(q_smem, kv_smem, p_smem, ready, empty, xmax, xp, mx_own, mx_oth, sum_own, sum0_s, sum1_s, SEQ_LENS, OUT, LSE, FIN,
          sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
          stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
          W: gl.constexpr, NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
          ALIGN: gl.constexpr, SPLIT: gl.constexpr, ABLATE: gl.constexpr):
    """Warpgroup W: scores of tokens 32W..32W+31, value columns 256W..256W+255."""
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 32, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    ocol_l: gl.constexpr = gl.SliceLayout(0, o_layout)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
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
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        kb = st * NC
        n0 = start + i * PAGE
        if ABLATE != 4:
            if n0 + PAGE > end:   # the partial last page: zero this warpgroup's value chunks past end (all rows)
                toks_ld = n0 + gl.arange(0, PAGE, layout=gl.SliceLayout(1, ld_layout))
                keep = gl.expand_dims(toks_ld < end, 1)
                for c in gl.static_range(4):
                    buf = kv_smem.index(kb + vbase + c)
                    x = buf.load(ld_layout)
                    buf.store(gl.where(keep, x, gl.zeros_like(x)))
                fence_async_shared()
                gl.thread_barrier()
            s = gl.zeros([64, HALF], gl.float32, layout=s_layout)
            if ABLATE != 3:
                for c in gl.static_range(NC):
                    s = warpgroup_mma(q_smem.index(c),
                                      kv_smem.index(kb + c).slice(W * HALF, HALF, dim=0).permute((1, 0)),
                                      s, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
            toks = n0 + W * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, s_layout))
            visible = gl.expand_dims(toks, 0) < gl.expand_dims(row_end, 1)
            s = gl.where(visible, s * sm_scale_log2, float("-inf"))
            mx = gl.max(s, 1)
            if ABLATE != 1:
                mx_own.store(mx)
                gl.thread_barrier()
                mbarrier.arrive(xmax.index(W), count=1)
                mbarrier.wait(xmax.index(OTHER), ph)
                m_new = gl.maximum(m_i, gl.maximum(mx, mx_oth.load(row_l)))
            else:
                m_new = gl.maximum(m_i, mx)
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_safe)
            p = gl.exp2(s - gl.expand_dims(m_safe, 1))
            pb = p.to(cdt)
            p_smem.index(W).store(pb)
            sum_own.store(gl.sum(p, 1))
            fence_async_shared()
            if ABLATE != 1:
                gl.thread_barrier()
                mbarrier.arrive(xp.index(W), count=1)
            pa = gl.convert_layout(pb, p_layout)
            a2 = gl.convert_layout(gl.expand_dims(alpha, 1), o_layout)
            if ABLATE != 2:
                acc0 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 0).slice(W * HALF, HALF, dim=0), acc0 * a2,
                                     is_async=True)
                acc1 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 1).slice(W * HALF, HALF, dim=0), acc1 * a2,
                                     is_async=True)
                acc2 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 2).slice(W * HALF, HALF, dim=0), acc2 * a2,
                                     is_async=True)
                acc3 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 3).slice(W * HALF, HALF, dim=0), acc3 * a2,
                                     is_async=True)
            if ABLATE != 1:
                mbarrier.wait(xp.index(OTHER), ph)
                sums = sum0_s.load(row_l) + sum1_s.load(row_l)   # one order in both warpgroups
            else:
                sums = gl.sum(p, 1)
            l_i = l_i * alpha + sums
            m_i = m_new
            po = p_smem.index(OTHER)
            if ABLATE != 2 and ABLATE != 5:
                acc0 = warpgroup_mma(po, kv_smem.index(kb + vbase + 0).slice(OTHER * HALF, HALF, dim=0), acc0,
                                     is_async=True)
                acc1 = warpgroup_mma(po, kv_smem.index(kb + vbase + 1).slice(OTHER * HALF, HALF, dim=0), acc1,
                                     is_async=True)
                acc2 = warpgroup_mma(po, kv_smem.index(kb + vbase + 2).slice(OTHER * HALF, HALF, dim=0), acc2,
                                     is_async=True)
                acc3 = warpgroup_mma(po, kv_smem.index(kb + vbase + 3).slice(OTHER * HALF, HALF, dim=0), acc3,
                                     is_async=True)
            acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
        gl.thread_barrier()
        mbarrier.arrive(empty.index(st), count=1)

    m_o = gl.convert_layout(m_i, orow_l)
    l_o = gl.convert_layout(l_i, orow_l)
    orows = pid_h * 64 + gl.arange(0, 64, layout=orow_l)
    _store_half(OUT, LSE, FIN, acc0, acc1, acc2, acc3, m_o, l_o, orows, gl.arange(0, 64, layout=ocol_l), out_scale, H, b,
                split, n_splits, stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r, W, NUM_Q, SPLIT)


@gluon.jit
def _half1(q_smem, kv_smem, p_smem, ready, empty, xmax, xp, mx_own, mx_oth, sum_own, sum0_s, sum1_s, SEQ_LENS, OUT, LSE, FIN,
           sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
           stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
           NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
           ALIGN: gl.constexpr, SPLIT: gl.constexpr, ABLATE: gl.constexpr):
    _half(q_smem, kv_smem, p_smem, ready, empty, xmax, xp, mx_own, mx_oth, sum_own, sum0_s, sum1_s, SEQ_LENS, OUT, LSE, FIN,
          sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
          stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
          1, NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT, ABLATE)


@gluon.jit
def _mla_decode_halfpage_kernel(
    Q_LAT, Q_PE, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
    sm_scale_log2, out_scale, chunk, max_splits, H, blk_rows,
    stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h, stride_bt_b,
    stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
    L: gl.constexpr, R: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
    ALIGN: gl.constexpr, SPLIT: gl.constexpr, ABLATE: gl.constexpr = 0,
):
    pid_h = gl.program_id(0)
    b = gl.program_id(1)
    split = gl.program_id(2)
    NC: gl.constexpr = (L + R) // 64
    smem_layout: gl.constexpr = kv_desc.layout
    cdt: gl.constexpr = kv_desc.dtype
    q_smem = gl.allocate_shared_memory(cdt, [NC, 64, 64], smem_layout)
    kv_smem = gl.allocate_shared_memory(cdt, [STAGES * NC, PAGE, 64], smem_layout)
    p_smem = gl.allocate_shared_memory(cdt, [2, 64, HALF], gl.NVMMASharedLayout.get_default_for([64, HALF], cdt))
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    xmax = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # warpgroup w's row max out
    xp = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())     # w's P tile and row sum out
    # one buffer each suffices: a warpgroup rewrites its row max only after it has seen the other's P of the
    # page before (which the other publishes after reading the max), and its P and row sum only after the
    # other has published the next row max (after its products over the old P completed)
    stat_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    mx0_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    mx1_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    sum0_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    sum1_s = gl.allocate_shared_memory(gl.float32, [64], stat_layout)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    for s in gl.static_range(2):
        mbarrier.init(xmax.index(s), count=1)
        mbarrier.init(xp.index(s), count=1)

    _load_query(q_smem, Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q,
                stride_qp_h, NC, NUM_Q)

    gl.warp_specialize([
        (_half, (q_smem, kv_smem, p_smem, ready, empty, xmax, xp, mx0_s, mx1_s, sum0_s, sum0_s, sum1_s,
                 SEQ_LENS, OUT, LSE, FIN,
                 sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
                 stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                 0, NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT, ABLATE)),
        (_half1, (q_smem, kv_smem, p_smem, ready, empty, xmax, xp, mx1_s, mx0_s, sum1_s, sum0_s, sum1_s,
                  SEQ_LENS, OUT, LSE, FIN,
                  sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
                  stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                  NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT, ABLATE)),
        (_producer, (q_smem, kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
                     sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split, blk_rows, stride_bt_b,
                     stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                     NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
