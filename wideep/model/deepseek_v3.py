"""DeepseekV3ForCausalLM over a flat token batch and a paged latent KV cache.

Module names mirror the HF checkpoint (model.layers.i.self_attn.q_a_proj ...), so loading is a name match;
the one exception is routed experts, stacked per rank into mlp.experts.w13 / w2.
"""
from __future__ import annotations

import torch
from torch import nn

from wideep.model.dispatch import MoEDispatcher

from .attention import AttentionMetadata
from .config import ModelConfig
from .layers import GatedMLP, RMSNorm
from .mla import MLAttention
from .moe import DeepseekV3MoE
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dispatcher: MoEDispatcher | None, num_local_experts: int):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = DeepseekV3MoE(config, layer_idx, dispatcher, num_local_experts)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, attn: AttentionMetadata, kv_cache: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, attn, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig, dispatcher: MoEDispatcher | None, num_local_experts: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dispatcher, num_local_experts) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dispatcher: MoEDispatcher | None = None, num_local_experts: int | None = None):
        super().__init__()
        if dispatcher is None:
            from wideep.model.local_dispatch import LocalDispatcher

            dispatcher = LocalDispatcher(config.n_routed_experts)
        self.config = config
        self.dispatcher = dispatcher
        self.num_local_experts = num_local_experts if num_local_experts is not None else dispatcher.num_local_experts
        self.model = DeepseekV3Model(config, dispatcher, self.num_local_experts)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def kv_cache_dim(self) -> int:
        return self.config.kv_cache_dim

    def moe_layers(self) -> list[DeepseekV3MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, DeepseekV3MoE)]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """input_ids/positions [T] -> final-normed hidden states [T, H]; writes new latents into kv_caches."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb.cos_sin(positions, h.dtype)
        for layer, cache in zip(self.model.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, attn, cache)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
