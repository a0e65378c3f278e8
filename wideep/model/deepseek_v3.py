"""DeepseekV3ForCausalLM over a flat token batch and a paged latent KV cache.

Module names mirror the HF checkpoint (model.layers.i.self_attn.q_b_proj ...), so loading is a name match;
the exceptions are stacked weights: routed experts per rank into mlp.experts.w13 / w2, and q_a_proj ‖
kv_a_proj_with_mqa into self_attn.fused_qkv_a_proj.
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
    def __init__(self, config: ModelConfig, layer_idx: int, dispatcher: MoEDispatcher | None, num_local_experts: int,
                 fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.self_attn = MLAttention(config, layer_idx, fp8_block)
        if config.is_moe_layer(layer_idx):
            self.mlp: nn.Module = DeepseekV3MoE(config, layer_idx, dispatcher, num_local_experts, fp8_block)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, fp8_block)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, cos, sin, attn: AttentionMetadata, kv_cache: torch.Tensor,
                residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mlp output, residual stream before it): the residual add of each sub-block is done by the next
        norm (fused add + RMSNorm), so the hidden state is h + residual (residual None: h alone)."""
        x, residual = self._attention(h, cos, sin, attn, kv_cache, residual)
        return self.mlp(x), residual

    def forward_stages(self, h, cos, sin, attn: AttentionMetadata, kv_cache: torch.Tensor,
                       residual: torch.Tensor | None = None):
        """forward() as a generator that yields while the MoE's dispatch / combine is in flight (dual-batch
        overlap, model/ubatch.py): the same pieces, so a micro-batch runs the unsplit math."""
        x, residual = self._attention(h, cos, sin, attn, kv_cache, residual)
        out = (yield from self.mlp.forward_stages(x)) if isinstance(self.mlp, DeepseekV3MoE) else self.mlp(x)
        return out, residual

    def _attention(self, h, cos, sin, attn: AttentionMetadata, kv_cache: torch.Tensor,
                   residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(post-attention-normed input of the MLP, residual stream): the layer up to its MLP."""
        if h.shape[0] == 0:     # an empty micro-batch (dual-batch overlap) still joins the MoE collectives
            return h, h if residual is None else residual
        # an FP8 q_a ‖ kv_a projection takes the norm's rows quantized (one kernel for norm and quantization)
        pad = self.self_attn.input_quant_pad(h) if self.input_layernorm.quant_applies(h) else None
        if residual is None:
            x, residual = self.input_layernorm(h, quant_pad=pad), h
        else:
            x, residual = self.input_layernorm.add_norm(h, residual, quant_pad=pad)
        a = self.self_attn(x, cos, sin, attn, kv_cache)
        return self.post_attention_layernorm.add_norm(a, residual)


class DeepseekV3Model(nn.Module):
    def __init__(self, config: ModelConfig, dispatcher: MoEDispatcher | None, num_local_experts: int,
                 fp8_block: tuple[int, int] | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dispatcher, num_local_experts, fp8_block) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def materialize(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Allocate a model built on the meta device: FP8 weights stay e4m3, block scales and the router's
    correction bias fp32, everything else `dtype` (one allocation per tensor, never a float32 copy of all)."""
    for mod in model.modules():
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            keep = t.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv") or name == "e_score_correction_bias"
            new = torch.empty(t.shape, dtype=t.dtype if keep else dtype, device=device)
            if isinstance(t, nn.Parameter):
                setattr(mod, name, nn.Parameter(new, requires_grad=False))
            else:
                mod._buffers[name] = new


class DeepseekV3ForCausalLM(nn.Module):
    """fp8: run the projections and experts natively in block FP8 (None: when the checkpoint's
    quantization_config says fp8, as vLLM does); False keeps plain weights (FP8 checkpoints dequantized)."""

    def __init__(self, config: ModelConfig, dispatcher: MoEDispatcher | None = None, num_local_experts: int | None = None,
                 fp8: bool | None = None):
        super().__init__()
        if fp8 is None:
            fp8 = config.fp8_block_size is not None
        self.fp8_block = (config.fp8_block_size or (128, 128)) if fp8 else None
        if dispatcher is None:
            from wideep.model.local_dispatch import LocalDispatcher

            dispatcher = LocalDispatcher(config.n_routed_experts)
        self.config = config
        self.dispatcher = dispatcher
        dispatcher.set_fp8_payload(self.fp8_block is not None)
        self.num_local_experts = num_local_experts if num_local_experts is not None else dispatcher.num_local_experts
        self.model = DeepseekV3Model(config, dispatcher, self.num_local_experts, self.fp8_block)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # leading layers without an MoE (R1: 3): they make no EP collective, so there is nothing to overlap
        self.dense_prefix_layers = next((i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)),
                                        config.num_hidden_layers)

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
        h, residual, cos, sin = self.forward_prefix(input_ids, positions, attn, kv_caches)
        first = self.dense_prefix_layers
        for layer, cache in zip(self.model.layers[first:], kv_caches[first:], strict=True):
            h, residual = layer(h, cos, sin, attn, cache, residual)
        return self._final_norm(h, residual)

    def forward_prefix(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata,
                       kv_caches: list[torch.Tensor]):
        """Embedding, rotary tables and the dense prefix layers: (hidden, residual or None, cos, sin), one row per
        token. Dual-batch overlap runs it once on the whole batch (splitting it would only read its weights
        twice) and the rest per micro-batch (forward_stages)."""
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb.cos_sin(positions, h.dtype)
        residual = None
        n = self.dense_prefix_layers
        for layer, cache in zip(self.model.layers[:n], kv_caches[:n], strict=True):
            h, residual = layer(h, cos, sin, attn, cache, residual)
        return h, residual, cos, sin

    def forward_stages(self, h: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                       attn: AttentionMetadata, kv_caches: list[torch.Tensor]):
        """The layers after the dense prefix as a generator that yields while an MoE dispatch / combine is in
        flight: one micro-batch of dual-batch overlap (model/ubatch.py), layer by layer the same math as
        forward(). h, residual, cos, sin: this micro-batch's rows of forward_prefix's outputs."""
        first = self.dense_prefix_layers
        for layer, cache in zip(self.model.layers[first:], kv_caches[first:], strict=True):
            h, residual = yield from layer.forward_stages(h, cos, sin, attn, cache, residual)
        return self._final_norm(h, residual)

    def _final_norm(self, h: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        return self.model.norm(h) if residual is None else self.model.norm.add_norm(h, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
