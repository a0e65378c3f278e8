"""The shared expert fused into the routed grouped MLP (slot 0 of the stacked experts, fed this rank's own
tokens ahead of the dispatched rows) computes what the unfused layer does: combine(routed) + shared(x)."""
from __future__ import annotations

import pytest
import torch

from wideep.model import fp8_triton, moe as moe_mod
from wideep.model.config import ModelConfig
from wideep.model.deepseek_v3 import materialize
from wideep.model.fp8 import FP8_DTYPE, fp8_grouped_mlp
from wideep.model.layers import GatedMLP
from wideep.model.loader import load_model
from wideep.model.local_dispatch import LocalDispatcher
from wideep.model.make_model import FP8_QUANT_CONFIG, PRESETS
from wideep.model.moe import DeepseekV3MoE, RoutedExperts
from wideep.model.moe_permute import gather_sum, group_pairs, own_then
from wideep.parallel.allgather_dispatch import AllGatherReduceScatterDispatcher

needs_triton = pytest.mark.skipif(not fp8_triton.available(), reason="triton not installed")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _layer(fp8: bool, dtype=torch.bfloat16, n_shared=1, inter=None, hidden=None, seed=0, dispatcher=None):
    fields = dict(PRESETS["tiny"], n_shared_experts=n_shared)
    if inter:
        fields["moe_intermediate_size"] = inter
    if hidden:
        fields["hidden_size"] = hidden
    cfg = ModelConfig(**fields)
    if fp8:
        cfg.quantization_config = dict(FP8_QUANT_CONFIG)
    with torch.device("meta"):
        m = DeepseekV3MoE(cfg, 1, dispatcher or LocalDispatcher(cfg.n_routed_experts), cfg.n_routed_experts,
                          (128, 128) if fp8 else None)
    materialize(m, "cpu", dtype)
    g = _gen(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dtype == FP8_DTYPE:
                p.copy_(torch.randn(p.shape, generator=g).to(FP8_DTYPE))
            elif name.endswith("_scale_inv"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.02 + 0.01)
            else:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(dtype))
    return m.eval(), cfg


def _unfused(m: DeepseekV3MoE, x: torch.Tensor) -> torch.Tensor:
    """The unfused math with the same weights: routed experts through dispatch/combine, plus the shared slot
    as its own MLP."""
    ids, w = m.gate(x)
    r = m.dispatcher.dispatch(x, ids, w)
    return m.dispatcher.combine_weighted(m.experts(r.x, r.tokens_per_expert), r) + m.experts.shared(x)


@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_fused_layer_equals_unfused_bf16_exactly(tokens):
    m, cfg = _layer(fp8=False)
    assert m.shared_experts is None and m.experts.n_shared == 1 and m.experts.w13.shape[0] == cfg.n_routed_experts + 1
    x = (torch.randn(tokens, cfg.hidden_size, generator=_gen(tokens)) * 0.5).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m(x), _unfused(m, x))


def test_fused_layer_matches_gated_mlp_shared_expert():
    """The shared slot is the checkpoint's shared_experts MLP: gate ‖ up rows of w13[0], down = w2[0]."""
    m, cfg = _layer(fp8=False, dtype=torch.float32)
    ref = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size)
    i = cfg.moe_intermediate_size
    with torch.no_grad():
        ref.gate_proj.weight.copy_(m.experts.w13[0, :i])
        ref.up_proj.weight.copy_(m.experts.w13[0, i:])
        ref.down_proj.weight.copy_(m.experts.w2[0])
        x = torch.randn(5, cfg.hidden_size, generator=_gen(3))
        ids, w = m.gate(x)
        r = m.dispatcher.dispatch(x, ids, w)
        want = m.dispatcher.combine_weighted(m.experts(r.x, r.tokens_per_expert), r) + ref(x)
        torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)


def test_fused_layer_equals_unfused_fp8_reference_path():
    """FP8 on the CPU (dequantized reference path): the shared slot's rows get the same per-row math."""
    m, cfg = _layer(fp8=True)
    assert m.experts.w13.dtype == FP8_DTYPE and m.experts.w13_scale_inv.shape[0] == cfg.n_routed_experts + 1
    x = (torch.randn(6, cfg.hidden_size, generator=_gen(5)) * 0.5).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m(x), _unfused(m, x))


@pytest.mark.parametrize("n_shared,inter", [(0, None), (2, None)])
def test_other_shared_shapes_stay_unfused(n_shared, inter):
    m, cfg = _layer(fp8=False, n_shared=n_shared, inter=inter)
    assert m.experts.n_shared == 0 and m.experts.w13.shape[0] == cfg.n_routed_experts
    assert (m.shared_experts is None) == (n_shared == 0)
    x = torch.randn(4, cfg.hidden_size, generator=_gen(1)).to(torch.bfloat16)
    with torch.no_grad():
        m(x)
    with pytest.raises(ValueError):
        m.experts(x, torch.tensor([4] + [0] * cfg.n_routed_experts), with_shared=True)


def test_stacked_tensors_are_routed_views():
    """EPLB moves routed slots only; the views write through to the stacked parameters."""
    ex = RoutedExperts(3, 8, 4, n_shared=1).requires_grad_(False)
    torch.nn.init.zeros_(ex.w13)
    views = ex.stacked_tensors()
    assert [tuple(v.shape) for v in views] == [(3, 8, 8), (3, 8, 4)]
    views[0][2].fill_(1.0)
    assert ex.w13[3].eq(1).all() and ex.w13[:3].eq(0).all()
    with pytest.raises(ValueError):
        RoutedExperts(3, 8, 4, n_shared=2)


