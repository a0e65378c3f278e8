"""Hopper (sm_90) paged MLA decode: whole pages of latent rows through the tensor-memory accelerator (TMA).

WHY: the portable kernel (mla_decode_triton) gathers a tile of latent rows with per-thread pointer loads
(cp.async): every thread computes 18 addresses per tile and the tile's masks. When a loop step is exactly
one page (BLOCK_N == page size), a tile is one page's contiguous rows, so one bulk tensor copy per operand
moves it into shared memory asynchronously and the tensor cores read it from there.

The cache is described as a 3-D tensor [num_blocks, page, L+R] with its real strides (block stride, row
stride, 1), so the per-layer view of a cross-layer cache (block stride = layers * page * (L+R)) works as
is. Only whole pages below the split's end go through TMA; a sequence's partial last page (rows past
seq_len may hold stale values or NaN, and 0 * NaN = NaN inside an MMA) takes one masked pointer-load
step that zeroes those rows. The split schedule, grid, merge kernel and output contract are the
portable kernel's (same batch-invariance and CUDA-graph guarantees).
"""
from wideep.model.triton_compat import constexpr, tl, triton


def tma_supported(kv_cache, page: int, lat: int, rope: int, block_n: int) -> str | None:
    """Why the TMA kernel cannot serve this cache (None = it can): the bulk copy needs 16-byte aligned
    base and strides, a unit inner stride, and a loop step of exactly one page."""
    esz = kv_cache.element_size()
    if block_n != page:
        return f"block_n {block_n} != page size {page}"
    if page > 256 or lat % 2 or lat // 2 > 256 or rope > 256 or lat & (lat - 1):
        return f"tile shape page {page}, latent {lat}, rope {rope} out of TMA box limits"
    if kv_cache.stride(2) != 1:
        return "the cache's last dimension is not contiguous"
    if (kv_cache.stride(0) * esz) % 16 or (kv_cache.stride(1) * esz) % 16 or kv_cache.data_ptr() % 16:
        return "cache base or strides are not 16-byte aligned"
    if (lat * esz) % 16 or (rope * esz) % 16:
        return "latent / rope widths are not 16-byte multiples"
    return None


