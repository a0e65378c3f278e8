"""FP8 e4m3 128x128 block checkpoints: dequantization on a known tensor, and an FP8 twin vs its bf16 source."""
from __future__ import annotations

import json

import torch

from wideep.model.fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_block_fp8
from wideep.model.loader import load_model


def test_dequantize_known_tensor():
    # 3 x 2 blocks of 2x2 over a 5x3 weight (partial blocks at the edges), every fp8 value exactly representable
    w = torch.tensor([[1.0, -2.0, 0.5], [4.0, 0.25, -1.0], [3.0, 2.0, 1.5], [-0.5, 8.0, 6.0], [1.0, 1.0, -3.0]])
    scale_inv = torch.tensor([[2.0, 10.0], [0.5, -1.0], [4.0, 0.125]])
    expected = torch.tensor([
        [2.0, -4.0, 5.0], [8.0, 0.5, -10.0],
        [1.5, 1.0, -1.5], [-0.25, 4.0, -6.0],
        [4.0, 4.0, -0.375],
    ])
    got = dequantize_block_fp8(w.to(FP8_DTYPE), scale_inv, block=(2, 2))
    assert torch.equal(got, expected)


def test_dequantize_rejects_mismatched_scale():
    w = torch.zeros(256, 256).to(FP8_DTYPE)
    try:
        dequantize_block_fp8(w, torch.ones(3, 2))
    except ValueError as exc:
        assert "(2, 2)" in str(exc)
    else:
        raise AssertionError("a scale of the wrong shape must be rejected")


def test_quantize_roundtrip_error_is_fp8_sized():
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(0))
    q, s = quantize_block_fp8(w)
    assert q.dtype == FP8_DTYPE and s.shape == (3, 2)
    back = dequantize_block_fp8(q, s)
    # e4m3 has 3 mantissa bits: relative error per element <= 2^-4 (plus subnormal floor)
    assert ((back - w).abs() <= w.abs() * 0.0625 + s.max() * 2**-9).all()


def test_fp8_checkpoint_matches_bf16_twin(variant_dir, paged_runner):
    fp8_dir, bf16_dir = variant_dir("fp8"), variant_dir("bf16")
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv" in index
    assert "model.layers.0.self_attn.kv_b_proj.weight_scale_inv" in index
    assert "model.embed_tokens.weight_scale_inv" not in index and "lm_head.weight_scale_inv" not in index

    fp8_model, bf16_model = load_model(fp8_dir, quantization="none"), load_model(bf16_dir)
    twin = dict(bf16_model.named_parameters())
    quantized = 0
    for name, w8 in fp8_model.named_parameters():
        w16 = twin[name]
        if torch.equal(w8, w16):
            continue
        quantized += 1
        # e4m3 round-to-nearest: <= 2^-4 relative, plus the subnormal step of the largest block scale
        bound = w16.abs() * 2**-4 + w16.abs().max() / 448 * 2**-9
        assert ((w8 - w16).abs() <= bound).all(), name
    # 4 attention weights (q_a ‖ kv_a stacked, q_b, kv_b, o) x 4 layers + dense MLP (3) + 3 MoE layers x
    # (w13, w2: the shared expert is stacked in slot 0 of the routed experts)
    assert quantized == 4 * 4 + 3 + 3 * 2

    # End to end, a random 4-layer MoE amplifies the ~2.6% weight error (and flips some routing choices),
    # so the logits agree in direction, not to 1e-4.
    ids = torch.randint(6, 4096, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    (a,) = paged_runner(fp8_model).step([(0, ids)])
    (b,) = paged_runner(bf16_model).step([(0, ids)])
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).mean() > 0.95
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.5
