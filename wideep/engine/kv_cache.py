"""Sizing and allocating the paged latent KV cache: one [num_blocks, block_size, kv_cache_dim]
tensor per layer, as many blocks as the memory budget allows.

Two layouts of the same per-layer tensors. Per layer: every layer's cache is its own contiguous
allocation. Cross-layer (block-major): one backing [num_blocks, num_layers, block_size, kv_cache_dim]
tensor, each layer's cache a strided view of it, so a block holds all layers' latents contiguously and
a P/D transfer moves a run of blocks as one byte range instead of one per layer (vLLM's "cross-layer
blocks"). Every reader and writer of the cache takes the block stride from the tensor.
"""
from __future__ import annotations

import logging

import torch

from wideep.engine.config import EngineArgs

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_BYTES = 256 * 1024 * 1024


def bytes_per_block(num_layers: int, block_size: int, kv_cache_dim: int, dtype: torch.dtype) -> int:
    return num_layers * block_size * kv_cache_dim * torch.empty((), dtype=dtype).element_size()


def kv_cache_budget(args: EngineArgs, device: torch.device, activation_peak_bytes: int = 0) -> int:
    """Bytes for the cache: explicit `kv_cache_memory_bytes`, else on CUDA `gpu_memory_utilization`
    of the memory free after the weights (minus the activation peak measured by a profile run),
    else 256 MiB on CPU."""
    if args.kv_cache_memory_bytes:
        return int(args.kv_cache_memory_bytes)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * args.gpu_memory_utilization) - activation_peak_bytes
    return CPU_DEFAULT_KV_BYTES


def num_blocks_for_budget(budget: int, per_block: int) -> int:
    n = budget // per_block
    if n < 1:
        raise RuntimeError(
            f"KV cache budget {budget} bytes is smaller than one block ({per_block} bytes): raise "
            "--gpu-memory-utilization or --kv-cache-memory-bytes, or lower --max-num-batched-tokens")
    return int(n)


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, kv_cache_dim: int,
                       dtype: torch.dtype, device: torch.device, cross_layer: bool = False) -> list[torch.Tensor]:
    # Zeroed, so padded graph rows that read block 0 never see NaN garbage.
    if cross_layer:
        backing = torch.zeros(num_blocks, num_layers, block_size, kv_cache_dim, dtype=dtype, device=device)
        return [backing[:, i] for i in range(num_layers)]
    return [torch.zeros(num_blocks, block_size, kv_cache_dim, dtype=dtype, device=device)
            for _ in range(num_layers)]
