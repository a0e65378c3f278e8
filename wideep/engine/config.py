"""EngineArgs: every knob of one engine rank, named as vLLM names it where the concept is the same.

`wideep serve` flags, the offline `LLM(**kwargs)` and the deployment spec's engine args all land here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from wideep.errors import ConfigError
from wideep.typed_config import build


# `--kv-cache-dtype` values (vLLM's names; model.attention.resolve_kv_cache_dtype maps them to tensors)
KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32", "fp8", "fp8_e4m3")


@dataclass
class EPLBConfig:
    window_size: int = 1000
    step_interval: int = 3000
    num_redundant_experts: int = 0
    log_balancedness: bool = False


def _opt(default: Any = dataclasses.MISSING, *, help: str, group: str = "engine", factory: Any = None,
         **meta: Any) -> Any:
    """A field that `wideep serve` exposes as --its-name (flags are generated from these fields)."""
    md = {"help": help, "group": group, **meta}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


QUANTIZATION_CHOICES = ("auto", "fp8", "none")


@dataclass
class EngineArgs:
    model: str = ""
    served_model_name: str | None = None
    dtype: str = _opt("auto", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32")
    kv_cache_dtype: str = _opt("auto", help="auto (the model dtype), bfloat16, float16, float32, fp8 or fp8_e4m3 "
                                             "(e4m3 latent cache, per-tensor scale: twice the tokens in the same "
                                             "memory)")
    device: str = _opt("auto", help="auto (cuda if available, else cpu), cuda or cpu")
    quantization: str = _opt("auto", help="auto: FP8 checkpoints run natively in FP8 (e4m3 weights, block "
                                           "scales); fp8: require it; none: dequantize them to --dtype at load")
    seed: int = _opt(0, help="sampling seed of requests that give none")

    # KV cache and scheduling
    block_size: int = _opt(64, help="tokens per KV block")
    max_num_seqs: int = _opt(256, help="max requests in one batch")
    max_num_batched_tokens: int = _opt(8192, help="token budget per step")
    max_model_len: int | None = _opt(None, help="context length, prompt + output "
                                               "(default: min(max_position_embeddings, 8192))")
    gpu_memory_utilization: float = _opt(0.9, help="share of GPU memory the engine may use")
    kv_cache_memory_bytes: int | None = _opt(
        None, human_bytes=True,
        help="explicit KV cache budget (bytes; 8G = 8 GiB, 8g = 8e9); overrides --gpu-memory-utilization "
             "(default on CPU: 256 MiB)")
    enable_prefix_caching: bool = _opt(True, help="reuse cached KV blocks of shared prompt prefixes")
    enforce_eager: bool = _opt(False, help="no CUDA graphs")
    cuda_graph_sizes: list[int] = _opt(factory=lambda: [1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256],
                                       help="decode batch sizes captured as CUDA graphs")
    async_scheduling: bool = _opt(False, help="schedule step n+1 while the device runs step n "
                                              "(tokens are reported one step late)")
    # dual-batch overlap (model/ubatch.py): a step above the threshold runs as two interleaved micro-batches
    enable_dbo: bool = _opt(False, group="parallel",
                            help="dual-batch overlap: split large steps into two micro-batches so one's MoE "
                                 "all-to-all overlaps the other's compute")
    dbo_decode_token_threshold: int = _opt(32, group="parallel",
                                           help="decode-only steps with more tokens per rank than this are "
                                                "split (--enable-dbo)")
    dbo_prefill_token_threshold: int = _opt(512, group="parallel",
                                            help="steps with prefill tokens and more tokens per rank than this "
                                                 "are split (--enable-dbo)")

    # Data / expert parallelism (docs/protocols.md, "DP lockstep")
    data_parallel_size: int = _opt(1, group="parallel", help="total DP ranks of this role (all nodes)")
    data_parallel_rank: int = 0           # global rank of this engine
    data_parallel_size_local: int = 1
    data_parallel_start_rank: int = 0
    data_parallel_address: str = _opt("127.0.0.1", group="parallel",
                                      help="address of global rank 0 (torch.distributed rendezvous)")
    data_parallel_rpc_port: int = _opt(29550, group="parallel", help="rendezvous port on --data-parallel-address")
    enable_expert_parallel: bool = _opt(False, group="parallel", help="split MoE experts across the DP ranks")
    all2all_backend: str = _opt("allgather_reducescatter", group="parallel", help="MoE dispatch/combine backend")
    enable_eplb: bool = _opt(False, group="parallel", help="expert-parallel load balancing")
    eplb_config: EPLBConfig = _opt(
        factory=EPLBConfig, group="parallel", json=True,
        help='JSON, e.g. \'{"window_size":"1000","step_interval":"3000","num_redundant_experts":"32"}\'')

    # P/D and KV events (docs/protocols.md)
    kv_transfer_config: dict[str, Any] | None = _opt(
        None, json=True, help='P/D connector, e.g. \'{"kv_connector":"NixlConnector","kv_role":"kv_both"}\'')
    kv_events_config: dict[str, Any] | None = _opt(
        None, json=True,
        help='KV events, e.g. \'{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557"}\'')

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ConfigError("quantization", f"must be one of {', '.join(QUANTIZATION_CHOICES)}, got "
                              f"{self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                              f"{self.kv_cache_dtype!r} (fp8_e5m2 and FlashMLA's fp8_ds_mla layout are not supported)")
        if isinstance(self.eplb_config, dict):
            self.eplb_config = build(EPLBConfig, _from_vllm_strings(self.eplb_config), "eplb_config")
        for name in ("dbo_decode_token_threshold", "dbo_prefill_token_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(name, f"must be an integer >= 0, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: str = "") -> "EngineArgs":
        """EngineArgs by the typed-config rules (unknown or mistyped keys raise ConfigError)."""
        if isinstance(d, dict) and isinstance(d.get("eplb_config"), dict):
            d = {**d, "eplb_config": _from_vllm_strings(d["eplb_config"])}
        return build(cls, d, path)


def _from_vllm_strings(d: dict[str, Any]) -> dict[str, Any]:
    """vLLM's --eplb-config JSON carries numbers and booleans as strings ("1000", "False")."""
    out = {}
    for k, v in d.items():
        if isinstance(v, str):
            if v.lower() in ("true", "false"):
                v = v.lower() == "true"
            else:
                try:
                    v = int(v)
                except ValueError:
                    pass
        out[k] = v
    return out
