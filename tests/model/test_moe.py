"""Routed experts: grouped GEMM implementations, local dispatch/combine, and the expert_map (EPLB) hook."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wideep.model.loader import load_model
from wideep.model.moe import grouped_mlp
from wideep.model.local_dispatch import LocalDispatcher


def _experts(e=5, h=32, i=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, 2 * i, h, generator=g) / 6, torch.randn(e, h, i, generator=g) / 4


def _naive_moe(x, topk_ids, topk_w, w13, w2):
    """Token by token, expert by expert: the definition."""
    out = torch.zeros_like(x)
    inter = w2.shape[-1]
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            e = int(topk_ids[t, k])
            h = w13[e] @ x[t]
            out[t] += topk_w[t, k] * (w2[e] @ (F.silu(h[:inter]) * h[inter:]))
    return out


@pytest.mark.parametrize("impl", ["loop", "grouped_mm"])
def test_dispatch_grouped_gemm_combine_equals_definition(impl):
    if impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    w13, w2 = _experts()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 32, generator=g)
    topk_ids = torch.stack([torch.randperm(5, generator=g)[:3] for _ in range(9)])
    topk_ids[:, 0] = 2  # an expert every token hits, and expert 4 maybe none
    topk_ids[topk_ids == 4] = 1
    topk_w = torch.rand(9, 3, generator=g)
    d = LocalDispatcher(num_experts=5)
    r = d.dispatch(x, topk_ids, topk_w)
    assert r.tokens_per_expert.tolist() == [int((topk_ids == e).sum()) for e in range(5)]
    y = grouped_mlp(r.x, w13, w2, r.tokens_per_expert, impl=impl) * r.weights[:, None]
    out = d.combine(y, r)
    torch.testing.assert_close(out, _naive_moe(x, topk_ids, topk_w, w13, w2), rtol=1e-5, atol=1e-5)


def test_grouped_mm_ignores_padding_rows():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not in this torch")
    w13, w2 = _experts()
    x = torch.randn(12, 32)
    counts = torch.tensor([2, 0, 3, 1, 2])  # 8 real rows, 4 padding rows
    a = grouped_mlp(x, w13, w2, counts, impl="grouped_mm")
    b = grouped_mlp(x, w13, w2, counts, impl="loop")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert a[8:].abs().max() == 0


def test_auto_impl_uses_loop_on_cpu(monkeypatch):
    calls = []
    real = torch._grouped_mm if hasattr(torch, "_grouped_mm") else None
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k), raising=False)
    w13, w2 = _experts()
    grouped_mlp(torch.randn(4, 32), w13, w2, torch.tensor([1, 1, 1, 1, 0]))
    assert calls == []  # CPU float32: the per-expert loop (grouped_mm is for CUDA bf16)


@torch.no_grad()
def test_expert_map_hook_with_permuted_physical_slots(tiny_model_dir, paged_runner):
    """Load experts into a permuted physical order and route through expert_map: same logits, and the
    hook sees every routed (token, expert) pair - the seam EPLB plugs into."""
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3)).tolist()  # slot s holds logical perm[s]
    base = load_model(tiny_model_dir)
    permuted = load_model(tiny_model_dir, local_expert_ids=lambda layer: perm)
    logical_to_slot = torch.empty(16, dtype=torch.long)
    logical_to_slot[torch.tensor(perm)] = torch.arange(16)
    load = torch.zeros(16, dtype=torch.long)

    def expert_map(topk_ids):
        phys = logical_to_slot[topk_ids]
        load.add_(torch.bincount(phys.reshape(-1), minlength=16))
        return phys

    for moe in permuted.moe_layers():
        moe.expert_map = expert_map
    ids = torch.randint(6, 4096, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    (a,) = paged_runner(base).step([(0, ids)])
    (b,) = paged_runner(permuted).step([(0, ids)])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(load.sum()) == 3 * 10 * 4  # MoE layers x tokens x top-k


def test_ep_rank_loads_only_its_slice(tiny_model_dir):
    class FakeEP(LocalDispatcher):  # loading only; never run
        pass

    m = load_model(tiny_model_dir, dispatcher=FakeEP(16, ep_rank=1, ep_size=4), ep_rank=1, ep_size=4)
    full = load_model(tiny_model_dir)
    w = m.model.layers[2].mlp.experts.stacked_tensors()[0]
    assert w.shape[0] == 4
    torch.testing.assert_close(w, full.model.layers[2].mlp.experts.stacked_tensors()[0][4:8])
    # the fused shared expert (slot 0) is the same on every rank
    torch.testing.assert_close(m.model.layers[2].mlp.experts.w13[0], full.model.layers[2].mlp.experts.w13[0])
    with pytest.raises(ValueError, match="dispatcher"):
        load_model(tiny_model_dir, ep_rank=1, ep_size=4)
