"""q_a_proj ‖ kv_a_proj_with_mqa stacked into one projection: the stacked GEMM equals the two separate ones
(bf16 bit for bit; FP8 over the same quantized activations, the Triton kernel under the interpreter too),
the prefill per-part path equals the decode one, and the loader stacks a checkpoint's two tensors."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from wideep.model import fp8_triton
from wideep.model.config import ModelConfig
from wideep.model.fp8 import (
    CUBLAS_MIN_ROWS,
    Fp8Linear,
    act_quant_ref,
    dequant_act,
    dequant_rows,
    quantize_block_fp8,
    scale_row_index,
)
from wideep.model.loader import load_model
from wideep.model.make_model import PRESETS
from wideep.model.mla import MLAttention

# q_lora 64 is not a whole 128-row block: the stacked weight keeps each part's own scale blocks
PARTS = [(64, 80), (1536 // 8, 576 // 8), (256, 72)]


def _stacked(parts, k, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [quantize_block_fp8(torch.randn(r, k, generator=g) * 0.05) for r in parts]
    lin = Fp8Linear(k, sum(parts), parts=parts)
    lin.weight.data = torch.cat([w for w, _ in ws])
    lin.weight_scale_inv.data = torch.cat([s for _, s in ws])
    return lin, ws


@pytest.mark.parametrize("parts", PARTS, ids=str)
@pytest.mark.parametrize("m", [1, 7])
def test_fp8_stacked_equals_separate(parts, m):
    k = 300
    lin, ws = _stacked(parts, k, m)
    assert lin.weight_scale_inv.shape == (sum(-(-r // 128) for r in parts), 3)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(9)) * 3
    outs = lin.forward_parts(x)
    assert [o.shape[-1] for o in outs] == list(parts)
    q, s = act_quant_ref(x)
    for o, (w, sc), r in zip(outs, ws, parts):
        sep = Fp8Linear(k, r)
        sep.weight.data, sep.weight_scale_inv.data = w, sc
        ref = sep(x)
        # the same quantized activations times the same dequantized rows: equal up to the matmul's blocking
        torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
        exact = dequant_act(q, s) @ dequant_rows(w, sc, scale_row_index([r], 128)).t()
        torch.testing.assert_close(o, exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())


def test_fp8_prefill_parts_equal_decode_path():
    """At >= CUBLAS_MIN_ROWS rows each part runs as its own GEMM (cuBLAS takes the 128-aligned ones on a GPU);
    the reference path gives the same values as the one stacked GEMM."""
    lin, _ = _stacked((64, 80), 256, 3)
    x = torch.randn(CUBLAS_MIN_ROWS, 256, generator=torch.Generator().manual_seed(4))
    big = lin.forward_parts(x)
    small = [torch.cat(p) for p in zip(*(lin.forward_parts(x[i:i + 256]) for i in range(0, CUBLAS_MIN_ROWS, 256)))]
    for a, b in zip(big, small):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.mark.skipif(not fp8_triton.available(), reason="triton not installed")
def test_triton_stacked_gemm_equals_separate():
    """The kernel over the stacked weight (per-row scale index) gives each part's columns bit for bit as the
    part's own GEMM, for the same config."""
    k, parts = 300, (64, 80)
    lin, ws = _stacked(parts, k, 5)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(6))
    q, s = fp8_triton.act_quant(x)
    for cfg in (fp8_triton.GemmConfig(16, 64, 4, 1), fp8_triton.GemmConfig(16, 64, 4, 1, 2, True, False, True)):
        y = fp8_triton.fp8_gemm(q, s, lin.weight, lin.weight_scale_inv, lin.scale_row, torch.float32, cfg)
        for part, (w, sc), r0 in zip(y.split(parts, -1), ws, (0, parts[0])):
            sep = fp8_triton.fp8_gemm(q, s, w, sc, scale_row_index([w.shape[0]], 128), torch.float32, cfg)
            assert torch.equal(part, sep), (cfg, r0)


def test_bf16_stacked_equals_separate():
    cfg = ModelConfig(**{**PRESETS["tiny"], "num_hidden_layers": 1})
    attn = MLAttention(cfg, 0).to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(attn.fused_qkv_a_proj.weight.shape, generator=g).to(torch.bfloat16) * 0.05
    attn.fused_qkv_a_proj.weight.data = w
    x = torch.randn(5, cfg.hidden_size, generator=g).to(torch.bfloat16)
    q_a, kv = attn.fused_qkv_a_proj.forward_parts(x)
    wq, wkv = w.split(attn.fused_qkv_a_proj.parts)
    assert torch.equal(q_a, torch.nn.functional.linear(x, wq))
    assert torch.equal(kv, torch.nn.functional.linear(x, wkv))


@pytest.mark.parametrize("variant", ["fp8", "bf16"])
def test_loader_stacks_q_a_and_kv_a(variant, variant_dir):
    d = variant_dir(variant)
    model = load_model(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]

    def read(name):
        with safe_open(str(d / index[name]), framework="pt") as f:
            return f.get_tensor(name)

    attn = model.model.layers[1].self_attn
    pre = "model.layers.1.self_attn"
    names = ["weight"] + (["weight_scale_inv"] if variant == "fp8" else [])
    for suffix in names:
        got = getattr(attn.fused_qkv_a_proj, suffix)
        want = torch.cat([read(f"{pre}.q_a_proj.{suffix}"), read(f"{pre}.kv_a_proj_with_mqa.{suffix}")])
        assert got.dtype == want.dtype or variant == "bf16"
        assert torch.equal(got.view(torch.uint8) if variant == "fp8" and suffix == "weight" else got.float(),
                           want.view(torch.uint8) if variant == "fp8" and suffix == "weight" else want.float())
    if variant == "fp8":
        assert attn.fused_qkv_a_proj.parts == (model.config.q_lora_rank,
                                               model.config.kv_lora_rank + model.config.qk_rope_head_dim)



def test_loader_stacks_a_bias(tiny_model_dir, tmp_path):
    """attention_bias (not in R1; allowed without FP8): the stacked projection's bias is the two biases
    stacked. The tiny checkpoint plus a shard of attention biases."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "bias"
    shutil.copytree(tiny_model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["attention_bias"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(8)
    sizes = {"q_a_proj": cfg["q_lora_rank"], "kv_a_proj_with_mqa": cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"],
             "o_proj": cfg["hidden_size"]}
    biases = {f"model.layers.{i}.self_attn.{n}.bias": torch.randn(r, generator=g)
              for i in range(cfg["num_hidden_layers"]) for n, r in sizes.items()}
    save_file(biases, str(d / "biases.safetensors"))
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"].update({k: "biases.safetensors" for k in biases})
    index_path.write_text(json.dumps(index))
    model = load_model(d)
    pre = "model.layers.1.self_attn"
    want = torch.cat([biases[f"{pre}.q_a_proj.bias"], biases[f"{pre}.kv_a_proj_with_mqa.bias"]])
    assert torch.equal(model.model.layers[1].self_attn.fused_qkv_a_proj.bias, want)
