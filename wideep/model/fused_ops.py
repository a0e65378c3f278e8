"""Fused small ops of the decode step (Triton on CUDA, torch references elsewhere): RMSNorm with an optional
residual add, and the noaux_tc router's selection (sigmoid, correction bias, group-limited top-k,
renormalization, scaling) in one kernel. Each replaces 7-15 tiny kernels per use; a 61-layer step has
hundreds of uses. Numerics follow the torch references (same roundings; sums in fp32).
"""
from __future__ import annotations

import math

import torch

from wideep.model.triton_compat import constexpr, tl, triton


# Launch option for kernels that must round like a chain of torch elementwise ops: with fp fusion on, the
# compiler turns round(round(a*b) - round(c*d)) in bf16 into fma(a, b, -round(c*d)) (one rounding fewer,
# seen in the sm_90 PTX), so a fused rope would differ from torch's in the last bit of ~1/4 of the values.
NO_FP_FUSION = {"enable_fp_fusion": False}


def use_triton(x: torch.Tensor, impl: str) -> bool:
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' but triton is not installed")
        return True
    if impl == "torch":
        return False
    if impl != "auto":
        raise ValueError(f"impl must be auto, triton or torch; got {impl!r}")
    return x.is_cuda and triton is not None


# ---- RMSNorm (+ residual) ---------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


