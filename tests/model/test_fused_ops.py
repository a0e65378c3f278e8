"""The lean MoE path's pieces against plain torch: counting-sort grouping, gather-sum combine, fused
RMSNorm(+residual) and the fused noaux_tc router (Triton kernels under the interpreter on CPU): odd sizes,
zero-row experts, padding rows, a single token."""
from __future__ import annotations

import pytest
import torch

from wideep.model import fused_ops, moe_permute
from wideep.model.moe_permute import group_by_local_expert, pair_rows

needs_triton = pytest.mark.skipif(fused_ops.triton is None, reason="triton not installed")


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n,buckets", [(1, 3), (37, 5), (200, 9), (64, 1)])
def test_counting_sort_is_the_stable_argsort(n, buckets):
    key = torch.randint(0, buckets, (n,), generator=_g(n))
    key[: n // 3] = buckets - 1  # a crowded bucket; some buckets stay empty at small n
    order, counts = moe_permute.counting_sort(key, buckets)
    assert torch.equal(order, torch.argsort(key, stable=True))
    assert torch.equal(counts, torch.bincount(key, minlength=buckets))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("t,k,h", [(1, 1, 5), (9, 4, 129), (3, 8, 1030)])
def test_gather_sum_matches_plain_sum(impl, t, k, h):
    n = t * k + 3
    y = torch.randn(n, h, generator=_g(h))
    idx = torch.randperm(t * k, generator=_g(t))[: t * k].view(t, k)
    idx[0, -1] = -1  # a slot with no row (not this rank's / padding)
    out = moe_permute.gather_sum(y, idx, impl=impl)
    ref = torch.stack([sum((y[i] for i in row.tolist() if i >= 0), torch.zeros(h)) for row in idx])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_grouping_and_combine_round_trip_with_padding_and_empty_experts():
    ids = torch.tensor([[2, 0], [2, 5], [-1, -1], [0, 2]])  # row 2: padding; 5: another rank's; expert 1 empty
    g = group_by_local_expert(ids, 3, static=True)
    assert g.tokens_per_expert.tolist() == [2, 0, 3]
    x = torch.randn(4, 6, generator=_g(1))
    y = torch.where(g.valid[:, None], x[g.rows], torch.zeros(()))
    out = moe_permute.gather_sum(y, pair_rows(g, 4, 2), impl="torch")
    mine = ((ids >= 0) & (ids < 3)).sum(1, keepdim=True).float()
    torch.testing.assert_close(out, x * mine)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("m,d", [(1, 7), (5, 300), (3, 1536)])
def test_rms_norm_and_residual(impl, m, d):
    x = torch.randn(m, d, generator=_g(d)) * 3
    r = torch.randn(m, d, generator=_g(m))
    w = torch.rand(d, generator=_g(7)) + 0.5
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6, impl=impl), fused_ops.rms_norm_ref(x, w, 1e-6))
    normed, s = fused_ops.rms_norm(x, w, 1e-6, r, impl=impl)
    assert torch.equal(s, x + r)
    torch.testing.assert_close(normed, fused_ops.rms_norm_ref(x + r, w, 1e-6))
    # a strided view (the latent half of a projection) normalizes like its contiguous copy
    wide = torch.randn(m, d + 64, generator=_g(3))
    torch.testing.assert_close(fused_ops.rms_norm(wide[:, :d], w, 1e-6, impl=impl),
                               fused_ops.rms_norm_ref(wide[:, :d].contiguous(), w, 1e-6))


@needs_triton
@pytest.mark.parametrize("t,e,groups,topk_group,k", [(1, 256, 8, 4, 8), (13, 64, 4, 2, 4), (7, 16, 4, 2, 4)])
def test_fused_router_matches_reference(t, e, groups, topk_group, k):
    logits = torch.randn(t, e, generator=_g(t + e))
    bias = torch.randn(e, generator=_g(e)) * 0.1
    ids, w = fused_ops.route(logits, bias, k, groups, topk_group, True, 2.5, impl="triton")
    rid, rw = fused_ops.route_ref(logits, bias, k, groups, topk_group, True, 2.5)
    a, oa = ids.sort(1)
    b, ob = rid.sort(1)
    assert torch.equal(a, b)
    torch.testing.assert_close(w.gather(1, oa), rw.gather(1, ob))
    torch.testing.assert_close(w.sum(1), torch.full((t,), 2.5))


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weighted_gather_sum_is_the_multiply_then_sum(impl, dtype):
    """The routing weight folded into the combine rounds like y * w.to(y.dtype) did before the combine."""
    t, k, h = 7, 3, 130
    y = torch.randn(t * k + 2, h, generator=_g(5)).to(dtype)
    w = torch.rand(t * k + 2, generator=_g(6)) * 2.5
    idx = torch.randperm(t * k, generator=_g(7)).view(t, k)
    idx[2] = -1   # a padding token: no rows
    idx[4, 1] = -1
    out = moe_permute.gather_sum(y, idx, impl=impl, weights=w)
    ref = moe_permute.gather_sum(y * w.to(dtype)[:, None], idx, impl="torch")
    _same_roundings(out, ref, impl)
    assert torch.equal(out[2], torch.zeros(h, dtype=dtype))


