"""`wideep serve` flags (vLLM's names where the concept is the same) and the ServeConfig they build.

Only light imports here: `wideep --help` must stay fast. JSON flags are parsed at argument time so a
typo is reported by argparse naming the flag, before any process starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from wideep.engine.config import EngineArgs


@dataclass
class ServeConfig:
    """Everything the supervisor needs: per-pod HTTP layout plus the engine args of local rank 0."""

    engine_args: EngineArgs
    served_model_names: list[str]
    host: str = "0.0.0.0"
    port: int = 8000                       # local DP rank i answers on port + i
    supervisor_port: int | None = None     # /health and /readyz for all local ranks
    api_key: str | None = None
    drain_timeout_s: float = 30.0          # SIGTERM: time in-flight requests get to finish
    restart_grace_s: float = 5.0           # a dead child: /health reports 503 this long, then exit 1
    engine_start_timeout_s: float = 1800.0
    log_level: str = "info"

    @property
    def dp_size_local(self) -> int:
        return self.engine_args.data_parallel_size_local

    @property
    def start_rank(self) -> int:
        return self.engine_args.data_parallel_start_rank

    def rank_port(self, local_rank: int) -> int:
        return self.port + local_rank

    def engine_args_for(self, local_rank: int) -> EngineArgs:
        """One rank's engine args: global rank = start rank + local index; each process sees one rank."""
        return dataclasses.replace(self.engine_args, data_parallel_rank=self.start_rank + local_rank)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def human_int(raw: str) -> int | None:
    """vLLM's human-readable byte counts: 1000, 4k/4m/4g (x1000), 4K/4M/4G (x1024); '' means unset."""
    raw = raw.strip()
    if raw == "":
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT]?)", raw)
    if not m:
        raise argparse.ArgumentTypeError(f"expected a byte count like 8000000000, 8g or 8G, got {raw!r}")
    num, unit = float(m.group(1)), m.group(2)
    dec = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    binary = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return int(num * (binary[unit] if unit in binary else dec[unit]))


