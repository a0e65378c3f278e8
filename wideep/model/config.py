"""ModelConfig: the HF `config.json` fields of a DeepSeek-V3 checkpoint that the model needs.

Read from the checkpoint directory exactly as transformers reads it, so both see one architecture.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wideep.errors import WideepError

SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_MODEL_TYPES = ("deepseek_v3",)


class CheckpointError(WideepError, ValueError):
    """A checkpoint directory is unusable; the message names the file and the tensor or field."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    num_nextn_predict_layers: int = 0
    initializer_range: float = 0.02
    torch_dtype: str = "bfloat16"
    quantization_config: dict[str, Any] | None = None
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    model_type: str = "deepseek_v3"

    # ---- derived -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Elements per token per layer in the latent cache: normalized c_kv ‖ rope'd k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def fp8_block_size(self) -> tuple[int, int] | None:
        q = self.quantization_config
        if not q or q.get("quant_method") != "fp8":
            return None
        block = q.get("weight_block_size") or [128, 128]
        return int(block[0]), int(block[1])

    # ---- (de)serialization ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        d = dict(d)
        archs = d.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise CheckpointError(
                f"{source}: unsupported architecture {archs!r} (field 'architectures'); "
                f"wideep supports {list(SUPPORTED_ARCHITECTURES)}"
            )
        if d.get("model_type", "deepseek_v3") not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(f"{source}: unsupported model_type {d.get('model_type')!r} (field 'model_type')")
        # transformers >= 5 writes rope settings as `rope_parameters` (theta inside); older files use rope_scaling.
        rp = d.pop("rope_parameters", None)
        if rp and not d.get("rope_scaling"):
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.get("rope_type", rp.get("type", "default"))
            d["rope_scaling"] = None if kind == "default" else rp
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d["dtype"]
        known = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        cfg.validate(source)
        return cfg

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        f = Path(path) / "config.json"
        if not f.is_file():
            raise CheckpointError(f"{f}: not found (a checkpoint directory needs config.json)")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{f}: invalid JSON ({exc})") from exc
        return cls.from_dict(d, source=str(f))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d

    def validate(self, source: str = "config.json") -> None:
        def bad(name: str, why: str) -> CheckpointError:
            return CheckpointError(f"{source}: field '{name}' {why}")

        if self.topk_method != "noaux_tc":
            raise bad("topk_method", f"is {self.topk_method!r}; wideep implements DeepSeek-V3's noaux_tc")
        if self.scoring_func != "sigmoid":
            raise bad("scoring_func", f"is {self.scoring_func!r}; wideep implements DeepSeek-V3's sigmoid")
        if self.hidden_act != "silu":
            raise bad("hidden_act", f"is {self.hidden_act!r}; only silu is supported")
        if self.n_routed_experts and self.n_routed_experts % max(self.n_group, 1):
            raise bad("n_group", f"({self.n_group}) must divide n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts and self.topk_group > self.n_group:
            raise bad("topk_group", f"({self.topk_group}) must be <= n_group ({self.n_group})")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even")