def _same_roundings(out, ref, impl):
    """Bit-exact, except bf16 under Triton's CPU interpreter, whose float32 -> bfloat16 casts truncate
    (the GPU rounds to nearest even, as torch does): there within a few bf16 ulps."""
    if impl == "triton" and out.dtype == torch.bfloat16 and not out.is_cuda:
        scale = float(ref.float().abs().max())
        torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=4 * 2**-8 * scale)
    else:
        assert torch.equal(out, ref)


def _e4m3_same(got, ref, tol):
    """e4m3 codes equal up to the bf16 inputs' interpreter roundings (tol, relative), with one more allowance
    on CPU: Triton's interpreter drops the exponent carry when float32 -> e4m3 rounds up to a power of two
    (1.97 -> 1.0 where the GPU and torch give 2.0), so there a code may be half a power-of-two reference."""
    exp2 = torch.frexp(ref)[0].abs() == 0.5
    carry = exp2 & (got * 2 == ref) & (not got.is_cuda)
    step = (2.0 ** (torch.frexp(ref)[1].float() - 4)).clamp_min(2.0**-9)   # one e4m3 step (subnormals: 2^-9)
    close = (got - ref).abs() <= torch.maximum(step, ref.abs() * tol)
    assert bool((close | carry).all()), (got[~(close | carry)], ref[~(close | carry)])


def _rope_case(t, nh, lat, half, nope, dtype, cache_dtype, seed=0):
    g = _g(seed)
    q = torch.randn(t, nh, nope + 2 * half, generator=g).to(dtype)
    kv = (torch.randn(t, lat + 2 * half, generator=g) * 2).to(dtype)
    w = (torch.rand(lat, generator=g) + 0.5).to(dtype)
    ang = torch.rand(t, half, generator=g) * 6
    cos, sin = (ang.cos() * 1.1).to(dtype), (ang.sin() * 1.1).to(dtype)
    bs, nb = 4, 2 * t + 1
    cache = torch.randn(nb, bs, lat + 2 * half, generator=g).to(cache_dtype)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    if t > 2:
        slots[1] = -1      # a padding row: writes nothing
    return q, kv, w, cos, sin, cache, slots


