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
