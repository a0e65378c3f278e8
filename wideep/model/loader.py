"""Load a HF-format DeepSeek-V3 checkpoint (sharded safetensors, optional FP8 block weights) into wideep's model.

Only this rank's routed experts are read (stacked into w13/w2 in physical-slot order, behind the shared expert
when it is fused into the same stack); everything else is a name match with the HF parameter names. Any missing tensor, wrong shape or missing shard is an error that
names the file and the tensor.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from wideep.model.dispatch import MoEDispatcher

from .config import CheckpointError, ModelConfig
from .deepseek_v3 import DeepseekV3ForCausalLM, materialize
from .fp8 import FP8_DTYPE, dequantize_block_fp8
from .rope import RotaryEmbedding

INDEX_FILE = "model.safetensors.index.json"
_EXPERT_PARAM = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(w13|w2)(_scale_inv)?$")
_QKV_A_PARAM = re.compile(r"^(model\.layers\.\d+\.self_attn)\.fused_qkv_a_proj\.(weight|weight_scale_inv|bias)$")
QUANTIZATION_CHOICES = ("auto", "fp8", "none")


class WeightIndex:
    """Which shard holds which tensor (from the index file, or by listing the shards)."""

    def __init__(self, model_dir: Path):
        self.dir = model_dir
        index = model_dir / INDEX_FILE
        self.source = index
        self.weight_map: dict[str, str] = {}
        if index.is_file():
            try:
                self.weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
        else:
            shards = sorted(model_dir.glob("*.safetensors"))
            if not shards:
                raise CheckpointError(f"{model_dir}: no {INDEX_FILE} and no *.safetensors files")
            self.source = shards[0] if len(shards) == 1 else model_dir
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():
                        self.weight_map[name] = shard.name

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.source}: tensor '{name}' is missing from the checkpoint")
        return self.weight_map[name]


class _ShardReader:
    """Opens each shard once; reads tensors with their file name for error messages."""

    def __init__(self, index: WeightIndex):
        self.index = index
        self._open: dict[str, object] = {}

    def _handle(self, fname: str, tensor: str):
        if fname not in self._open:
            path = self.index.dir / fname
            if not path.is_file():
                raise CheckpointError(f"{self.index.source}: shard '{fname}' holding tensor '{tensor}' does not exist")
            self._open[fname] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[fname]

    def has(self, name: str) -> bool:
        return name in self.index.weight_map

    def get(self, name: str) -> tuple[torch.Tensor, str]:
        fname = self.index.file_of(name)
        f = self._handle(fname, name)
        if name not in f.keys():
            raise CheckpointError(f"{self.index.dir / fname}: tensor '{name}' is missing (the index maps it here)")
        return f.get_tensor(name), fname


def _read_weight(
    reader: _ShardReader, name: str, shape: tuple[int, ...], device, dtype, block: tuple[int, int] | None
) -> torch.Tensor:
    t, fname = reader.get(name)
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{reader.index.dir / fname}: tensor '{name}' has shape {list(t.shape)}, config.json implies {list(shape)}"
        )
    if dtype == FP8_DTYPE:  # native FP8: the checkpoint's e4m3 bytes as they are
        if t.dtype != FP8_DTYPE:
            raise CheckpointError(f"{reader.index.dir / fname}: tensor '{name}' is {t.dtype}, the FP8 model needs "
                                  "float8_e4m3fn (quantization_config says fp8)")
        return t.to(device)
    if t.dtype == FP8_DTYPE:
        scale_name = name[: -len("weight")] + "weight_scale_inv" if name.endswith("weight") else name + "_scale_inv"
        if not reader.has(scale_name):
            raise CheckpointError(f"{reader.index.dir / fname}: FP8 tensor '{name}' has no '{scale_name}'")
        scale, sfile = reader.get(scale_name)
        try:
            return dequantize_block_fp8(t.to(device), scale.to(device), block or (128, 128), dtype)
        except ValueError as exc:
            raise CheckpointError(f"{reader.index.dir / sfile}: tensor '{scale_name}': {exc}") from exc
    return t.to(device=device, dtype=dtype)


def default_local_expert_ids(n_experts: int, ep_rank: int, ep_size: int) -> Callable[[int], list[int]]:
    per = n_experts // ep_size
    ids = list(range(ep_rank * per, (ep_rank + 1) * per))
    return lambda layer_idx: ids


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    dispatcher: MoEDispatcher | None = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    local_expert_ids: Callable[[int], list[int]] | None = None,
    quantization: str = "auto",
) -> DeepseekV3ForCausalLM:
    """quantization: auto (native FP8 when quantization_config says fp8, as vLLM), fp8 (require it), none
    (dequantize FP8 weights to `dtype` at load)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    if quantization not in QUANTIZATION_CHOICES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; got {quantization!r}")
    if quantization == "fp8" and config.fp8_block_size is None:
        raise ValueError(f"{model_dir}: quantization=fp8 needs an FP8 checkpoint (quantization_config.quant_method "
                         "fp8); online quantization of a bf16 checkpoint is not supported")
    fp8 = config.fp8_block_size is not None and quantization != "none"
    if local_expert_ids is None:
        if config.n_routed_experts % ep_size:
            raise ValueError(f"ep_size {ep_size} does not divide n_routed_experts {config.n_routed_experts}")
        local_expert_ids = default_local_expert_ids(config.n_routed_experts, ep_rank, ep_size)
    if dispatcher is None:
        if ep_size != 1:
            raise ValueError("load_model: ep_size > 1 needs a dispatcher (an expert-parallel MoEDispatcher)")
        from wideep.model.local_dispatch import LocalDispatcher

        dispatcher = LocalDispatcher(config.n_routed_experts)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    n_local = len(local_expert_ids(moe_layers[0])) if moe_layers else dispatcher.num_local_experts

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config, dispatcher, n_local, fp8=fp8)
    materialize(model, device, dtype)
    model.model.rotary_emb = RotaryEmbedding(config).to(device)

    reader = _ShardReader(WeightIndex(model_dir))
    block = config.fp8_block_size
    inter = config.moe_intermediate_size
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if tensor.dtype == FP8_DTYPE:
                target_dtype = FP8_DTYPE
            elif name.endswith("e_score_correction_bias") or name.endswith("_scale_inv"):
                target_dtype = torch.float32
            else:
                target_dtype = dtype
            qkv = _QKV_A_PARAM.match(name)
            if qkv is not None:   # the checkpoint's q_a_proj and kv_a_proj_with_mqa, stacked by rows
                prefix, suffix = qkv.groups()
                rows = [config.q_lora_rank, config.kv_lora_rank + config.qk_rope_head_dim]
                if suffix == "weight_scale_inv":
                    rows = [-(-r // block[0]) for r in rows]
                tensor.data = torch.cat([
                    _read_weight(reader, f"{prefix}.{part}.{suffix}", (r, *tensor.shape[1:]), device, target_dtype,
                                 block)
                    for part, r in zip(("q_a_proj", "kv_a_proj_with_mqa"), rows)])
                continue
            m = _EXPERT_PARAM.match(name)
            if m is None:
                tensor.data = _read_weight(reader, name, tuple(tensor.shape), device, target_dtype, block)
                continue
            layer, which, is_scale = int(m.group(1)), m.group(2), m.group(3) is not None
            ids = local_expert_ids(layer)
            if len(ids) != n_local:
                raise ValueError(f"local_expert_ids({layer}) has {len(ids)} experts, layer 0 of MoE had {n_local}")
            stacked = torch.empty(tuple(tensor.shape), dtype=target_dtype, device=device)
            prefix = f"model.layers.{layer}.mlp.experts"
            h = config.hidden_size
            if is_scale:
                bo, bi = block
                ni, nh, ki, kh = -(-inter // bo), -(-h // bo), -(-inter // bi), -(-h // bi)
                suffix, rows, up_shape, down_shape, blk = "weight_scale_inv", ni, (ni, kh), (nh, ki), None
            else:
                suffix, rows, up_shape, down_shape, blk = "weight", inter, (inter, h), (h, inter), block
            # a fused shared expert fills slot 0 (RoutedExperts.n_shared), the routed experts the slots after it
            sources = [f"model.layers.{layer}.mlp.shared_experts"] * (tensor.shape[0] - len(ids))
            sources += [f"{prefix}.{e}" for e in ids]
            for slot, src in enumerate(sources):
                name = f"{src}.{{}}.{suffix}"
                if which == "w13":
                    stacked[slot, :rows] = _read_weight(reader, name.format("gate_proj"), up_shape, device, target_dtype, blk)
                    stacked[slot, rows:] = _read_weight(reader, name.format("up_proj"), up_shape, device, target_dtype, blk)
                else:
                    stacked[slot] = _read_weight(reader, name.format("down_proj"), down_shape, device, target_dtype, blk)
            tensor.data = stacked
    model.requires_grad_(False)
    model.eval()
    return model
