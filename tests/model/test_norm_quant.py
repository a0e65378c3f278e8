"""RMSNorm fused with the next FP8 projection's activation quantization (fused_ops.rms_norm_quant): its codes
and scales equal the unfused pair's (rms_norm, then act_quant) bit for bit - odd widths, a single token, padded
rows, a residual, a strided view - and a norm handing Fp8Rows to q_a ‖ kv_a and q_b gives the projections the
same bits as the unfused path (Triton kernels under the interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

from wideep.model import fp8, fp8_triton, fused_ops
from wideep.model.config import ModelConfig
from wideep.model.fp8 import Fp8Linear, Fp8Rows, act_quant_ref, quantize_block_fp8
from wideep.model.layers import RMSNorm
from wideep.model.make_model import PRESETS
from wideep.model.mla import MLAttention

pytestmark = pytest.mark.skipif(fused_ops.triton is None, reason="triton not installed")


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,d,pad,res,strided", [(1, 7168, 1, True, False), (7, 200, 16, True, False),
                                                 (5, 1536, 1, False, True), (3, 64, 16, False, False),
                                                 (16, 384, 16, True, True)])
def test_norm_quant_equals_norm_then_act_quant(dtype, m, d, pad, res, strided):
    x = (torch.randn(m, d + (40 if strided else 0), generator=_g(d)) * 3).to(dtype)[:, :d]
    r = torch.randn(m, d, generator=_g(m)).to(dtype) if res else None
    w = (torch.rand(d, generator=_g(7)) + 0.5).to(dtype)
    out = fused_ops.rms_norm_quant(x, w, 1e-6, r, pad_rows=pad, impl="triton")
    normed = fused_ops.rms_norm(x, w, 1e-6, r, impl="triton")
    if res:
        normed, s_ref = normed
        assert torch.equal(out[2], s_ref)
    q_ref, s_ref = fp8_triton.act_quant(normed, pad)
    q, s = out[:2]
    mp = -(-m // pad) * pad
    assert q.shape == (mp, d) and s.shape == (mp, -(-d // 128)) and s.stride() == (1, mp)
    assert torch.equal(q[:m].view(torch.uint8), q_ref[:m].view(torch.uint8))
    assert torch.equal(s[:m], s_ref[:m])
    # and the scales are the torch references' (the interpreter's float -> e4m3 cast is not the device's, so the
    # codes are compared with the unfused kernels above, not with torch's)
    _, sr = act_quant_ref(fused_ops.rms_norm_ref(x if r is None else x + r, w, 1e-6))
    torch.testing.assert_close(s[:m], sr, rtol=1e-5 if dtype == torch.float32 else 3e-2, atol=0)


def test_norm_quant_rejects_what_it_cannot_run():
    x = torch.randn(3, 8)
    with pytest.raises(ValueError):
        fused_ops.rms_norm_quant(x, torch.ones(8, dtype=torch.float64), 1e-6, impl="triton")
    assert not RMSNorm(8).quant_applies(x)   # CPU: the unfused path


def _fp8_attention(cfg: ModelConfig, seed: int) -> MLAttention:
    attn = MLAttention(cfg, 0, (128, 128))
    g = _g(seed)
    for mod in attn.modules():
        if isinstance(mod, Fp8Linear):
            w, s = quantize_block_fp8(torch.randn(mod.weight.shape, generator=g) * 0.05)
            mod.weight.data, mod.weight_scale_inv.data = w, s.repeat(1, 1)[: mod.weight_scale_inv.shape[0]]
        elif isinstance(mod, RMSNorm):
            mod.weight.data = torch.rand(mod.weight.shape, generator=g) + 0.5
    return attn


@pytest.mark.parametrize("t", [1, 5])
def test_projections_take_the_norms_rows_quantized(monkeypatch, t):
    """With the kernels on (as on a GPU), the input norm's Fp8Rows into q_a ‖ kv_a and the q_a norm's into q_b
    give q_a, kv and q bit for bit as norm -> act_quant -> GEMM; the fused path is the one taken."""
    monkeypatch.setattr(fp8, "_use_kernels", lambda x: True)
    monkeypatch.setattr(fused_ops, "use_triton", lambda x, impl: impl != "torch")
    cfg = ModelConfig(**{**PRESETS["tiny"], "num_hidden_layers": 1, "q_lora_rank": 128})
    attn = _fp8_attention(cfg, 3)
    norm = RMSNorm(cfg.hidden_size)
    norm.weight.data = torch.rand(cfg.hidden_size, generator=_g(4)) + 0.5
    h = torch.randn(t, cfg.hidden_size, generator=_g(t)) * 2
    r = torch.randn(t, cfg.hidden_size, generator=_g(9))
    calls = []
    real = fused_ops.rms_norm_quant
    monkeypatch.setattr("wideep.model.layers.rms_norm_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    pad = attn.input_quant_pad(h)
    assert pad == 1 and norm.quant_applies(h)
    rows, s_fused = norm.add_norm(h, r, quant_pad=pad)
    assert isinstance(rows, Fp8Rows) and rows.rows == t
    q_a, kv = attn.fused_qkv_a_proj.forward_parts(rows)
    q = attn._q_b(q_a)
    assert len(calls) == 2
    x, s_plain = norm.add_norm(h, r)
    q_a2, kv2 = attn.fused_qkv_a_proj.forward_parts(x)
    q2 = attn.q_b_proj(attn.q_a_layernorm(q_a2))
    assert torch.equal(s_fused, s_plain)
    assert torch.equal(q_a, q_a2) and torch.equal(kv, kv2) and torch.equal(q, q2)
