"""Hopper (sm_90) paged MLA decode in Gluon: one warpgroup scores each page, both accumulate its values.

WHY: in the half-page kernel (mla_decode_halfpage) both consumer warpgroups score half a page each with
m64n32 wgmma (3 KB of shared memory read per 16 tensor-core cycles: bound by shared-memory bandwidth, not the
tensor cores) and then wait on each other twice per page (row max, then probabilities), so they run in
lockstep. Here the roles differ (FlashMLA's first published layout):

- warpgroup 0 (the scorer) computes the whole 64x64 score tile (m64n64 wgmma over the resident query tile),
  the online softmax, and accumulates value columns 0..255 with the probabilities from registers; it issues
  those products first and only then publishes the bf16 probabilities and the rescale factors;
- warpgroup 1 waits for them and accumulates columns 256..511 as one m64n256 product per k-step (the four
  value chunks of a stage are consecutive 64x64 tiles, i.e. one 64x256 operand in the same swizzled layout),
  the probabilities as the wgmma A operand from shared memory, read once per k-step. It never waits on the
  scorer's next softmax, and the scorer never waits on it except through the page ring.

The probabilities of page i go into page i's rope chunk (dead once its scores are computed), so they are
double-buffered with the pages and freed with them: no extra buffer and no "P free" barrier. Per stage a
"P ready" mbarrier carries the probabilities and the 64 rescale factors; after the last page the scorer
publishes its row max and row sum ("final" mbarrier), so both halves are normalized with the same bits.
The softmax scale is folded into the exponent (one FFMA per score), and scores are masked only on a split's
last page. Shared memory: query 72 KB + two 72 KB page stages + 1.5 KB of row statistics.

Split schedule, masking (scores past seq_len are -inf; each warpgroup zeroes the rows past seq_len of its own
value chunks before its products), merge kernel and output contract are mla_decode_gluon's, so batch
invariance and CUDA-graph safety carry over. bf16 caches only.

Work items and the persistent schedule: an item is one (head group, sequence, split), numbered split-major with
the head group fastest (item = (split * B + b) * HG + head group, so the head groups of a sequence's split run
side by side and share its pages through L2). The grid is 1-D; program p walks items p, p + P, p + 2P, ...
With P = the item count (`sc`) that is one item per program. With P = the SM count (`sc,ps`) each program keeps
its shared memory, barriers and page ring across items: the ring position runs on over items, the next item's
query tile is fetched (cp.async, by the scorer, which alone reads it) while the last page of the present item
is still being multiplied and stored, so the per-program costs (query load, ring fill and drain, store) overlap
the neighbouring items' pages instead of adding up. Items past the longest sequence's split count are not
walked (a graph's split axis is sized for the block table's width), and an item past its own sequence's split
count is skipped by every partition alike (no pages, no handshake, no store: the merge kernel reads only a
sequence's own splits). Each item runs the same instructions on the same data whichever program runs it, so
the bits do not depend on the grid (batch invariance). Handoffs across items: the page ring's barriers keep
their phases (position = pages this program consumed so far); the final row statistics go through one buffer
guarded both ways ("final" from the scorer, "statistics free" back from warpgroup 1), phases from the count
of items done. The query tile comes by cp.async in both grids (the producer starts its pages meanwhile); its
copies are 16-byte, so the launcher hands over queries with 16-element-aligned strides (aligned_queries).

WIDE0 (default 1; 0 only from `benchmarks/mla_decode.py --ablate`): warpgroup 0's value products as one
m64n256 per k-step too, as warpgroup 1's (A from registers: fewer instructions, no shared-memory saving).
Measured on an H200 (docs/perf.md): 0.141 ms per layer at B=128 ctx 2048 with WIDE0 (0.145 without, 0.172 for
the half-page kernel), 0.273 at B=256; the bf16 default on Hopper, through the suite's checks (oracle, alone vs
a batch of 37, graph vs eager, tiny model). (Those numbers are of the 3-D grid before the item walk above.)
The item walk, one item per program, measured 0.139 / 0.269 ms in the suite and 0.5 ms less MLA time per R1 decode
step in rank.py's graphs at B=128 (empty splits no longer load a query tile); the persistent grid (`ps`) another
1-3% in rank.py at 2k-4k contexts, within the suite's spread. `ps` is not the default: its items are dealt to
programs statically, assuming every SM is free, while dual-batch overlap runs communication kernels beside it.
Tried on top and removed (sixth pass): a lazy rescale (skip the accumulator multiplies while no row's max grew by
> 2^8: the warpgroup-wide vote costs more than the multiplies, which already hide behind the exponentials) 6%
slower; per-half ready/free barriers per stage (score chunks 0..3 while 4..8 land) no change beyond the run's
spread: the consumers rarely wait for pages.
"""
import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .mla_decode_gluon import CONSUMER_REGS, PRODUCER_REGS, _query_tile, _split_range, _store_half