def test_own_rows_with_static_padding_layout():
    """Static (padded) layouts keep their padding at the end: own rows first, then grouped rows, then
    padding; the fused MLP leaves padding rows zero and the routed part equals the unfused one."""
    ids = torch.tensor([[0, 2], [-1, 2], [1, -1], [-1, -1]])  # -1: not this rank's (padding rows in static)
    g, pairs, w = group_pairs(ids, 3, torch.rand(4, 2, generator=_gen(0)))
    assert g.tokens_per_expert.tolist() == [1, 1, 2]
    x = torch.randn(4, 16, generator=_gen(1))
    rows = own_then(g.rows, 4)
    assert rows[:4].tolist() == [0, 1, 2, 3] and torch.equal(rows[4:], g.rows)
    ex = RoutedExperts(3, 16, 8, n_shared=1).requires_grad_(False)
    torch.nn.init.normal_(ex.w13, std=0.2)
    torch.nn.init.normal_(ex.w2, std=0.2)
    counts = torch.cat([torch.tensor([4]), g.tokens_per_expert])
    y = ex(x[rows], counts, with_shared=True)
    assert y.shape == (4 + 8, 16) and y[4 + 4:].abs().max() == 0   # 4 real routed rows, 4 padding rows
    torch.testing.assert_close(y[4:], ex(x[g.rows], g.tokens_per_expert), rtol=0, atol=0)
    torch.testing.assert_close(y[:4], ex.shared(x), rtol=0, atol=0)
    torch.testing.assert_close(gather_sum(y[4:], pairs, weights=w) + y[:4],
                               gather_sum(ex(x[g.rows], g.tokens_per_expert), pairs, weights=w) + ex.shared(x))


@pytest.mark.parametrize("static", [False, True])
def test_allgather_dispatch_with_own_single_rank(static):
    d = AllGatherReduceScatterDispatcher(8, static_shapes=static)
    x = torch.randn(5, 16, generator=_gen(2))
    ids = torch.randint(0, 8, (5, 2), generator=_gen(3))
    w = torch.rand(5, 2, generator=_gen(4))
    a, b = d.dispatch(x, ids, w), d.dispatch_with_own(x, ids, w)
    assert torch.equal(b.x[:5], x) and torch.equal(b.x[5:], a.x)
    assert torch.equal(a.tokens_per_expert, b.tokens_per_expert) and torch.equal(a.weights, b.weights)


@needs_triton
def test_triton_fused_grouped_mlp_equals_separate_groups():
    """The Triton grouped kernel (interpreter on CPU) with the shared slot as group 0 gives each row what the
    same kernel gives it in the routed-only call and in a one-group call (rows never see their neighbours),
    using the routed expert count's tile configs."""
    m, cfg = _layer(fp8=True, inter=128, hidden=256)
    ex = m.experts
    s13, s2 = ex._scale_rows()
    counts = torch.tensor([2, 0, 3] + [0] * (cfg.n_routed_experts - 3))
    x = (torch.randn(5 + 3, cfg.hidden_size, generator=_gen(6)) * 0.5).to(torch.bfloat16)
    own, routed = x[:3], x[3:]
    fused = fp8_grouped_mlp(x, ex.w13, ex.w13_scale_inv, s13, ex.w2, ex.w2_scale_inv, s2,
                            torch.cat([torch.tensor([3]), counts]), impl="triton", config_experts=ex.num_local)
    r13, r2, rs13, rs2 = ex.stacked_tensors()
    alone = fp8_grouped_mlp(routed, r13, rs13, s13, r2, rs2, s2, counts, impl="triton")
    shared = fp8_grouped_mlp(own, ex.w13[:1], ex.w13_scale_inv[:1], s13, ex.w2[:1], ex.w2_scale_inv[:1], s2,
                             torch.tensor([3]), impl="triton", config_experts=ex.num_local)
    assert torch.equal(fused[3:], alone) and torch.equal(fused[:3], shared)


@pytest.mark.parametrize("variant", ["bf16", "fp8"])
def test_checkpoint_fused_equals_unfused_load(variant, variant_dir, paged_runner, monkeypatch):
    """A checkpoint's shared_experts.* land in slot 0 of the stacked experts (FP8 block scales too) and the
    model's logits equal those of the unfused model loaded from the same files."""
    d = variant_dir(variant)
    fused = load_model(d)
    layer = fused.moe_layers()[0]
    assert layer.shared_experts is None and layer.experts.n_shared == 1
    monkeypatch.setattr(moe_mod, "fuse_shared_expert", lambda cfg: False)
    plain = load_model(d)
    ref = plain.moe_layers()[0]
    assert ref.shared_experts is not None and ref.experts.n_shared == 0
    i = ref.experts.inter
    if variant == "fp8":
        assert torch.equal(layer.experts.w13[0, :i].view(torch.uint8), ref.shared_experts.gate_proj.weight.view(torch.uint8))
        assert torch.equal(layer.experts.w2_scale_inv[0], ref.shared_experts.down_proj.weight_scale_inv)
        assert torch.equal(layer.experts.w13_scale_inv[0, -(-i // 128):],
                           ref.shared_experts.up_proj.weight_scale_inv)
    else:
        assert torch.equal(layer.experts.w13[0, i:], ref.shared_experts.up_proj.weight)
        assert torch.equal(layer.experts.w2[0], ref.shared_experts.down_proj.weight)
    assert torch.equal(layer.experts.stacked_tensors()[0], ref.experts.w13)
    ids = torch.randint(6, 4096, (9,), generator=_gen(4)).tolist()
    (a,) = paged_runner(fused).step([(0, ids)])
    (b,) = paged_runner(plain).step([(0, ids)])
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