def make_descriptors(kv_cache, lat: int, rope: int):
    """(value-half descriptor, rope descriptor) over the cache's own strides: boxes [1, page, L/2] and
    [1, page, R]. Host-side descriptors: built per launch from static shapes and the cache's fixed
    address, so a captured CUDA graph replays them unchanged."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    nb, page, width = kv_cache.shape
    shape = [nb, page, width]
    strides = [kv_cache.stride(0), kv_cache.stride(1), 1]
    half = TensorDescriptor(kv_cache, shape, strides, [1, page, lat // 2])
    pe = TensorDescriptor(kv_cache, shape, strides, [1, page, rope])
    return half, pe


def _tile_step(q0, q1, qp, kv0, kv1, kpe, acc0, acc1, m_i, l_i, s_mask, sm_scale_log2,
               CDT: constexpr, MASKED: constexpr):
    """One online-softmax step over a tile of latent rows (kv0 | kv1 = value halves, kpe = rope part)."""
    s = tl.dot(q0, tl.trans(kv0))
    s = tl.dot(q1, tl.trans(kv1), s)
    s = tl.dot(qp, tl.trans(kpe), s)
    if MASKED:
        s = tl.where(s_mask, s * sm_scale_log2, float("-inf"))
    else:
        s = s * sm_scale_log2
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = p.to(CDT)
    acc0 = tl.dot(pv, kv0, acc0 * alpha[:, None])
    acc1 = tl.dot(pv, kv1, acc1 * alpha[:, None])
    return acc0, acc1, m_new, l_i


def _mla_decode_tma_kernel(
    Q_LAT, Q_PE, KV, KV_DESC, PE_DESC, BLOCK_TABLES, SEQ_LENS, OUT, LSE, FIN,
    sm_scale_log2, out_scale, chunk, max_splits, H,
    stride_ql_b, stride_ql_q, stride_ql_h, stride_qp_b, stride_qp_q, stride_qp_h,
    stride_kv_blk, stride_kv_tok, stride_bt_b,
    stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
    L: constexpr, R: constexpr, PAGE: constexpr, BLOCK_H: constexpr, HALF: constexpr, NUM_Q: constexpr,
    ALIGN: constexpr, SPLIT: constexpr, KV_FP8: constexpr,
):
    """One (head block, sequence, split); whole pages by TMA, the partial last page by masked loads."""
    pid_h = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)
    CDT: constexpr = Q_LAT.dtype.element_ty
    seq_len = tl.load(SEQ_LENS + b)
    n_splits = tl.minimum(tl.maximum((seq_len + chunk - 1) // chunk, 1), max_splits)
    per = (seq_len + n_splits - 1) // n_splits
    per = tl.maximum((per + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    start = split * per
    end = tl.minimum(seq_len, start + per)
    n_splits = tl.where(seq_len < 0, 0, n_splits)   # a row another kernel writes (negative length): no store
    full_end = tl.maximum(start + (end - start) // PAGE * PAGE, start)   # start is page aligned (ALIGN % PAGE == 0)
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask_h = rows < H * NUM_Q
    live = rmask_h & ((rows * 0 + split) < n_splits)
    qi = rows // H
    head = rows % H
    row_end = seq_len - (NUM_Q - 1 - qi)
    offs_a = tl.arange(0, HALF)
    offs_r = tl.arange(0, R)
    q_row = Q_LAT + b * stride_ql_b + qi * stride_ql_q + head * stride_ql_h
    qp = tl.load(Q_PE + b * stride_qp_b + qi[:, None] * stride_qp_q + head[:, None] * stride_qp_h + offs_r[None, :],
                 mask=rmask_h[:, None], other=0.0)
    q0 = tl.load(q_row[:, None] + offs_a[None, :], mask=rmask_h[:, None], other=0.0)
    q1 = tl.load(q_row[:, None] + HALF + offs_a[None, :], mask=rmask_h[:, None], other=0.0)
    acc0 = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    bt_row = BLOCK_TABLES + b * stride_bt_b
    for n0 in range(start, full_end, PAGE):
        page = tl.load(bt_row + n0 // PAGE)
        kv0 = KV_DESC.load([page, 0, 0]).reshape(PAGE, HALF)
        kv1 = KV_DESC.load([page, 0, HALF]).reshape(PAGE, HALF)
        kpe = PE_DESC.load([page, 0, L]).reshape(PAGE, R)
        if KV_FP8:
            kv0 = kv0.to(CDT)
            kv1 = kv1.to(CDT)
            kpe = kpe.to(CDT)
        toks = n0 + tl.arange(0, PAGE)
        acc0, acc1, m_i, l_i = _tile_step(q0, q1, qp, kv0, kv1, kpe, acc0, acc1, m_i, l_i,
                                          toks[None, :] < row_end[:, None], sm_scale_log2, CDT, NUM_Q > 1)
    if full_end < end:   # the sequence's partial last page: rows past seq_len are zeroed, never multiplied
        toks = full_end + tl.arange(0, PAGE)
        tmask = toks < end
        page = tl.load(bt_row + full_end // PAGE).to(tl.int64)
        row = page * stride_kv_blk + (toks % PAGE).to(tl.int64) * stride_kv_tok
        kpe = tl.load(KV + row[:, None] + L + offs_r[None, :], mask=tmask[:, None], other=0.0)
        kv0 = tl.load(KV + row[:, None] + offs_a[None, :], mask=tmask[:, None], other=0.0)
        kv1 = tl.load(KV + row[:, None] + HALF + offs_a[None, :], mask=tmask[:, None], other=0.0)
        if KV_FP8:
            kv0 = kv0.to(CDT)
            kv1 = kv1.to(CDT)
            kpe = kpe.to(CDT)
        acc0, acc1, m_i, l_i = _tile_step(q0, q1, qp, kv0, kv1, kpe, acc0, acc1, m_i, l_i,
                                          toks[None, :] < row_end[:, None], sm_scale_log2, CDT, True)

    has = l_i > 0.0
    inv = out_scale / tl.where(has, l_i, 1.0)   # empty range: acc is 0 -> zeros
    out0 = acc0 * inv[:, None]
    out1 = acc1 * inv[:, None]
    partial = False
    if SPLIT:
        partial = n_splits > 1   # else one split: the output itself (the combine kernel skips the row)
    _store_halves(OUT, LSE, FIN, out0, out1, m_i, l_i, has, live, rows, offs_a, b, split, partial,
                  stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r, HALF)


def _store_halves(OUT, LSE, FIN, out0, out1, m_i, l_i, has, live, rows, offs_a, b, split, partial,
                  stride_o_b, stride_o_r, stride_o_s, stride_lse_b, stride_lse_r, stride_f_b, stride_f_r,
                  HALF: constexpr):
    """A split-value program's two normalized value halves: fp32 partials and the split's LSE (partial), or the
    output itself in FIN's dtype (a one-split sequence: the merge kernel skips its row)."""
    if partial:
        o_base = OUT + b * stride_o_b + rows[:, None] * stride_o_r + split * stride_o_s
        tl.store(LSE + b * stride_lse_b + rows * stride_lse_r + split,
                 tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")), mask=live)
        tl.store(o_base + offs_a[None, :], out0, mask=live[:, None])
        tl.store(o_base + HALF + offs_a[None, :], out1, mask=live[:, None])
    else:
        f_base = FIN + b * stride_f_b + rows[:, None] * stride_f_r
        tl.store(f_base + offs_a[None, :], out0.to(FIN.dtype.element_ty), mask=live[:, None])
        tl.store(f_base + HALF + offs_a[None, :], out1.to(FIN.dtype.element_ty), mask=live[:, None])


if triton is not None:
    _tile_step = triton.jit(_tile_step)
    _store_halves = triton.jit(_store_halves)