def sm_count(device: torch.device) -> int:
    """The persistent grid's size: one program per SM (one fits an SM: ~222 KB of shared memory)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def schedule(head_groups: int, batch: int, splits: int, programs: int | None) -> tuple[tuple[int], tuple[int, int]]:
    """The kernel's 1-D grid and its trailing run-time arguments (batch, grid splits) for a (head groups, batch,
    splits) item space: one program per item (programs None), or at most `programs` programs walking the items
    (persistent: the SM count; fewer only to test the walk). Static shapes only: graph safe."""
    n_items = head_groups * batch * splits
    return (n_items if programs is None else min(n_items, programs),), (batch, splits)


def aligned_queries(q_lat: torch.Tensor, q_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The query operands as the kernel's 16-byte asynchronous copies need them: 16-byte aligned bases and row
    strides that are multiples of 16 elements (what a launch specializes as divisible; else the copies cannot be
    vectorized and the kernel does not compile); fresh contiguous copies where they are not."""
    def fits(x):
        return x.data_ptr() % 16 == 0 and all(st % 16 == 0 for st in x.stride()[:3])
    return (q_lat if fits(q_lat) else q_lat.clone(memory_format=torch.contiguous_format),
            q_pe if fits(q_pe) else q_pe.clone(memory_format=torch.contiguous_format))


