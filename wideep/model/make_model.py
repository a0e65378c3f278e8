"""Write a real HF-format DeepSeek-V3 checkpoint with random weights from a fixed seed.

Presets: `tiny` (CPU tests and the local default stack) and `layer-slice` (DeepSeek-R1's full width with
1 dense + N MoE layers, for GPU benchmarks). The output loads in transformers, in wideep, and its
tokenizer in `transformers.AutoTokenizer`, exactly like a downloaded DeepSeek-R1 directory.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .fp8 import quantize_block_fp8
from .make_tokenizer import R1_TOKENS, SPECIAL_TOKENS, write_tokenizer

YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
FP8_QUANT_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        max_position_embeddings=163840, rope_scaling=dict(YARN),
    ),
    "layer-slice": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        max_position_embeddings=163840, rope_scaling=dict(YARN),
    ),
}
# Names whose `.weight` DeepSeek stores in FP8 (all attention and MLP projections; not norms, router, embeddings, head).
_FP8_LINEARS = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj")
_POOL_THRESHOLD = 1 << 22
LM_HEAD_GAIN = 3.0  # logit std ~3 for a unit-RMS hidden state (see _peaky_lm_head)


def preset_config(preset: str, **overrides: Any) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    fields = dict(PRESETS[preset])
    num_moe_layers = overrides.pop("num_moe_layers", None)
    fields.update(overrides)
    if num_moe_layers is not None:
        fields["num_hidden_layers"] = fields["first_k_dense_replace"] + int(num_moe_layers)
    return ModelConfig(**fields, torch_dtype="bfloat16")


def tensor_specs(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every tensor in HF order; kind picks the init: linear/norm/embed/bias."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    yield "model.embed_tokens.weight", (cfg.vocab_size, h), "embed"
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (h,), "norm"
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is None:
            yield f"{a}.q_proj.weight", (nh * cfg.qk_head_dim, h), "linear"
        else:
            yield f"{a}.q_a_proj.weight", (cfg.q_lora_rank, h), "linear"
            yield f"{a}.q_a_layernorm.weight", (cfg.q_lora_rank,), "norm"
            yield f"{a}.q_b_proj.weight", (nh * cfg.qk_head_dim, cfg.q_lora_rank), "linear"
        yield f"{a}.kv_a_proj_with_mqa.weight", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h), "linear"
        yield f"{a}.kv_a_layernorm.weight", (cfg.kv_lora_rank,), "norm"
        yield f"{a}.kv_b_proj.weight", (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank), "linear"
        yield f"{a}.o_proj.weight", (h, nh * cfg.v_head_dim), "linear"
        yield f"{p}.post_attention_layernorm.weight", (h,), "norm"
        m = f"{p}.mlp"
        if cfg.is_moe_layer(i):
            inter = cfg.moe_intermediate_size
            yield f"{m}.gate.weight", (cfg.n_routed_experts, h), "linear"
            yield f"{m}.gate.e_score_correction_bias", (cfg.n_routed_experts,), "bias"
            for e in range(cfg.n_routed_experts):
                yield f"{m}.experts.{e}.gate_proj.weight", (inter, h), "linear"
                yield f"{m}.experts.{e}.up_proj.weight", (inter, h), "linear"
                yield f"{m}.experts.{e}.down_proj.weight", (h, inter), "linear"
            si = inter * cfg.n_shared_experts
            yield f"{m}.shared_experts.gate_proj.weight", (si, h), "linear"
            yield f"{m}.shared_experts.up_proj.weight", (si, h), "linear"
            yield f"{m}.shared_experts.down_proj.weight", (h, si), "linear"
        else:
            yield f"{m}.gate_proj.weight", (cfg.intermediate_size, h), "linear"
            yield f"{m}.up_proj.weight", (cfg.intermediate_size, h), "linear"
            yield f"{m}.down_proj.weight", (h, cfg.intermediate_size), "linear"
    yield "model.norm.weight", (h,), "norm"
    yield "lm_head.weight", (cfg.vocab_size, h), "linear"


class _RandomSource:
    """Deterministic random weights from a seed.

    Small tensors are exact randn draws. R1-width slices hold tens of billions of values (drawing and
    FP8-quantizing each would take many minutes), so big tensors are stacks of 128-row windows of one
    random pool per (kind, in_features); the pool is rounded to bf16 and block-quantized to FP8 once, so
    an FP8 weight is a slice of the quantized pool (exact 128x128 blocks) and its bf16 twin the same
    slice of the bf16 pool.
    """

    POOL_ROWS = 8192

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self._pools: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def uses_pool(self, shape: tuple[int, ...], kind: str) -> bool:
        return len(shape) == 2 and math.prod(shape) > _POOL_THRESHOLD and shape[1] % 128 == 0 and kind in ("linear", "embed")

    def _pool(self, kind: str, cols: int, fp8: bool) -> dict[str, torch.Tensor]:
        key = (kind, cols)
        if key not in self._pools:
            w = torch.randn(self.POOL_ROWS, cols, generator=self.gen)
            if kind == "linear":
                w /= math.sqrt(cols)
            self._pools[key] = {"bf16": w.to(torch.bfloat16)}
        pool = self._pools[key]
        if fp8 and "fp8" not in pool:
            pool["fp8"], pool["scale"] = quantize_block_fp8(pool["bf16"])
        return pool

    def pooled(self, shape: tuple[int, int], kind: str, fp8: bool) -> dict[str, torch.Tensor]:
        """{'bf16': w} or {'fp8': q, 'scale': scale_inv} for a big 2-D tensor."""
        rows, cols = shape
        pool = self._pool(kind, cols, fp8)
        n_windows = self.POOL_ROWS // 128
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in (("fp8", "scale") if fp8 else ("bf16",))}
        done = 0
        while done < rows:
            take_blocks = min(-(-(rows - done) // 128), n_windows)
            start = int(torch.randint(0, n_windows - take_blocks + 1, (1,), generator=self.gen)) * 128
            take = min(rows - done, take_blocks * 128)
            if fp8:
                parts["fp8"].append(pool["fp8"][start : start + take])
                parts["scale"].append(pool["scale"][start // 128 : start // 128 + take_blocks])
            else:
                parts["bf16"].append(pool["bf16"][start : start + take])
            done += take
        return {k: torch.cat(v).contiguous() if len(v) > 1 else v[0].clone() for k, v in parts.items()}

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen)


def _init(src: _RandomSource, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    if kind == "embed":
        return src.normal(shape)
    if kind == "linear":
        return src.normal(shape) / math.sqrt(shape[-1])
    if kind == "norm":
        return 1.0 + 0.2 * (torch.rand(shape, generator=src.gen) - 0.5)
    if kind == "bias":  # non-zero so selection (biased) and weighting (unbiased) really differ
        return 0.1 * torch.randn(shape, generator=src.gen)
    raise ValueError(kind)


def _peaky_lm_head(w: torch.Tensor) -> torch.Tensor:
    """Random weights give near-flat logits, so sampling at temperature 1 would pick one of the special
    tokens (which decode to no text) about 0.15% of the time (or R1's think/tool-call markers), and clients that count tokens by
    re-tokenizing the text (inference-perf) would see mismatches. Logits with a spread like a trained
    model's (std ~3) and zero rows for the special tokens make that practically impossible."""
    w = w.float() * LM_HEAD_GAIN
    w[: len(SPECIAL_TOKENS)] = 0
    w[-len(R1_TOKENS):] = 0   # reasoning/tool-call markers: only a forced output emits them
    return w.to(torch.bfloat16)


def _is_fp8_weight(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _FP8_LINEARS


def make_model(
    preset: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    fp8: bool = False,
    shard_size_bytes: int = 4 << 30,
    progress: bool = False,
    **overrides: Any,
) -> Path:
    """Write the checkpoint; overrides are config fields (q_lora_rank=None, first_k_dense_replace=2, ...)
    or num_moe_layers (layers = first_k_dense_replace + num_moe_layers)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = preset_config(preset, **overrides)
    if fp8:
        cfg.quantization_config = dict(FP8_QUANT_CONFIG)
    cfg.validate(f"preset {preset}")
    block = tuple(FP8_QUANT_CONFIG["weight_block_size"])

    for old in out.glob("*.safetensors"):
        old.unlink()
    src = _RandomSource(seed)
    specs = list(tensor_specs(cfg))
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    tmp_names: list[str] = []
    weight_map: dict[str, int] = {}
    total = 0

    def flush() -> None:
        nonlocal shard_bytes
        name = f"shard-{len(tmp_names):05d}.tmp"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        tmp_names.append(name)
        shards[-1] = {}
        shard_bytes = 0

    for k, (name, shape, kind) in enumerate(specs):
        quantize = fp8 and _is_fp8_weight(name)
        if src.uses_pool(shape, kind):
            got = src.pooled(shape, kind, quantize)
            tensors = {name: got["fp8"], name + "_scale_inv": got["scale"]} if quantize else {name: got["bf16"]}
        elif kind == "bias":
            tensors = {name: _init(src, shape, kind).float()}
        elif quantize:
            value = _init(src, shape, kind)
            q, scale = quantize_block_fp8(value.to(torch.bfloat16), block)
            tensors = {name: q, name + "_scale_inv": scale}
        else:
            tensors = {name: _init(src, shape, kind).to(torch.bfloat16)}
        if name == "lm_head.weight":
            tensors[name] = _peaky_lm_head(tensors[name])
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if shard_bytes and shard_bytes + size > shard_size_bytes:
            flush()
        for n, t in tensors.items():
            shards[-1][n] = t.contiguous()
            weight_map[n] = len(tmp_names)
        shard_bytes += size
        total += size
        if progress and k % 200 == 0:
            print(f"  {k}/{len(specs)} tensors, {total / 1e9:.1f} GB", flush=True)
    flush()

    n = len(tmp_names)
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, fin in zip(tmp_names, final):
        (out / tmp).rename(out / fin)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    hf = cfg.to_dict()
    hf.update(use_cache=True, attention_dropout=0.0, transformers_version="4.46.3")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
         "do_sample": True, "temperature": 0.6, "top_p": 0.95}, indent=2) + "\n")
    vocab = write_tokenizer(out, cfg.vocab_size)
    assert vocab == cfg.vocab_size
    return out
