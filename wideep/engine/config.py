"""EngineArgs: every knob of one engine rank, named as vLLM names it where the concept is the same.

`wideep serve` flags, the offline `LLM(**kwargs)` and the deployment spec's engine args all land here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EPLBConfig:
    window_size: int = 1000
    step_interval: int = 3000
    num_redundant_experts: int = 0
    log_balancedness: bool = False


@dataclass
class EngineArgs:
    model: str = ""
    served_model_name: str | None = None
    dtype: str = "auto"                   # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"                  # auto: cuda if available else cpu
    quantization: str = "auto"            # auto: native FP8 for FP8 checkpoints; fp8 (require); none (dequantize)
    seed: int = 0

    # KV cache and scheduling
    block_size: int = 64
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None      # None: min(config max_position_embeddings, 8192)
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # explicit budget; the CPU default is 256 MiB
    enable_prefix_caching: bool = True
    enforce_eager: bool = False           # no CUDA graphs
    cuda_graph_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256])
    async_scheduling: bool = False        # schedule step n+1 while step n runs; tokens reported one step late
    # dual-batch overlap (model/ubatch.py): a step above the threshold runs as two interleaved micro-batches
    enable_dbo: bool = False
    dbo_decode_token_threshold: int = 32      # decode-only steps with more tokens per rank are split
    dbo_prefill_token_threshold: int = 512    # steps with prefill tokens and more tokens per rank are split

    # Data / expert parallelism (engine.md §1-2)
    data_parallel_size: int = 1
    data_parallel_rank: int = 0           # global rank of this engine
    data_parallel_size_local: int = 1
    data_parallel_start_rank: int = 0
    data_parallel_address: str = "127.0.0.1"
    data_parallel_rpc_port: int = 29550
    enable_expert_parallel: bool = False
    all2all_backend: str = "allgather_reducescatter"
    enable_eplb: bool = False
    eplb_config: EPLBConfig = field(default_factory=EPLBConfig)

    # P/D and KV events (engine.md §3)
    kv_transfer_config: dict[str, Any] | None = None
    kv_events_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.eplb_config, dict):
            self.eplb_config = EPLBConfig(**{k: _coerce(v) for k, v in self.eplb_config.items()})
        for name in ("dbo_decode_token_threshold", "dbo_prefill_token_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**d)


def _coerce(v: Any) -> Any:
    """vLLM's --eplb-config JSON carries numbers and booleans as strings ("1000", "False")."""
    if isinstance(v, str):
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        try:
            return int(v)
        except ValueError:
            return v
    return v