@gluon.jit
def _item(item, HG, NB):
    """Item number -> (head group, sequence, split): split-major, head group fastest."""
    return item % HG, (item // HG) % NB, item // (HG * NB)


@gluon.jit
def _items_needed(SEQ_LENS, NB, HG, n_items, chunk, max_splits):
    """How many leading items can hold work: those of the splits the longest sequence has (the split count is
    monotonic in the length), at most the grid's."""
    lay: gl.constexpr = gl.BlockedLayout([4], [32], [4], [0])   # the kernel's 4 warps, before warp_specialize
    offs = gl.arange(0, 512, layout=lay)
    longest = gl.max(gl.load(SEQ_LENS + offs, mask=offs < NB, other=-1), 0)
    for i in range(512, NB, 512):
        longest = gl.maximum(longest, gl.max(gl.load(SEQ_LENS + i + offs, mask=i + offs < NB, other=-1), 0))
    splits = gl.minimum(gl.maximum((longest + chunk - 1) // chunk, 1), max_splits)
    splits = gl.where(longest < 0, 0, splits)   # every row written by another kernel
    return gl.minimum(n_items, splits * NB * HG)


@gluon.jit
def _fetch_query(q_smem, Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q,
                 stride_qp_h, NC: gl.constexpr, NUM_Q: gl.constexpr):
    """mla_decode_gluon._load_query as asynchronous copies (one commit group; rows past the heads are zero-filled):
    the caller waits for the group, fences and syncs the warpgroup before the first product reads the tile."""
    ql, qp, rmask = _query_tile(Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b,
                                stride_qp_q, stride_qp_h, NUM_Q)
    for c in gl.static_range(NC - 1):
        async_copy.async_copy_global_to_shared(q_smem.index(c), ql + c * 64, mask=rmask)
    async_copy.async_copy_global_to_shared(q_smem.index(NC - 1), qp, mask=rmask)
    async_copy.commit_group()


@gluon.jit
def _zero_tail(kv_smem, kb, n0, end, PAGE: gl.constexpr, VBASE: gl.constexpr):
    """The partial last page: zero rows past `end` of value chunks VBASE..VBASE+3 (0 * NaN = NaN in an MMA)."""
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    toks_ld = n0 + gl.arange(0, PAGE, layout=gl.SliceLayout(1, ld_layout))
    keep = gl.expand_dims(toks_ld < end, 1)
    for c in gl.static_range(4):
        buf = kv_smem.index(kb + VBASE + c)
        x = buf.load(ld_layout)
        buf.store(gl.where(keep, x, gl.zeros_like(x)))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _scorer(q_smem, kv_smem, ready, empty, p_ready, fin, stat_free, alpha_s, stat_s, Q_LAT, Q_PE, SEQ_LENS,
            OUT, LSE, FIN, sm_scale_log2, out_scale, chunk, max_splits, H, pid, nprog, n_items, HG, NB,
            stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h,
            stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
            NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
            ALIGN: gl.constexpr, SPLIT: gl.constexpr, WIDE0: gl.constexpr):
    """Warpgroup 0: per item, the query tile, then per page scores, softmax, value columns 0..255,
    probabilities out; the row statistics to warpgroup 1; its half of the output."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])
    w_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    o_layout: gl.constexpr = w_layout if WIDE0 else s_layout
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    cdt: gl.constexpr = q_smem.dtype
    wide_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([PAGE, 256], cdt)

    it = pid * 0         # pages consumed by this program so far: the ring position
    done = pid * 0       # items finished: the phase of the statistics handoff
    q_key = pid * 0 - 1  # b * HG + head group of the query tile in (or on its way to) shared memory
    for item in range(pid, n_items, nprog):
        pid_h, b, split = _item(item, HG, NB)
        seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)
        if split < n_splits:
            key = item % (HG * NB)
            if key != q_key:   # the first item, or the prefetched one was skipped: fetch now
                async_copy.wait_group(0)   # a stale prefetch lands before this copy of the same addresses
                _fetch_query(q_smem, Q_LAT, Q_PE, b, pid_h, H, stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b,
                             stride_qp_q, stride_qp_h, NC, NUM_Q)
                q_key = key
            async_copy.wait_group(0)
            fence_async_shared()
            gl.thread_barrier()
            nxt = item + nprog
            rows = pid_h * 64 + gl.arange(0, 64, layout=row_l)
            row_end = seq_len - (NUM_Q - 1 - rows // H)
            m_i = gl.full([64], float("-inf"), gl.float32, layout=row_l)
            l_i = gl.full([64], 0.0, gl.float32, layout=row_l)
            acc0 = gl.zeros([64, 1 if WIDE0 else 64], gl.float32, layout=s_layout)
            acc1 = gl.zeros([64, 1 if WIDE0 else 64], gl.float32, layout=s_layout)
            acc2 = gl.zeros([64, 1 if WIDE0 else 64], gl.float32, layout=s_layout)
            acc3 = gl.zeros([64, 1 if WIDE0 else 64], gl.float32, layout=s_layout)
            accw = gl.zeros([64, 256 if WIDE0 else 1], gl.float32, layout=w_layout)
            for i in range(n_pages):
                g = it + i
                st = g % STAGES
                kb = st * NC
                n0 = start + i * PAGE
                mbarrier.wait(ready.index(st), (g // STAGES) & 1)
                if n0 + PAGE > end:
                    _zero_tail(kv_smem, kb, n0, end, PAGE, 0)
                s = gl.zeros([64, 64], gl.float32, layout=s_layout)
                for c in gl.static_range(NC):
                    s = warpgroup_mma(q_smem.index(c), kv_smem.index(kb + c).permute((1, 0)), s, is_async=True)
                s = warpgroup_mma_wait(0, deps=(s, ))
                if i == n_pages - 1:   # the tile's last reader is done: fetch the next item's under this page
                    if nxt < n_items:
                        nkey = nxt % (HG * NB)
                        if nkey != key:
                            nh, nb, ns = _item(nxt, HG, NB)
                            gl.thread_barrier()   # every warp's products have read the tile
                            _fetch_query(q_smem, Q_LAT, Q_PE, nb, nh, H, stride_ql_b, stride_ql_q, stride_ql_h,
                                         stride_qp_b, stride_qp_q, stride_qp_h, NC, NUM_Q)
                            q_key = nkey
                if n0 + PAGE + NUM_Q - 1 > end:   # the split's last page (or a query token's causal limit): mask
                    toks = n0 + gl.arange(0, PAGE, layout=col_l)
                    visible = gl.expand_dims(toks, 0) < gl.expand_dims(row_end, 1)
                    s = gl.where(visible, s, float("-inf"))
                # the scale is folded into the exponent (one FFMA per score): max(s) * c == max(s * c) for c > 0
                m_new = gl.maximum(m_i, gl.max(s, 1) * sm_scale_log2)
                m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m_i - m_safe)
                p = gl.exp2(s * sm_scale_log2 - gl.expand_dims(m_safe, 1))
                m_i = m_new
                pb = p.to(cdt)
                pa = gl.convert_layout(pb, p_layout)
                # this warpgroup's products first (the critical path), then the probabilities for warpgroup 1
                if WIDE0:
                    aw = gl.convert_layout(gl.expand_dims(alpha, 1), w_layout)
                    accw = warpgroup_mma(pa, kv_smem.index(kb)._reinterpret(cdt, [PAGE, 256], wide_l), accw * aw,
                                         is_async=True)
                else:
                    a2 = gl.expand_dims(alpha, 1)
                    acc0 = warpgroup_mma(pa, kv_smem.index(kb + 0), acc0 * a2, is_async=True)
                    acc1 = warpgroup_mma(pa, kv_smem.index(kb + 1), acc1 * a2, is_async=True)
                    acc2 = warpgroup_mma(pa, kv_smem.index(kb + 2), acc2 * a2, is_async=True)
                    acc3 = warpgroup_mma(pa, kv_smem.index(kb + 3), acc3 * a2, is_async=True)
                kv_smem.index(kb + NC - 1).store(pb)   # the rope chunk: its scores are done
                alpha_s.index(st).store(alpha)
                fence_async_shared()
                gl.thread_barrier()
                mbarrier.arrive(p_ready.index(st), count=1)
                l_i = l_i * alpha + gl.sum(p, 1)
                if WIDE0:
                    accw = warpgroup_mma_wait(0, deps=(accw, ))
                else:
                    acc0, acc1, acc2, acc3 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2, acc3))
                gl.thread_barrier()
                mbarrier.arrive(empty.index(st), count=1)
            it += n_pages
            mbarrier.wait(stat_free.index(0), (done & 1) ^ 1)   # warpgroup 1 has read the previous item's
            stat_s.index(0).store(m_i)
            stat_s.index(1).store(l_i)
            gl.thread_barrier()
            mbarrier.arrive(fin.index(0), count=1)
            done += 1
            if WIDE0:
                wrow_l: gl.constexpr = gl.SliceLayout(1, w_layout)
                _store_wide(OUT, LSE, FIN, accw, gl.convert_layout(m_i, wrow_l), gl.convert_layout(l_i, wrow_l),
                            pid_h * 64 + gl.arange(0, 64, layout=wrow_l),
                            gl.arange(0, 256, layout=gl.SliceLayout(0, w_layout)), out_scale, H, b, split, n_splits,
                            stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                            0, NUM_Q, SPLIT)
            else:
                _store_half(OUT, LSE, FIN, acc0, acc1, acc2, acc3, m_i, l_i, rows, gl.arange(0, 64, layout=col_l),
                            out_scale, H, b, split, n_splits, stride_o_b, stride_o_r, stride_o_s, stride_lse_b,
                            stride_lse_r, stride_f_b, stride_f_r, 0, NUM_Q, SPLIT)
    async_copy.wait_group(0)   # a prefetch for a skipped last item lands before the program exits


@gluon.jit
def _store_wide(OUT, LSE, FIN, acc, m_i, l_i, rows, cols, out_scale, H, b, split, n_splits,
                stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                W: gl.constexpr, NUM_Q: gl.constexpr, SPLIT: gl.constexpr):
    """mla_decode_gluon._store_half for warpgroup W's 256 output columns held as one 64x256 accumulator."""
    live = (rows < H * NUM_Q) & ((rows * 0 + split) < n_splits)
    has = l_i > 0.0
    out = acc * gl.expand_dims(out_scale / gl.where(has, l_i, 1.0), 1)   # empty range: acc is 0 -> zeros
    omask = gl.expand_dims(live, 1) & gl.expand_dims(cols < 256, 0)
    col = gl.expand_dims(cols, 0) + W * 256
    if SPLIT:
        if n_splits > 1:
            if W == 0:
                lse = gl.where(has, m_i + gl.log2(gl.where(has, l_i, 1.0)), float("-inf"))
                gl.store(LSE + b * stride_lse_b + rows * stride_lse_r + split, lse, mask=live)
            gl.store(OUT + b * stride_o_b + gl.expand_dims(rows, 1) * stride_o_r + split * stride_o_s + col, out,
                     mask=omask)
        else:
            gl.store(FIN + b * stride_f_b + gl.expand_dims(rows, 1) * stride_f_r + col,
                     out.to(FIN.dtype.element_ty), mask=omask)
    else:
        gl.store(OUT + b * stride_o_b + gl.expand_dims(rows, 1) * stride_o_r + col, out.to(OUT.dtype.element_ty),
                 mask=omask)


@gluon.jit
def _accumulator(kv_smem, ready, empty, p_ready, fin, stat_free, alpha_s, stat_s, SEQ_LENS, OUT, LSE, FIN,
                 out_scale, chunk, max_splits, H, pid, nprog, n_items, HG, NB,
                 stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                 NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
                 ALIGN: gl.constexpr, SPLIT: gl.constexpr):
    """Warpgroup 1: value columns 256..511 from the scorer's probabilities in shared memory."""
    w_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, w_layout)
    wide_l: gl.constexpr = gl.NVMMASharedLayout.get_default_for([PAGE, 256], kv_smem.dtype)

    it = pid * 0
    done = pid * 0
    for item in range(pid, n_items, nprog):
        pid_h, b, split = _item(item, HG, NB)
        seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)
        if split < n_splits:
            acc = gl.zeros([64, 256], gl.float32, layout=w_layout)
            for i in range(n_pages):
                g = it + i
                st = g % STAGES
                ph = (g // STAGES) & 1
                mbarrier.wait(ready.index(st), ph)
                kb = st * NC
                n0 = start + i * PAGE
                if n0 + PAGE > end:
                    _zero_tail(kv_smem, kb, n0, end, PAGE, 4)
                mbarrier.wait(p_ready.index(st), ph)
                a2 = gl.expand_dims(alpha_s.index(st).load(row_l), 1)
                # value chunks 4..7 of the stage: four consecutive 64x64 swizzled tiles = one 64x256 operand
                v = kv_smem.index(kb + 4)._reinterpret(kv_smem.dtype, [PAGE, 256], wide_l)
                acc = warpgroup_mma(kv_smem.index(kb + NC - 1), v, acc * a2, is_async=True)
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                gl.thread_barrier()
                mbarrier.arrive(empty.index(st), count=1)
            it += n_pages
            mbarrier.wait(fin.index(0), done & 1)
            m_i = stat_s.index(0).load(row_l)
            l_i = stat_s.index(1).load(row_l)
            gl.thread_barrier()   # every warp has read the statistics before the scorer may overwrite them
            mbarrier.arrive(stat_free.index(0), count=1)
            done += 1
            _store_wide(OUT, LSE, FIN, acc, m_i, l_i, pid_h * 64 + gl.arange(0, 64, layout=row_l),
                        gl.arange(0, 256, layout=gl.SliceLayout(0, w_layout)), out_scale, H, b, split, n_splits,
                        stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r, 1,
                        NUM_Q, SPLIT)


@gluon.jit
def _producer(kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, chunk, max_splits, pid, nprog, n_items, HG,
              NB, blk_rows, stride_bt_b, NC: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr,
              ALIGN: gl.constexpr):
    """1 warp: per item, page ids from the block table, 9 bulk copies per page into the next free stage. (An item
    past its sequence's split count has no pages: the consumers' skip needs no test here.)"""
    it = pid * 0
    for item in range(pid, n_items, nprog):
        pid_h, b, split = _item(item, HG, NB)
        seq_len, n_splits, start, end, n_pages = _split_range(SEQ_LENS, b, split, chunk, max_splits, PAGE, ALIGN)
        bt_row = BLOCK_TABLES + b.to(gl.int64) * stride_bt_b + start // PAGE
        for i in range(n_pages):
            g = it + i
            st = g % STAGES
            mbarrier.wait(empty.index(st), ((g // STAGES) & 1) ^ 1)
            row0 = gl.load(bt_row + i) * blk_rows
            mbarrier.expect(ready.index(st), NC * kv_desc.block_type.nbytes)
            for c in gl.static_range(NC):
                tma.async_copy_global_to_shared(kv_desc, [row0, c * 64], ready.index(st), kv_smem.index(st * NC + c))
        it += n_pages


@gluon.jit(do_not_specialize=["NB", "n_splits_grid"])   # one compiled variant for every batch size
def _mla_decode_scorer_kernel(
    Q_LAT, Q_PE, kv_desc, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
    sm_scale_log2, out_scale, chunk, max_splits, H, blk_rows,
    stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h, stride_bt_b,
    stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
    NB, n_splits_grid,
    L: gl.constexpr, R: gl.constexpr, PAGE: gl.constexpr, STAGES: gl.constexpr, NUM_Q: gl.constexpr,
    ALIGN: gl.constexpr, SPLIT: gl.constexpr, WIDE0: gl.constexpr = 1,
):
    """Grid (P,): program p runs items p, p + P, ... of the (head group, sequence, split) items (see schedule)."""
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    HG = (H * NUM_Q + 63) // 64
    n_items = _items_needed(SEQ_LENS, NB, HG, HG * NB * n_splits_grid, chunk, max_splits)
    NC: gl.constexpr = (L + R) // 64
    smem_layout: gl.constexpr = kv_desc.layout
    cdt: gl.constexpr = kv_desc.dtype
    q_smem = gl.allocate_shared_memory(cdt, [NC, 64, 64], smem_layout)
    kv_smem = gl.allocate_shared_memory(cdt, [STAGES * NC, PAGE, 64], smem_layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    fin = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    stat_free = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    stat_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    alpha_s = gl.allocate_shared_memory(gl.float32, [STAGES, 64], stat_layout)   # per stage: the page's rescale
    stat_s = gl.allocate_shared_memory(gl.float32, [2, 64], stat_layout)         # final row max, row sum
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
        mbarrier.init(p_ready.index(s), count=1)
    mbarrier.init(fin.index(0), count=1)
    mbarrier.init(stat_free.index(0), count=1)
    fence_async_shared()
    gl.thread_barrier()

    # (the argument tuples are written out in the call: a tuple bound to a name first turns constexprs into
    # run-time values inside the worker partitions)
    gl.warp_specialize([
        (_scorer, (q_smem, kv_smem, ready, empty, p_ready, fin, stat_free, alpha_s, stat_s, Q_LAT, Q_PE, SEQ_LENS,
                   OUT, LSE, FIN, sm_scale_log2, out_scale, chunk, max_splits, H, pid, nprog, n_items, HG, NB,
                   stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h,
                   stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                   NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT, WIDE0)),
        (_accumulator, (kv_smem, ready, empty, p_ready, fin, stat_free, alpha_s, stat_s, SEQ_LENS, OUT, LSE, FIN,
                        out_scale, chunk, max_splits, H, pid, nprog, n_items, HG, NB,
                        stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                        NC, PAGE, STAGES, NUM_Q, ALIGN, SPLIT)),
        (_producer, (kv_smem, ready, empty, kv_desc, BLOCK_TABLES, SEQ_LENS, chunk, max_splits, pid, nprog, n_items,
                     HG, NB, blk_rows, stride_bt_b, NC, PAGE, STAGES, ALIGN)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
