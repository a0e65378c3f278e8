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
from .make_tokenizer import write_tokenizer

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
    """Deterministic values: exact randn for small tensors; windows of a shared random pool for big ones
    (R1-width slices hold tens of billions of values; drawing each one would take many minutes)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self._pool: torch.Tensor | None = None

    def normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        if n <= _POOL_THRESHOLD:
            return torch.randn(shape, generator=self.gen)
        if self._pool is None:
            self._pool = torch.randn(1 << 24, generator=self.gen)
        pool = self._pool
        out = torch.empty(n)
        filled = 0
        while filled < n:
            off = int(torch.randint(0, pool.numel(), (1,), generator=self.gen))
            take = min(n - filled, pool.numel() - off)
            out[filled : filled + take] = pool[off : off + take]
            filled += take
        return out.view(shape)


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
        value = _init(src, shape, kind)
        if kind == "bias":
            tensors = {name: value.float()}
        elif fp8 and _is_fp8_weight(name):
            q, scale = quantize_block_fp8(value.to(torch.bfloat16), block)
            tensors = {name: q, name + "_scale_inv": scale}
        else:
            tensors = {name: value.to(torch.bfloat16)}
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