def json_object(flag: str):
    def parse(raw: str) -> dict[str, Any]:
        try:
            v = json.loads(raw)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a JSON object; {e.msg} at column {e.colno} in {raw!r}") from None
        if not isinstance(v, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object, got {type(v).__name__}: {raw!r}")
        return v
    return parse


def _flag(group: Any, name: str, **kw: Any) -> None:
    """Adds --a-b and its vLLM-accepted spelling --a_b (manifests use both)."""
    names = [name]
    if "-" in name[2:]:
        names.append("--" + name[2:].replace("-", "_"))
    group.add_argument(*names, **kw)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = EngineArgs()
    p.add_argument("model", metavar="MODEL_DIR", help="HF-format checkpoint directory (config.json, safetensors, tokenizer)")

    http = p.add_argument_group("HTTP")
    _flag(http, "--host", default="0.0.0.0", help="bind address of every HTTP port (default 0.0.0.0)")
    _flag(http, "--port", type=int, default=8000, help="port of local DP rank 0; local rank i answers on port+i")
    _flag(http, "--served-model-name", nargs="+", default=None,
          help="model name(s) in the API (default: MODEL_DIR); the first is used in responses and metrics")
    _flag(http, "--api-key", default=None,
          help="require 'Authorization: Bearer KEY' on /v1/* (default: $VLLM_API_KEY if set)")
    _flag(http, "--data-parallel-supervisor-port", type=int, default=None,
          help="port where the supervisor answers /health and /readyz for all local ranks")
    _flag(http, "--data-parallel-multi-port-external-lb", action="store_true",
          help="accepted for vLLM compatibility; one API port per DP rank is the only mode")
    _flag(http, "--drain-timeout", type=float, default=30.0,
          help="on SIGTERM, seconds in-flight requests get to finish before children are stopped")
    _flag(http, "--restart-grace-period", type=float, default=5.0,
          help="after a child process dies, seconds /health reports 503 before the supervisor exits 1")
    _flag(http, "--engine-start-timeout", type=float, default=1800.0,
          help="seconds an engine may take to load before the supervisor gives up")

    par = p.add_argument_group("data / expert parallelism")
    _flag(par, "--data-parallel-size", type=int, default=1, help="total DP ranks of this role (all nodes)")
    _flag(par, "--data-parallel-size-local", type=int, default=None,
          help="DP ranks on this node (default: data-parallel-size - start rank)")
    _flag(par, "--data-parallel-start-rank", type=int, default=0, help="global rank of this node's local rank 0")
    _flag(par, "--data-parallel-rank", type=int, default=None,
          help="serve exactly this one global rank (same as --data-parallel-start-rank R --data-parallel-size-local 1)")
    _flag(par, "--data-parallel-address", default=d.data_parallel_address,
          help="address of global rank 0 (torch.distributed rendezvous)")
    _flag(par, "--data-parallel-rpc-port", type=int, default=d.data_parallel_rpc_port,
          help="rendezvous port on --data-parallel-address")
    _flag(par, "--enable-expert-parallel", action="store_true", help="split MoE experts across the DP ranks")
    _flag(par, "--all2all-backend", default=d.all2all_backend, help="MoE dispatch/combine backend")
    _flag(par, "--enable-eplb", action="store_true", help="expert-parallel load balancing")
    _flag(par, "--eplb-config", type=json_object("--eplb-config"), default=None,
          help='JSON, e.g. \'{"window_size":"1000","step_interval":"3000","num_redundant_experts":"32"}\'')
    _flag(par, "--tensor-parallel-size", type=int, default=1, help="must be 1 (wide EP uses DP attention)")

    eng = p.add_argument_group("engine")
    _flag(eng, "--block-size", type=int, default=d.block_size, help="tokens per KV block")
    _flag(eng, "--max-num-seqs", type=int, default=d.max_num_seqs, help="max requests in one batch")
    _flag(eng, "--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens, help="token budget per step")
    _flag(eng, "--max-model-len", type=int, default=None, help="context length (prompt + output)")
    _flag(eng, "--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    _flag(eng, "--kv-cache-memory-bytes", type=human_int, default=None,
          help="explicit KV cache budget (bytes; 8G = 8 GiB, 8g = 8e9); overrides --gpu-memory-utilization")
    _flag(eng, "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=d.enable_prefix_caching)
    _flag(eng, "--enforce-eager", action="store_true", help="no CUDA graphs")
    _flag(eng, "--async-scheduling", action="store_true",
          help="schedule step n+1 while the device runs step n (tokens are reported one step late)")
    _flag(par, "--enable-dbo", action="store_true",
          help="dual-batch overlap: split large steps into two micro-batches so one's MoE all-to-all "
               "overlaps the other's compute")
    _flag(par, "--dbo-decode-token-threshold", type=int, default=d.dbo_decode_token_threshold,
          help="decode-only steps with more tokens per rank than this are split (--enable-dbo)")
    _flag(par, "--dbo-prefill-token-threshold", type=int, default=d.dbo_prefill_token_threshold,
          help="steps with prefill tokens and more tokens per rank than this are split (--enable-dbo)")
    _flag(eng, "--seed", type=int, default=d.seed)
    _flag(eng, "--dtype", default=d.dtype, help="auto, bfloat16, float16 or float32")
    _flag(eng, "--quantization", default=d.quantization, choices=["auto", "fp8", "none"],
          help="auto: FP8 checkpoints run natively in FP8; none: dequantize them to --dtype at load")
    _flag(eng, "--device", default=d.device, help="auto, cuda or cpu")
    _flag(eng, "--kv-transfer-config", type=json_object("--kv-transfer-config"), default=None,
          help='P/D connector, e.g. \'{"kv_connector":"NixlConnector","kv_role":"kv_both"}\'')
    _flag(eng, "--kv-events-config", type=json_object("--kv-events-config"), default=None,
          help='KV events, e.g. \'{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557"}\'')

    compat = p.add_argument_group("accepted for vLLM compatibility (no effect)")
    for name in ("--trust-remote-code", "--disable-uvicorn-access-log", "--disable-log-requests", "--disable-log-stats"):
        _flag(compat, name, action="store_true", help=argparse.SUPPRESS)


def serve_config_from_args(ns: argparse.Namespace) -> ServeConfig:
    """Validated ServeConfig; raises ValueError with the flag's name on a bad combination."""
    from wideep.engine.kv_events import KVEventsConfig

    if ns.tensor_parallel_size != 1:
        raise ValueError("--tensor-parallel-size must be 1: wideep runs attention data-parallel (one rank per GPU)")
    model = os.path.abspath(ns.model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"MODEL_DIR {ns.model!r} has no config.json (make one with `wideep make-model tiny DIR`)")
    size = ns.data_parallel_size
    start = ns.data_parallel_start_rank
    local = ns.data_parallel_size_local
    if ns.data_parallel_rank is not None:
        start, local = ns.data_parallel_rank, 1 if local is None else local
    if local is None:
        local = size - start
    if size < 1:
        raise ValueError(f"--data-parallel-size must be >= 1, got {size}")
    if local < 1 or start < 0 or start + local > size:
        raise ValueError(f"--data-parallel-start-rank {start} + --data-parallel-size-local {local} "
                         f"must fit in --data-parallel-size {size}")
    if ns.kv_transfer_config is not None:
        from wideep.kv_transfer.params import KVTransferConfig
        try:
            KVTransferConfig.from_dict(ns.kv_transfer_config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--kv-transfer-config: {e}") from None
    if ns.kv_events_config is not None:
        try:
            KVEventsConfig.from_dict(ns.kv_events_config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--kv-events-config: {e}") from None
    for flag, v in (("--block-size", ns.block_size), ("--max-num-seqs", ns.max_num_seqs),
                    ("--max-num-batched-tokens", ns.max_num_batched_tokens)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    for flag, v in (("--dbo-decode-token-threshold", ns.dbo_decode_token_threshold),
                    ("--dbo-prefill-token-threshold", ns.dbo_prefill_token_threshold)):
        if v < 0:
            raise ValueError(f"{flag} must be >= 0, got {v}")
    if ns.max_model_len is not None and ns.max_model_len < 1:
        raise ValueError(f"--max-model-len must be >= 1, got {ns.max_model_len}")
    if not 0 < ns.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {ns.gpu_memory_utilization}")
    names = ns.served_model_name or [ns.model]
    try:
        engine_args = EngineArgs(
            model=model, served_model_name=names[0], dtype=ns.dtype, quantization=ns.quantization, device=ns.device, seed=ns.seed,
            block_size=ns.block_size, max_num_seqs=ns.max_num_seqs, max_num_batched_tokens=ns.max_num_batched_tokens,
            max_model_len=ns.max_model_len, gpu_memory_utilization=ns.gpu_memory_utilization,
            kv_cache_memory_bytes=ns.kv_cache_memory_bytes, enable_prefix_caching=ns.enable_prefix_caching,
            enforce_eager=ns.enforce_eager, data_parallel_size=size, data_parallel_rank=start,
            data_parallel_size_local=local, data_parallel_start_rank=start,
            data_parallel_address=ns.data_parallel_address, data_parallel_rpc_port=ns.data_parallel_rpc_port,
            enable_expert_parallel=ns.enable_expert_parallel, all2all_backend=ns.all2all_backend,
            enable_eplb=ns.enable_eplb, eplb_config=ns.eplb_config or {},
            async_scheduling=ns.async_scheduling, enable_dbo=ns.enable_dbo,
            dbo_decode_token_threshold=ns.dbo_decode_token_threshold,
            dbo_prefill_token_threshold=ns.dbo_prefill_token_threshold,
            kv_transfer_config=ns.kv_transfer_config, kv_events_config=ns.kv_events_config,
        )
    except TypeError as e:
        raise ValueError(f"--eplb-config: {e}") from None
    return ServeConfig(
        engine_args=engine_args, served_model_names=names, host=ns.host, port=ns.port,
        supervisor_port=ns.data_parallel_supervisor_port, api_key=ns.api_key or os.environ.get("VLLM_API_KEY") or None,
        drain_timeout_s=ns.drain_timeout, restart_grace_s=ns.restart_grace_period,
        engine_start_timeout_s=ns.engine_start_timeout,
    )