if triton is not None:

    @triton.jit
    def _normed_row(x_ptr, r_ptr, w_ptr, res_out_ptr, row, offs, mask, D, stride_x, stride_r, stride_ro, eps,
                    HAS_RES: constexpr):
        """Row `row` of x (+ r, stored to res_out), RMS-normalized and scaled by w, rounded to x's dtype."""
        ty = x_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
            x = x.to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_ro + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
        n = (xf * rstd).to(ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return (n * w).to(ty)

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr, D, stride_x, stride_r, stride_o, stride_ro, eps,
                         HAS_RES: constexpr, BLOCK: constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        y = _normed_row(x_ptr, r_ptr, w_ptr, res_out_ptr, row, offs, mask, D, stride_x, stride_r, stride_ro, eps,
                        HAS_RES)
        tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _residual_rows(residual: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual as rows with unit channel stride, and the buffer the kernels write x + residual into."""
    r2 = residual.reshape(-1, x2.shape[1])
    return (r2 if r2.stride(-1) == 1 else r2.contiguous()), torch.empty_like(x2, memory_format=torch.contiguous_format)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             impl: str = "auto"):
    """RMSNorm over the last dim. With residual: s = x + residual (rounded to x's dtype) is normalized and
    (normed, s) returned - the add and the norm in one pass over the row."""
    if not use_triton(x, impl) or weight.dtype != x.dtype:
        if residual is None:
            return rms_norm_ref(x, weight, eps)
        s = x + residual
        return rms_norm_ref(s, weight, eps), s
    shape = x.shape
    d = shape[-1]
    x2 = x.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, d), dtype=x.dtype, device=x.device)
    r2, res_out = _residual_rows(residual, x2) if residual is not None else (x2, out)
    if m:
        _rms_norm_kernel[(m,)](x2, r2, weight, out, res_out, d, x2.stride(0), r2.stride(0), out.stride(0),
                               res_out.stride(0), eps, HAS_RES=residual is not None,
                               BLOCK=triton.next_power_of_2(d), num_warps=4 if d <= 2048 else 8)
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)



# ---- RMSNorm (+ residual) with the next projection's FP8 activation quantization ------------------------------
# The normed rows feed one FP8 projection only (q_a_layernorm -> q_b, input_layernorm -> q_a ‖ kv_a): writing
# them in bf16 for a separate quantization kernel to read back costs a launch and a round trip per norm. This
# kernel normalizes exactly as _rms_norm_kernel does (the same row load, the same fp32 sum, the same roundings,
# the same warps) and quantizes the bf16 result per 128-channel group exactly as fp8_triton's act_quant does, so
# its codes and scales equal that pair's bit for bit.

if triton is not None:

    @triton.jit
    def _rms_norm_quant_kernel(x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr, D, MP, stride_x, stride_r, stride_ro,
                               stride_q, eps, HAS_RES: constexpr, BLOCK: constexpr, GROUPS: constexpr,
                               GROUP_K: constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < D
        y = _normed_row(x_ptr, r_ptr, w_ptr, res_out_ptr, row, offs, mask, D, stride_x, stride_r, stride_ro, eps,
                        HAS_RES)
        y = tl.reshape(y.to(tl.float32), (GROUPS, GROUP_K))     # the bf16 normed row, by group
        amax = tl.max(tl.abs(y), axis=1)
        scale = tl.maximum(amax, 1e-10) / 448.0
        q = tl.clamp(y / scale[:, None], -448.0, 448.0)
        g = tl.arange(0, GROUPS)
        qo = g[:, None] * GROUP_K + tl.arange(0, GROUP_K)[None, :]
        tl.store(q_ptr + row * stride_q + qo, q.to(q_ptr.dtype.element_ty), mask=qo < D)
        tl.store(s_ptr + g * MP + row, scale, mask=g * GROUP_K < D)


def rms_norm_quant_applies(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> bool:
    """Whether rms_norm_quant runs its kernel for x (else the caller norms and quantizes apart)."""
    return use_triton(x, impl) and weight.dtype == x.dtype and x.stride(-1) == 1


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                   pad_rows: int = 1, impl: str = "auto"):
    """rms_norm(x [+ residual]) quantized per token per 128 channels, in one kernel: (e4m3 [M', D], fp32 scales
    [M', ceil(D/128)] with strides (1, M'), M' = M rounded up to pad_rows, rows past M unset) - the layout
    fp8_triton.act_quant(rms_norm(...), pad_rows) returns, with the same bits - and, with residual, the sum
    x + residual as rms_norm returns it. Needs rms_norm_quant_applies."""
    if not rms_norm_quant_applies(x, weight, impl):
        raise ValueError("rms_norm_quant: needs Triton, x's dtype for the weight and unit channel stride")
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    m = x2.shape[0]
    ng = -(-d // 128)
    mp = -(-m // pad_rows) * pad_rows
    q = torch.empty((mp, d), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((ng, mp), dtype=torch.float32, device=x.device)
    r2, res_out = _residual_rows(residual, x2) if residual is not None else (x2, x2)
    if m:
        block = triton.next_power_of_2(d)
        _rms_norm_quant_kernel[(m,)](x2, r2, weight, q, s, res_out, d, mp, x2.stride(0), r2.stride(0),
                                     res_out.stride(0), q.stride(0), eps, HAS_RES=residual is not None, BLOCK=block,
                                     GROUPS=max(1, block // 128), GROUP_K=min(block, 128),
                                     num_warps=4 if d <= 2048 else 8)
    if residual is None:
        return q, s.t()
    return q, s.t(), res_out.view(residual.shape)

# ---- noaux_tc routing --------------------------------------------------------------------------------------

def route_ref(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
              renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] fp32 -> (topk_ids [T, K] int64, weights [T, K] fp32): DeepSeek-V3's noaux_tc selection."""
    scores = logits.sigmoid()
    biased = scores + bias.float()
    t, e = scores.shape
    per_group = e // n_group
    group_scores = biased.view(t, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = group_scores.topk(topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
    expert_mask = group_mask[:, :, None].expand(t, n_group, per_group).reshape(t, e)
    biased = biased.masked_fill(expert_mask == 0, float("-inf"))
    topk_ids = biased.topk(top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, topk_ids)
    if renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_ids, w * scaling


if triton is not None:

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, stride_l, scaling, stride_split,
                      E: constexpr, G: constexpr, PER: constexpr, TOPK_GROUP: constexpr, K: constexpr,
                      RENORM: constexpr, SPLIT: constexpr):
        """One token per program: scores [G, PER]; group score = sum of the 2 best biased scores; keep the
        TOPK_GROUP best groups; pick the K best biased experts among them; weights from unbiased scores.
        SPLIT > 1: the logits are SPLIT fp32 partial sums (stride_split apart), added in slice order."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, G)[:, None] * PER + tl.arange(0, PER)[None, :]          # [G, PER]
        logit = tl.load(logits_ptr + t * stride_l + offs)
        for sp in tl.static_range(1, SPLIT):
            logit += tl.load(logits_ptr + sp * stride_split + t * stride_l + offs)
        s = tl.sigmoid(logit)
        b = s + tl.load(bias_ptr + offs)
        neg = float("-inf")
        first = tl.max(b, axis=1)
        is_first = b == first[:, None]
        # the 2nd best of each group: mask one occurrence of the best (lowest index among ties)
        col = tl.arange(0, PER)[None, :] + tl.zeros((G, PER), dtype=tl.int32)
        first_col = tl.min(tl.where(is_first, col, PER), axis=1)
        second = tl.max(tl.where(col == first_col[:, None], neg, b), axis=1)
        gscore = first + second                                                    # [G]
        gidx = tl.arange(0, G)
        keep = tl.zeros((G,), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            cand = tl.where(keep, neg, gscore)
            best = tl.max(cand, axis=0)
            pick = tl.min(tl.where(cand == best, gidx, G), axis=0)
            keep = keep | (gidx == pick)
        masked = tl.where(keep[:, None], b, neg)
        flat = offs
        koffs = tl.arange(0, K)
        wvec = tl.zeros((K,), dtype=tl.float32)
        ivec = tl.zeros((K,), dtype=tl.int64)
        tot = 0.0
        for k in tl.static_range(K):
            best = tl.max(tl.max(masked, axis=1), axis=0)
            pick = tl.min(tl.min(tl.where(masked == best, flat, E), axis=1), axis=0)
            wk = tl.sum(tl.sum(tl.where(flat == pick, s, 0.0), axis=1), axis=0)
            wvec = tl.where(koffs == k, wk, wvec)
            ivec = tl.where(koffs == k, pick.to(tl.int64), ivec)
            masked = tl.where(flat == pick, neg, masked)
            tot = tot + wk   # the renormalization sum in pick order: the same bits in every kernel layout
        if RENORM:
            wvec = wvec / (tot + 1e-20)
        tl.store(ids_ptr + t * K + koffs, ivec)
        tl.store(w_ptr + t * K + koffs, wvec * scaling)


def route(logits: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int, topk_group: int,
          renormalize: bool, scaling: float, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """noaux_tc selection; the kernel needs power-of-two group count, group size and top_k."""
    t, e = logits.shape
    per = e // n_group
    pow2 = all(v & (v - 1) == 0 for v in (n_group, per, top_k))
    if not use_triton(logits, impl) or not pow2 or per < 2:
        return route_ref(logits, bias, top_k, n_group, topk_group, renormalize, scaling)
    logits = logits.float().contiguous()
    ids = torch.empty((t, top_k), dtype=torch.int64, device=logits.device)
    w = torch.empty((t, top_k), dtype=torch.float32, device=logits.device)
    if t:
        _route_kernel[(t,)](logits, bias.float().contiguous(), ids, w, logits.stride(0), float(scaling), 0,
                            E=e, G=n_group, PER=per, TOPK_GROUP=topk_group, K=top_k, RENORM=renormalize,
                            SPLIT=1, num_warps=4)
    return ids, w


# ---- router gate GEMM + selection ---------------------------------------------------------------------------
# The gate is a [T, H] x [H, E] product (E = 256 in R1) with bf16 operands and an fp32 result. At decode sizes
# cuBLAS runs it as a split-K GEMM plus a reduce kernel (13 us per layer with the selection, measured); here a
# Triton GEMM writes a fixed number of fp32 K-slice partials and the selection kernel adds them in slice order
# while it loads its logits: two launches, and a row's logits never depend on the batch (tiles and slices are
# fixed by H alone). Beyond GATE_KERNEL_MAX_TOKENS (prefill) the partials would outweigh the weight: cuBLAS.
GATE_KERNEL_MAX_TOKENS = 512
GATE_BLOCK_T, GATE_BLOCK_E, GATE_BLOCK_K, GATE_KB_PER_SLICE = 64, 64, 128, 4
# Measured on an H200 (benchmarks/rank.py's router check, CUDA-graph replay, R1 sizes, 128 / 256 tokens): the
# selection at 4 warps and the unrolled K loop 12.0 / 13.4 us per call; one warp (no block barriers in the
# top-k chain) 10.0 / 11.7; plus the pipelined K loop 8.9 / 10.6 - the same bits each time.
GATE_SELECT_WARPS = 1   # warps of the two-kernel path's selection program (one token each)
GATE_UNROLL = False     # the gate GEMM's K loop unrolled, else software-pipelined (_gate_slice; same bits)

if triton is not None:

    @triton.jit
    def _gate_kblock(x_ptr, w_ptr, T, H, E, stride_x, stride_w, rt, re, kidx, acc, BLOCK_K: constexpr,
                     UPCAST: constexpr):
        k = kidx * BLOCK_K + tl.arange(0, BLOCK_K)
        km = k < H
        a = tl.load(x_ptr + rt[:, None].to(tl.int64) * stride_x + k[None, :],
                    mask=(rt < T)[:, None] & km[None, :], other=0.0)
        b = tl.load(w_ptr + re[:, None].to(tl.int64) * stride_w + k[None, :],
                    mask=(re < E)[:, None] & km[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, tl.trans(b), acc)

    @triton.jit
    def _gate_slice(x_ptr, w_ptr, T, H, E, stride_x, stride_w, rt, re, sl, KB_PER: constexpr, BLOCK_T: constexpr,
                    BLOCK_E: constexpr, BLOCK_K: constexpr, UPCAST: constexpr, UNROLL: constexpr):
        """One K slice's fp32 partial of x[rt] @ w[re]^T: KB_PER blocks accumulated in order. UNROLL: the loop
        unrolled (every block's loads issued up front: at 64 x 64 tiles ptxas spills ~2 KB, sm_90 AOT); else a
        software-pipelined loop through shared memory. The same products summed in the same order either way."""
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        if UNROLL:
            for kb in tl.static_range(KB_PER):
                acc = _gate_kblock(x_ptr, w_ptr, T, H, E, stride_x, stride_w, rt, re, sl * KB_PER + kb, acc,
                                   BLOCK_K, UPCAST)
        else:
            for kb in range(KB_PER):
                acc = _gate_kblock(x_ptr, w_ptr, T, H, E, stride_x, stride_w, rt, re, sl * KB_PER + kb, acc,
                                   BLOCK_K, UPCAST)
        return acc

    @triton.jit
    def _gate_partial_kernel(x_ptr, w_ptr, p_ptr, T, H, E, stride_x, stride_w, stride_ps,
                             KB_PER: constexpr, BLOCK_T: constexpr, BLOCK_E: constexpr, BLOCK_K: constexpr,
                             UPCAST: constexpr, UNROLL: constexpr = True):
        """Program (token block, expert block, K slice): the slice's fp32 partial of x @ w^T. UPCAST (the CPU
        interpreter, whose dot mishandles bf16): operands widened to fp32 first, the same exact products."""
        rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        re = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        sl = tl.program_id(2)
        acc = _gate_slice(x_ptr, w_ptr, T, H, E, stride_x, stride_w, rt, re, sl, KB_PER, BLOCK_T, BLOCK_E, BLOCK_K,
                          UPCAST, UNROLL)
        tl.store(p_ptr + sl * stride_ps + rt[:, None].to(tl.int64) * E + re[None, :], acc,
                 mask=(rt < T)[:, None] & (re < E)[None, :])


def gate_slices(hidden: int) -> int:
    """Number of fp32 K-slice partials of the gate GEMM (a function of the hidden size only)."""
    return -(-hidden // (GATE_BLOCK_K * GATE_KB_PER_SLICE))


def gate_partials(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, H], weight [E, H] (same dtype) -> [gate_slices(H), T, E] fp32 partial products (Triton)."""
    t, h = x.shape
    e = weight.shape[0]
    x, weight = x.contiguous(), weight.contiguous()
    n = gate_slices(h)
    p = torch.empty((n, t, e), dtype=torch.float32, device=x.device)
    if t:
        _gate_partial_kernel[(triton.cdiv(t, GATE_BLOCK_T), triton.cdiv(e, GATE_BLOCK_E), n)](
            x, weight, p, t, h, e, x.stride(0), weight.stride(0), p.stride(0), KB_PER=GATE_KB_PER_SLICE,
            BLOCK_T=GATE_BLOCK_T, BLOCK_E=GATE_BLOCK_E, BLOCK_K=GATE_BLOCK_K, UPCAST=not x.is_cuda, UNROLL=GATE_UNROLL,
            num_warps=4,
            num_stages=3 if x.is_cuda else 1)
    return p


def gate_route_applies(x: torch.Tensor, weight: torch.Tensor, top_k: int, n_group: int, impl: str = "auto") -> bool:
    """Whether gate_route's two kernels serve this call (else: gate logits, then route())."""
    e, t = weight.shape[0], x.shape[0]
    per = e // n_group
    pow2 = all(v & (v - 1) == 0 for v in (n_group, per, top_k)) and per >= 2
    if impl == "auto":
        return (pow2 and x.is_cuda and triton is not None and x.dtype == weight.dtype == torch.bfloat16
                and x.dim() == 2 and t <= GATE_KERNEL_MAX_TOKENS)
    return use_triton(x, impl) and pow2


def gate_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
               topk_group: int, renormalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """route(x @ weight^T in fp32, ...) as a split-K gate GEMM and the selection kernel (gate_route_applies).
    (One launch for both, the last-arriving program summing the partials and selecting, was bit-exact but 5x
    slower on an H200: the selection of a token block then runs in one program; see docs/perf.md.)"""
    p = gate_partials(x, weight)
    t, e = p.shape[1], p.shape[2]
    ids = torch.empty((t, top_k), dtype=torch.int64, device=x.device)
    w = torch.empty((t, top_k), dtype=torch.float32, device=x.device)
    if t:
        _route_kernel[(t,)](p, bias.float().contiguous(), ids, w, p.stride(1), float(scaling), p.stride(0),
                            E=e, G=n_group, PER=e // n_group, TOPK_GROUP=topk_group, K=top_k, RENORM=renormalize,
                            SPLIT=p.shape[0], num_warps=GATE_SELECT_WARPS)
    return ids, w


# ---- RoPE + latent-cache write ------------------------------------------------------------------------------

def rope_cache_write_ref(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         k_scale: float = 1.0) -> torch.Tensor:
    """The unfused ops: rope of q's last cos.shape[1]*2 channels (in place; that view returned), RMSNorm of
    kv's latent, rope of its k_pe, both written (c_kv ‖ k_pe) into the paged cache at slot_mapping (-1: not
    written)."""
    from .attention import write_latent_cache
    from .rope import RotaryEmbedding

    r = 2 * cos.shape[1]
    lat = kv.shape[-1] - r
    q_pe = q[..., q.shape[-1] - r:]
    q_pe.copy_(RotaryEmbedding.apply(q_pe, cos, sin))
    c_kv = rms_norm_ref(kv[:, :lat], norm_weight, eps)
    k_pe = RotaryEmbedding.apply(kv[:, lat:], cos, sin)
    write_latent_cache(kv_cache, torch.cat([c_kv, k_pe], dim=-1), slot_mapping, k_scale)
    return q_pe


if triton is not None:

    @triton.jit
    def _rope_cache_kernel(q_ptr, kv_ptr, w_ptr, cos_ptr, sin_ptr, cache_ptr, slot_ptr, qo_ptr,
                           H, LAT, stride_qt, stride_qh, stride_ot, stride_oh, stride_kv, stride_cs, stride_cblk,
                           stride_c, PAGE, eps, inv_k_scale,
                           Q_OFF: constexpr, HALF: constexpr, BLOCK_H: constexpr, BLOCK_HALF: constexpr,
                           BLOCK_L: constexpr, FP8: constexpr):
        """Program (token, head block): q_pe of BLOCK_H heads roped (de-interleaved layout) into qo_ptr's rows (q's
        own rope columns: in place); the last
        program of each token (head block index = the head blocks' count) writes the cache row
        [RMSNorm(c_kv) * w ‖ rope(k_pe)] (fp8: value / k_scale saturated to e4m3) at the token's slot, beside
        the head blocks rather than after one of them. Rope rounds to the activation dtype after each op
        (x1*cos, x2*sin, their difference), as the torch reference's elementwise ops do."""
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        ty = q_ptr.dtype.element_ty
        j = tl.arange(0, BLOCK_HALF)
        jm = j < HALF
        cos = tl.load(cos_ptr + t * stride_cs + j, mask=jm, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + t * stride_cs + j, mask=jm, other=0.0).to(tl.float32)
        latent = hb == tl.num_programs(1) - 1
        if not latent:
            h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            qm = (h < H)[:, None] & jm[None, :]
            qbase = q_ptr + t * stride_qt + h[:, None].to(tl.int64) * stride_qh + Q_OFF
            x1 = tl.load(qbase + 2 * j[None, :], mask=qm, other=0.0).to(tl.float32)
            x2 = tl.load(qbase + 2 * j[None, :] + 1, mask=qm, other=0.0).to(tl.float32)
            c2, s2 = cos[None, :], sin[None, :]
            qa = ((x1 * c2).to(ty).to(tl.float32) - (x2 * s2).to(ty).to(tl.float32)).to(ty)
            qb = ((x2 * c2).to(ty).to(tl.float32) + (x1 * s2).to(ty).to(tl.float32)).to(ty)
            # in place: every thread's reads are done before any thread overwrites the interleaved pairs
            tl.debug_barrier()
            obase = qo_ptr + t * stride_ot + h[:, None].to(tl.int64) * stride_oh
            tl.store(obase + j[None, :], qa, mask=qm)
            tl.store(obase + HALF + j[None, :], qb, mask=qm)
        slot = tl.load(slot_ptr + t)
        if latent & (slot >= 0):
            ctype = cache_ptr.dtype.element_ty
            slot64 = slot.to(tl.int64)
            row = cache_ptr + (slot64 // PAGE) * stride_cblk + (slot64 % PAGE) * stride_c
            offs = tl.arange(0, BLOCK_L)
            lm = offs < LAT
            x = tl.load(kv_ptr + t * stride_kv + offs, mask=lm, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / LAT + eps)
            n = (x * rstd).to(ty).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=lm, other=0.0).to(tl.float32)
            n = (n * w).to(ty)
            k1 = tl.load(kv_ptr + t * stride_kv + LAT + 2 * j, mask=jm, other=0.0).to(tl.float32)
            k2 = tl.load(kv_ptr + t * stride_kv + LAT + 2 * j + 1, mask=jm, other=0.0).to(tl.float32)
            ka = ((k1 * cos).to(ty).to(tl.float32) - (k2 * sin).to(ty).to(tl.float32)).to(ty)
            kb = ((k2 * cos).to(ty).to(tl.float32) + (k1 * sin).to(ty).to(tl.float32)).to(ty)
            if FP8:
                n = tl.clamp(n.to(tl.float32) * inv_k_scale, -448.0, 448.0)
                ka = tl.clamp(ka.to(tl.float32) * inv_k_scale, -448.0, 448.0)
                kb = tl.clamp(kb.to(tl.float32) * inv_k_scale, -448.0, 448.0)
            tl.store(row + offs, n.to(ctype), mask=lm)
            tl.store(row + LAT + j, ka.to(ctype), mask=jm)
            tl.store(row + LAT + HALF + j, kb.to(ctype), mask=jm)


# heads per program and warps of the RoPE + cache kernel (the results do not depend on them: elementwise per
# head, one program per token's latent row); benchmarks/rank.py times the alternatives on the device. H200, R1
# sizes, graph us per call at 128 / 256 tokens: 8 heads at 1 warp 4.33 / 5.92, the former 16 at 4 warps 5.86 / 8.43,
# 32-128 heads 7.3-16.9 (docs/perf.md, issue 14)
ROPE_BLOCK_H = 8
ROPE_WARPS = 1


def rope_cache_write(q: torch.Tensor, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                     cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
                     k_scale: float = 1.0, impl: str = "auto", q_pe_out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D] (rope part last), kv [T, L + R] (kv_a_proj's output), cos/sin [T, R/2] -> roped q_pe
    [T, H, R]; writes [RMSNorm(c_kv) ‖ rope(k_pe)] of every token with a slot into kv_cache, in the cache's
    dtype (fp8: value / k_scale). q_pe is roped in place and returned as a view, so q becomes
    [q_nope ‖ roped q_pe] as prefill attention wants it; or, with q_pe_out [T, H, R] (any strides, last
    contiguous), written there and returned (q's rope columns then stay as they were: where decode reads its
    query from another buffer). On CUDA one kernel instead of ~25 (two ropes, the norm, a concat and the
    padded scatter); elsewhere the unfused reference."""
    fp8 = kv_cache.dtype == torch.float8_e4m3fn
    ok = (q.dtype == kv.dtype == norm_weight.dtype == cos.dtype and q.stride(-1) == 1 and kv.stride(-1) == 1
          and kv_cache.stride(-1) == 1 and (fp8 or kv_cache.dtype == q.dtype))
    ok = ok and (q_pe_out is None or q_pe_out.dtype == q.dtype and q_pe_out.stride(-1) == 1)
    if not use_triton(q, impl) or not ok:
        if q_pe_out is None:
            return rope_cache_write_ref(q, kv, norm_weight, eps, cos, sin, kv_cache, slot_mapping, k_scale)
        r = 2 * cos.shape[1]
        q_pe_out.copy_(rope_cache_write_ref(q[..., q.shape[-1] - r:].clone(), kv, norm_weight, eps, cos, sin,
                                            kv_cache, slot_mapping, k_scale))
        return q_pe_out
    t, nh, d = q.shape
    half = cos.shape[1]
    lat = kv.shape[1] - 2 * half
    if fp8 and k_scale == 1.0:
        inv = 1.0
    elif fp8:
        # the reference divides by k_scale; multiplying by its inverse is exact only for powers of two
        if math.frexp(k_scale)[0] != 0.5:
            return rope_cache_write(q, kv, norm_weight, eps, cos, sin, kv_cache, slot_mapping, k_scale, "torch",
                                    q_pe_out)
        inv = 1.0 / k_scale
    else:
        inv = 1.0
    cos, sin = cos.contiguous(), sin.contiguous()
    bh = min(triton.next_power_of_2(nh), ROPE_BLOCK_H)
    q_pe = q[..., d - 2 * half:] if q_pe_out is None else q_pe_out
    if t:
        # (block, offset) strides: a cross-layer cache's layer is a strided view (engine/kv_cache.py)
        _rope_cache_kernel[(t, triton.cdiv(nh, bh) + 1)](q, kv, norm_weight, cos, sin, kv_cache, slot_mapping.contiguous(),
                                 q_pe, nh, lat, q.stride(0), q.stride(1), q_pe.stride(0), q_pe.stride(1), kv.stride(0),
                                 cos.stride(0), kv_cache.stride(0), kv_cache.stride(1), kv_cache.shape[1], eps, inv,
                                 Q_OFF=d - 2 * half, HALF=half, BLOCK_H=bh,
                                 BLOCK_HALF=triton.next_power_of_2(half), BLOCK_L=triton.next_power_of_2(lat),
                                 FP8=fp8, num_warps=ROPE_WARPS, **NO_FP_FUSION)
    return q_pe


# ---- prefill K / V of MLA's MHA form -----------------------------------------------------------------------------

def mla_prefill_kv_ref(kv: torch.Tensor, k_pe: torch.Tensor, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    ctx, nh, _ = kv.shape
    nope = kv.shape[-1] - v_dim
    k_nope, v = kv.split([nope, v_dim], dim=-1)
    k = torch.cat([k_nope, k_pe[:, None, :].expand(ctx, nh, k_pe.shape[-1])], dim=-1)
    return k, torch.nn.functional.pad(v, (0, k.shape[-1] - v_dim))


if triton is not None:

    @triton.jit
    def _mla_prefill_kv_kernel(kv_ptr, pe_ptr, k_ptr, v_ptr, H, stride_kvt, stride_kvh, stride_pe,
                               NOPE: constexpr, R: constexpr, V: constexpr, BLOCK_H: constexpr,
                               BLOCK_N: constexpr, BLOCK_R: constexpr, BLOCK_V: constexpr):
        """Program (context row, head block): k = [k_nope ‖ k_pe] and v zero-padded to k's width."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = (h < H)[:, None]
        src = kv_ptr + t * stride_kvt + h[:, None].to(tl.int64) * stride_kvh
        d = NOPE + R
        dst = t * H * d + h[:, None].to(tl.int64) * d
        n = tl.arange(0, BLOCK_N)[None, :]
        tl.store(k_ptr + dst + n, tl.load(src + n, mask=hm & (n < NOPE)), mask=hm & (n < NOPE))
        r = tl.arange(0, BLOCK_R)[None, :]
        pe = tl.load(pe_ptr + t * stride_pe + r, mask=r < R)
        tl.store(k_ptr + dst + NOPE + r, pe + tl.zeros((BLOCK_H, BLOCK_R), dtype=pe.dtype), mask=hm & (r < R))
        c = tl.arange(0, BLOCK_V)[None, :]
        v = tl.load(src + NOPE + c, mask=hm & (c < V), other=0.0)
        tl.store(v_ptr + dst + c, v, mask=hm & (c < d))


def mla_prefill_kv(kv: torch.Tensor, k_pe: torch.Tensor, v_dim: int,
                   impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """kv [ctx, H, nope + v] (kv_b_proj's output), k_pe [ctx, R] -> k [ctx, H, nope + R] (k_pe shared by every
    head) and v [ctx, H, nope + R] (zero-padded: the fused SDPA kernels want equal q/k/v head dims). One
    pass on CUDA instead of a broadcast concat plus a pad; elsewhere the torch reference."""
    ctx, nh, width = kv.shape
    nope, r = width - v_dim, k_pe.shape[-1]
    if not use_triton(kv, impl) or kv.stride(-1) != 1 or k_pe.stride(-1) != 1 or v_dim > nope + r:
        return mla_prefill_kv_ref(kv, k_pe, v_dim)
    k = torch.empty((ctx, nh, nope + r), dtype=kv.dtype, device=kv.device)
    v = torch.empty_like(k)
    bh = min(triton.next_power_of_2(nh), 8)
    if ctx:
        _mla_prefill_kv_kernel[(ctx, triton.cdiv(nh, bh))](
            kv, k_pe, k, v, nh, kv.stride(0), kv.stride(1), k_pe.stride(0), NOPE=nope, R=r, V=v_dim, BLOCK_H=bh,
            BLOCK_N=triton.next_power_of_2(nope), BLOCK_R=triton.next_power_of_2(r),
            BLOCK_V=triton.next_power_of_2(nope + r), num_warps=4)
    return k, v