@needs_triton
@pytest.mark.parametrize("t,nh,lat,half,nope", [(1, 1, 8, 4, 4), (5, 3, 20, 3, 6), (9, 4, 64, 8, 16), (3, 20, 16, 4, 8)])
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float8_e4m3fn)])
def test_rope_cache_write_matches_unfused(t, nh, lat, half, nope, dtype, cache_dtype):
    q, kv, w, cos, sin, cache, slots = _rope_case(t, nh, lat, half, nope, dtype, cache_dtype, seed=t)
    q_ref, cache_ref = q.clone(), cache.clone()
    pe_ref = fused_ops.rope_cache_write_ref(q_ref, kv, w, 1e-6, cos, sin, cache_ref, slots)
    pe = fused_ops.rope_cache_write(q, kv, w, 1e-6, cos, sin, cache, slots, impl="triton")
    _same_roundings(pe, pe_ref, "triton")                            # rope: the same roundings
    assert torch.equal(q[..., :nope], q_ref[..., :nope])           # q_nope untouched
    c, cr = cache.view(-1, cache.shape[-1]).float(), cache_ref.view(-1, cache.shape[-1]).float()
    if cache_dtype == torch.float8_e4m3fn:
        _e4m3_same(c[:, lat:], cr[:, lat:], tol=2**-6)
    else:
        _same_roundings(c[:, lat:].to(cache_dtype), cr[:, lat:].to(cache_dtype), "triton")
    # the normed latent: the kernel's rsqrt may differ from torch's in the last fp32 bit (bf16 on the
    # interpreter: two truncating casts)
    if cache_dtype == torch.float8_e4m3fn:
        _e4m3_same(c[:, :lat], cr[:, :lat], tol=2**-6)
    else:
        tol = {torch.float32: 1e-5, torch.bfloat16: 2.5e-2}[cache_dtype]
        torch.testing.assert_close(c[:, :lat], cr[:, :lat], rtol=tol, atol=tol)
    untouched = torch.ones(c.shape[0], dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.equal(c[untouched], cr[untouched])                 # no other slot written


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
def test_rope_cache_write_into_another_buffer(impl):
    """q_pe_out: the roped q_pe lands in a strided buffer (decode's head-major query buffer) with the in-place
    result's bits and the same cache writes; q itself is left as it was."""
    t, nh, lat, half, nope = 5, 3, 20, 4, 6
    q, kv, w, cos, sin, cache, slots = _rope_case(t, nh, lat, half, nope, torch.bfloat16, torch.bfloat16, seed=2)
    q_in, cache_in = q.clone(), cache.clone()
    pe_in = fused_ops.rope_cache_write(q_in, kv, w, 1e-6, cos, sin, cache_in, slots, impl=impl)
    buf = torch.full((nh, t, lat + 2 * half), 7.0, dtype=torch.bfloat16)
    out = buf[..., lat:].transpose(0, 1)
    q0 = q.clone()
    pe = fused_ops.rope_cache_write(q, kv, w, 1e-6, cos, sin, cache, slots, impl=impl, q_pe_out=out)
    assert pe.data_ptr() == out.data_ptr() and torch.equal(out, pe_in)
    assert torch.equal(q, q0) and torch.equal(cache, cache_in) and (buf[..., :lat] == 7).all()


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("m,k,nl", [(1, 1, 1), (1, 8, 3), (37, 4, 5), (129, 8, 8), (50, 3, 40), (21, 8, 256),
                                    (512, 8, 8), (300, 8, 32)])
def test_group_pairs_is_the_static_grouping(impl, m, k, nl):
    """One-kernel grouping == counting sort + pair_rows + weight gather: odd sizes, a single token, pairs of
    other ranks / padding (-1), experts with no rows."""
    ids = torch.randint(-1, nl + 2, (m, k), generator=_g(m * k + nl))
    if nl > 2:
        ids[ids == 1] = 0          # expert 1 gets no rows
    if m > 2:
        ids[m // 2] = -1           # a padding token
    w = torch.rand(m, k, generator=_g(3))
    g, pairs, gw = moe_permute.group_pairs(ids, nl, w, impl=impl)
    ref = group_by_local_expert(ids, nl, static=True)
    assert torch.equal(g.order, ref.order) and torch.equal(g.rows, ref.rows) and torch.equal(g.valid, ref.valid)
    assert torch.equal(g.tokens_per_expert, ref.tokens_per_expert)
    assert torch.equal(pairs, pair_rows(ref, m, k))
    assert torch.equal(gw, torch.where(ref.valid, w.reshape(-1)[ref.order], torch.zeros(())))
    mine = (ids >= 0) & (ids < nl)
    assert int(g.tokens_per_expert.sum()) == int(mine.sum()) and bool((pairs[~mine] == -1).all())


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("ctx,nh,nope,v_dim,r", [(1, 1, 4, 4, 2), (7, 11, 12, 8, 6), (33, 16, 16, 16, 8)])
def test_mla_prefill_kv_is_concat_and_pad(impl, ctx, nh, nope, v_dim, r):
    kv = torch.randn(ctx, nh, nope + v_dim, generator=_g(ctx)).to(torch.bfloat16)
    pe_src = torch.randn(ctx, r + 5, generator=_g(nh)).to(torch.bfloat16)
    k_pe = pe_src[:, 5:]          # a strided view, as the cache rows give it
    k, v = fused_ops.mla_prefill_kv(kv, k_pe, v_dim, impl=impl)
    rk, rv = fused_ops.mla_prefill_kv_ref(kv, k_pe, v_dim)
    assert torch.equal(k, rk) and torch.equal(v, rv)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_gemm_and_selection_kernels(dtype):
    """The router's split-K gate GEMM (fp32 partials over fixed K slices) and the selection kernel that sums
    them in slice order: the logits are the fp32 product, the selection is route_ref's on those logits, and a
    token's result does not depend on the batch around it (odd H: a ragged last K block; T across tiles)."""
    t, h, e = 70, 600, 64
    x = torch.randn(t, h, generator=_g(11)).to(dtype)
    w = (torch.randn(e, h, generator=_g(12)) * 0.05).to(dtype)
    bias = torch.randn(e, generator=_g(13)) * 0.1
    p = fused_ops.gate_partials(x, w)
    assert p.shape == (fused_ops.gate_slices(h), t, e) and p.shape[0] == 2
    logits = p[0].clone()
    for part in p[1:]:
        logits += part   # the selection kernel's summation order
    torch.testing.assert_close(logits, x.float() @ w.float().t(), rtol=1e-5, atol=1e-5)
    assert fused_ops.gate_route_applies(x, w, 4, 4, impl="triton")
    assert not fused_ops.gate_route_applies(x, w, 4, 4)   # auto: CUDA bf16 only
    ids, wt = fused_ops.gate_route(x, w, bias, 4, 4, 2, True, 2.5)
    rid, rw = fused_ops.route_ref(logits, bias, 4, 4, 2, True, 2.5)
    a, oa = ids.sort(1)
    b, ob = rid.sort(1)
    assert torch.equal(a, b)
    torch.testing.assert_close(wt.gather(1, oa), rw.gather(1, ob))
    # (the interpreter's tl.dot is a numpy matmul whose rounding may depend on the rows beside; on the GPU a
    # row's MMA results do not, and the device check compares bits)
    for lo, hi in [(0, 1), (65, 70), (3, 10)]:
        sid, sw = fused_ops.gate_route(x[lo:hi], w, bias, 4, 4, 2, True, 2.5)
        assert torch.equal(sid, ids[lo:hi])
        torch.testing.assert_close(sw, wt[lo:hi], rtol=1e-6, atol=1e-6)
