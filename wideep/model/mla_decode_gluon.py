"""Hopper (sm_90) paged MLA decode written in Gluon: warp-specialized, TMA-fed, full-width score tiles.

WHY: the Triton kernels (mla_decode_triton, mla_decode_hopper) run 64 heads x 64 tokens per step on two
warpgroups, and Triton splits the 64 score columns between them, so the QK^T product (53% of the FLOPs)
runs as m64n32 wgmma that re-read the 64x576 query tile from shared memory for every 32 columns (likely
bounded by shared-memory bandwidth rather than the tensor cores), and the softmax waits on it. Here the
roles are explicit:

- a 1-warp producer streams each page of the split (64 rows x 576) into a ring of shared-memory stages
  with bulk tensor copies (9 boxes of 64x64), completing on the stage's "ready" mbarrier;
- two consumer warpgroups each compute the full 64x64 score tile (m64n64 wgmma, query tile resident in
  shared memory), the same online softmax, and the PV product for their own half of the 512-wide value
  (4 accumulators of 64x64 each: 128 fp32 registers per thread). Recomputing the scores in both
  warpgroups costs tensor-core work but needs no exchange between them; the stage is released to the
  producer when both have finished with it ("empty" mbarrier, count 2).

Masking: the partial last page of a sequence may hold stale values or NaN past seq_len; scores there are
set to -inf, and each consumer zeroes those rows of its own value chunks in shared memory before the PV
product (0 * NaN = NaN inside an MMA). The split schedule (attention.split_plan), grid, merge kernel and
output contract are the portable kernel's, so batch invariance and CUDA-graph safety carry over.

bf16 caches only (an fp8 page cannot be a wgmma operand here; mla_decode_e4m3 widens it in shared memory).
Needs Triton with Gluon (3.6 on the device); imported only when this variant is selected.
Measured on an H200: 0.182 ms per layer at B=128, ctx 2048, H=128 (docs/perf.md).
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

CHUNK = 64        # columns per TMA box / smem tile (128 bytes of bf16: the widest swizzle)
BLOCK_H = 64      # query rows per program (one wgmma M)
NUM_WARPS = 4     # the default partition = consumer warpgroup 0
MAXNREG = 168     # 12 warps x 32 x 168 <= 64K registers; setmaxnreg then gives the consumers 240 each
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)


def supported(kv_cache: torch.Tensor, q_dtype: torch.dtype, lat: int, rope: int, page: int, align: int) -> str | None:
    """Why this kernel cannot serve the call (None = it can)."""
    if kv_cache.dtype != torch.bfloat16 or q_dtype != kv_cache.dtype:   # fp16 would compile; only bf16 was run
        return f"needs a bf16 cache and bf16 queries, got {kv_cache.dtype}/{q_dtype}"
    return layout_unsupported(kv_cache, lat, rope, page, align)


def layout_unsupported(kv_cache: torch.Tensor, lat: int, rope: int, page: int, align: int) -> str | None:
    """Why the page geometry or the cache's strides do not fit the Gluon kernels' bulk copies (None = they do);
    any element type."""
    if page != CHUNK or lat % CHUNK or rope != CHUNK or (lat // CHUNK) % 2 or align % page:
        return f"tile shape page {page}, latent {lat}, rope {rope} not covered (needs 64, 2k*64, 64)"
    width = lat + rope
    if kv_cache.stride(2) != 1 or kv_cache.stride(1) != width or kv_cache.stride(0) % width:
        return "the cache rows must be contiguous and the block stride a multiple of the row width"
    if kv_cache.data_ptr() % 16 or (width * kv_cache.element_size()) % 16:
        return "cache base or row stride not 16-byte aligned"
    if (kv_cache.shape[0] - 1) * (kv_cache.stride(0) // width) + page >= 2 ** 31:
        return "more cache rows than a 32-bit copy coordinate reaches"
    return None


def make_descriptor(kv_cache: torch.Tensor) -> tuple[TensorDescriptor, int]:
    """A 2-D descriptor over the cache's rows [rows, L+R] (row stride L+R) from the view's own base, and
    the rows per block stride: block b's token t is row b * blk_rows + t, for a contiguous cache and for
    a per-layer view of the cross-layer pool alike."""
    nb, page, width = kv_cache.shape
    blk_rows = kv_cache.stride(0) // width
    rows = (nb - 1) * blk_rows + page
    gdt = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float8_e4m3fn: gl.float8e4nv}[kv_cache.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([page, CHUNK], gdt)
    return TensorDescriptor(kv_cache, [rows, width], [width, 1], [page, CHUNK], layout), blk_rows


@gluon.jit
def _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE: gl.constexpr, ALIGN: gl.constexpr):
    """attention.split_plan on device: sequence b's length and split count, and this split's token range
    [start, end) with its page count (a function of the sequence's own length only: batch invariance). A
    negative length marks a row another kernel writes: no split, no page, no store."""
    seq_len = gl.load(SEQ_LENS + b)
    n_splits = gl.minimum(gl.maximum((seq_len + chunk - 1) // chunk, 1), max_splits)
    per = (seq_len + n_splits - 1) // n_splits
    per = gl.maximum((per + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    start = split * per
    end = gl.minimum(seq_len, start + per)
    n_pages = gl.maximum(end - start + PAGE - 1, 0) // PAGE
    n_splits = gl.where(seq_len < 0, 0, n_splits)
    return seq_len, n_splits, start, end, n_pages


@gluon.jit
def _query_tile(Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h,
                NUM_Q: gl.constexpr):
    """Where the program's query tile is: 64 rows of (query token, head), pointers to the first 64 latent columns
    and to the 64 rope columns of each row, and the mask of rows that exist (4 warps, 16-byte vectors)."""
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    rows = pid_h * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, ld_layout))
    cols = gl.arange(0, 64, layout=gl.SliceLayout(0, ld_layout))
    rmask = gl.expand_dims(rows < H * NUM_Q, 1) & gl.expand_dims(cols < 64, 0)
    qi = rows // H
    head = rows % H
    ql = Q_LAT + b.to(gl.int64) * stride_ql_b + gl.expand_dims(qi * stride_ql_q + head * stride_ql_h, 1) \
        + gl.expand_dims(cols, 0)
    qp = Q_PE + b.to(gl.int64) * stride_qp_b + gl.expand_dims(qi * stride_qp_q + head * stride_qp_h, 1) \
        + gl.expand_dims(cols, 0)
    return ql, qp, rmask


@gluon.jit
def _load_query(q_smem, Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q,
                stride_qp_h, NC: gl.constexpr, NUM_Q: gl.constexpr):
    """The program's query tile (64 rows of (query token, head) x 576: NC-1 latent chunks, then the rope
    chunk) into shared memory, once, visible to the async proxy before the workers start."""
    ql, qp, rmask = _query_tile(Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b,
                                stride_qp_q, stride_qp_h, NUM_Q)
    for c in gl.static_range(NC - 1):
        q_smem.index(c).store(gl.load(ql + c * 64, mask=rmask, other=0.0))
    q_smem.index(NC - 1).store(gl.load(qp, mask=rmask, other=0.0))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _store_cols(ptr, acc0, acc1, acc2, acc3, inv2, omask):
    """Four 64-column accumulators, normalized, at ptr, ptr + 64, + 128, + 192 (in ptr's element type)."""
    gl.store(ptr, (acc0 * inv2).to(ptr.dtype.element_ty), mask=omask)
    gl.store(ptr + 64, (acc1 * inv2).to(ptr.dtype.element_ty), mask=omask)
    gl.store(ptr + 128, (acc2 * inv2).to(ptr.dtype.element_ty), mask=omask)
    gl.store(ptr + 192, (acc3 * inv2).to(ptr.dtype.element_ty), mask=omask)


@gluon.jit
def _store_half(OUT, LSE, FIN, acc0, acc1, acc2, acc3, m_i, l_i, rows, cols, out_scale, H, b, split, n_splits,
                stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                W: gl.constexpr, NUM_Q: gl.constexpr, SPLIT: gl.constexpr):
    """Warpgroup W's 256 output columns (4 accumulators of 64) normalized by its row sums. An unsplit launch
    writes the output (OUT; storing to FIN there, with OUT and LSE both unused, crashes Triton 3.6's lowering);
    a split launch writes, for a sequence of several splits, the split's fp32 partial (and, from warpgroup 0,
    its log-sum-exp), and for a one-split sequence the output itself into FIN (the combine kernel skips that
    row); programs past the sequence's split count store nothing."""
    live = (rows < H * NUM_Q) & ((rows * 0 + split) < n_splits)
    has = l_i > 0.0
    inv2 = gl.expand_dims(out_scale / gl.where(has, l_i, 1.0), 1)   # empty range: the accumulators are 0 -> zeros
    omask = gl.expand_dims(live, 1) & gl.expand_dims(cols < 64, 0)
    col = gl.expand_dims(cols, 0) + W * 256
    if SPLIT:
        if n_splits > 1:
            if W == 0:
                lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
                gl.store(LSE + b * stride_lse_b + rows * stride_lse_r + split, lse, mask=live)
            _store_cols(OUT + b * stride_o_b + gl.expand_dims(rows, 1) * stride_o_r + split * stride_o_s + col,
                        acc0, acc1, acc2, acc3, inv2, omask)
        else:
            _store_cols(FIN + b * stride_f_b + gl.expand_dims(rows, 1) * stride_f_r + col,
                        acc0, acc1, acc2, acc3, inv2, omask)
    else:
        _store_cols(OUT + b * stride_o_b + gl.expand_dims(rows, 1) * stride_o_r + col, acc0, acc1, acc2, acc3,
                    inv2, omask)


@gluon.jit
def _consumer(q_smem, kv_smem, ready, empty, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
              sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
              stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
              HALF_IDX: gl.constexpr, NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
              NUM_Q: gl.constexpr, ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    """One consumer warpgroup: scores, softmax, and the PV product for value chunks
    HALF_IDX*4 .. HALF_IDX*4+3 (of 8)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    NV: gl.constexpr = (NC - 1) // 2     # value chunks per warpgroup
    cdt: gl.constexpr = q_smem.dtype

    seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)

    rows = pid_h * 64 + gl.arange(0, 64, layout=row_l)
    qi = rows // H
    row_end = seq_len - (NUM_Q - 1 - qi)
    m_i = gl.full([64], float("-inf"), gl.float32, layout=row_l)
    l_i = gl.full([64], 0.0, gl.float32, layout=row_l)
    acc0 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc1 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc2 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    acc3 = gl.zeros([64, 64], gl.float32, layout=s_layout)
    vbase: gl.constexpr = HALF_IDX * 4
    for i in range(n_pages):
        st = i % STAGES
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        kb = st * NC
        n0 = start + i * PAGE
        if n0 + PAGE > end:   # the sequence's partial last page: zero this warpgroup's value rows past end
            toks_ld = n0 + gl.arange(0, PAGE, layout=gl.SliceLayout(1, ld_layout))
            keep = gl.expand_dims(toks_ld < end, 1)
            for c in gl.static_range(NV):
                buf = kv_smem.index(kb + vbase + c)
                x = buf.load(ld_layout)
                buf.store(gl.where(keep, x, gl.zeros_like(x)))
            fence_async_shared()
            gl.thread_barrier()
        s = gl.zeros([64, 64], gl.float32, layout=s_layout)
        for c in gl.static_range(NC):
            s = warpgroup_mma(q_smem.index(c), kv_smem.index(kb + c).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s, ))
        toks = n0 + gl.arange(0, PAGE, layout=col_l)
        visible = gl.expand_dims(toks, 0) < gl.expand_dims(row_end, 1)
        s = gl.where(visible, s * sm_scale_log2, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.expand_dims(m_safe, 1))
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        pa = gl.convert_layout(p.to(cdt), p_layout)
        a2 = gl.expand_dims(alpha, 1)
        acc0 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 0), acc0 * a2, is_async=True)
        acc1 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 1), acc1 * a2, is_async=True)
        acc2 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 2), acc2 * a2, is_async=True)
        acc3 = warpgroup_mma(pa, kv_smem.index(kb + vbase + 3), acc3 * a2, is_async=True)
        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
        gl.thread_barrier()   # every warp of the group is done with the stage before it is handed back
        mbarrier.arrive(empty.index(st), count=1)

    _store_half(OUT, LSE, FIN, acc0, acc1, acc2, acc3, m_i, l_i, rows, gl.arange(0, 64, layout=col_l), out_scale, H, b,
                split, n_splits, stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r, HALF_IDX, NUM_Q, SPLIT)


@gluon.jit
def _consumer1(q_smem, kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
               sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split, blk_rows, stride_bt_b,
               stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
               NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
               ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    _consumer(q_smem, kv_smem, ready, empty, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
              sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
              stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
              1, NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)


@gluon.jit
def _producer(q_smem, kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
              sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split, blk_rows, stride_bt_b,
              stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
              NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
              ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    """1 warp: page ids from the block table, 9 bulk copies per page into the next free stage."""
    seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)
    bt_row = BLOCK_TABLES + b.to(gl.int64) * stride_bt_b + start // PAGE
    for i in range(n_pages):
        st = i % STAGES
        mbarrier.wait(empty.index(st), ((i // STAGES) & 1) ^ 1)
        row0 = gl.load(bt_row + i) * blk_rows
        mbarrier.expect(ready.index(st), NC * kv_desc.block_type.nbytes)
        for c in gl.static_range(NC):
            tma.async_copy_global_to_shared(kv_desc, [row0, c * 64], ready.index(st), kv_smem.index(st * NC + c))


@gluon.jit
def _mla_decode_gluon_kernel(
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
    smem_layout: gl.constexpr = kv_desc.layout
    cdt: gl.constexpr = kv_desc.dtype
    q_smem = gl.allocate_shared_memory(cdt, [NC, 64, 64], smem_layout)
    kv_smem = gl.allocate_shared_memory(cdt, [STAGES * NC, PAGE, 64], smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)

    _load_query(q_smem, Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q,
                stride_qp_h, NC, NUM_Q)

    # (the argument tuples are written out in the call: a tuple bound to a name first turns constexprs into
    # run-time values inside the worker partitions)
    gl.warp_specialize([
        (_consumer, (q_smem, kv_smem, ready, empty, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
                     sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split,
                     stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                     0, NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
        (_consumer1, (q_smem, kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
                      sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split, blk_rows, stride_bt_b,
                      stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                      NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
        (_producer, (q_smem, kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
                     sm_scale_log2, out_scale, chunk, max_splits, H, b, pid_h, split, blk_rows, stride_bt_b,
                     stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                     NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def launch(kernel, q_lat, q_pe, kv_cache, block_tables, seq_lens, out, lse, fin, out_strides, sm_scale_log2, out_scale,
           chunk, max_splits, grid, split: bool, stages: int, align: int, extra: tuple = (), **constexprs):
    """One of the Gluon decode kernels (this module's, mla_decode_halfpage's, mla_decode_e4m3's or
    mla_decode_scorer's: same arguments and output contract). q_lat [B, Q, H, L], q_pe [B, Q, H, R] (last dims
    contiguous), fin [B, Q*H, L] the output; out = fin (split=False) or the fp32 partials [B, Q*H, S, L] with
    lse [B, Q*H, S] (split=True); out_strides as the Triton kernels take them. `extra`: run-time arguments of that kernel
    after the strides (the one-scorer kernel's item space); `constexprs`: its extra compile-time arguments (the
    benchmark-only switches of the half-page and one-scorer kernels)."""
    b, nq, h, lat = q_lat.shape
    desc, blk_rows = make_descriptor(kv_cache)
    kernel[grid](
        q_lat, q_pe, desc, block_tables, seq_lens, out, lse, fin,
        sm_scale_log2, out_scale, chunk, max_splits, h, blk_rows,
        q_lat.stride(0), q_lat.stride(1), q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2),
        block_tables.stride(0), *out_strides, *extra,
        L=lat, R=q_pe.shape[3], PAGE=kv_cache.shape[1], STAGES=stages, NUM_Q=nq, ALIGN=align, SPLIT=split,
        num_warps=NUM_WARPS, maxnreg=MAXNREG, **constexprs,
    )
