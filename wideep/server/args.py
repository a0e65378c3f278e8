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
import typing
from dataclasses import dataclass
from typing import Any

from wideep import envs
from wideep.engine.config import EngineArgs
from wideep.errors import ConfigError


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


def engine_flag_fields() -> list[dataclasses.Field]:
    """The EngineArgs fields `wideep serve` exposes, one --flag each (those with a help text)."""
    return [f for f in dataclasses.fields(EngineArgs) if "help" in f.metadata]


def add_engine_arguments(groups: dict[str, Any]) -> None:
    """One flag per exposed EngineArgs field: name, type, default and help all come from the field."""
    defaults = EngineArgs()
    hints = typing.get_type_hints(EngineArgs)
    for f in engine_flag_fields():
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        hint = hints[f.name]
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"]}
        if f.metadata.get("json"):
            kw.update(type=json_object(flag), default=None)
        elif hint is bool:
            kw.update(action=argparse.BooleanOptionalAction if default else "store_true", default=default)
        elif typing.get_origin(hint) is list:
            kw.update(type=typing.get_args(hint)[0], nargs="+", default=default)
            kw["help"] += f" (default: {' '.join(map(str, default))})"
        else:
            base = next(a for a in (typing.get_args(hint) or (hint,)) if a is not type(None))
            kw.update(type=human_int if f.metadata.get("human_bytes") else base, default=default)
            if default is not None and "(default" not in kw["help"]:
                kw["help"] += " (default: %(default)s)"
        _flag(groups[f.metadata["group"]], flag, **kw)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
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
    _flag(http, "--log-level", default=None, type=str.lower, choices=["debug", "info", "warning", "error"],
          help="level of every process of this server (default: $WIDEEP_LOG_LEVEL, else info); "
               "info logs one access line per request")

    par = p.add_argument_group("data / expert parallelism")
    _flag(par, "--data-parallel-size-local", type=int, default=None,
          help="DP ranks on this node (default: data-parallel-size - start rank)")
    _flag(par, "--data-parallel-start-rank", type=int, default=0, help="global rank of this node's local rank 0")
    _flag(par, "--data-parallel-rank", type=int, default=None,
          help="serve exactly this one global rank (same as --data-parallel-start-rank R --data-parallel-size-local 1)")
    _flag(par, "--tensor-parallel-size", type=int, default=1, help="must be 1 (wide EP uses DP attention)")
    eng = p.add_argument_group("engine")
    add_engine_arguments({"parallel": par, "engine": eng})

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
        raise ValueError(f"MODEL_DIR {ns.model!r} has no config.json (make one with `wideep make-model tiny --out DIR`)")
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
    fields = {f.name: getattr(ns, f.name) for f in engine_flag_fields()}
    fields.update(model=model, served_model_name=names[0], data_parallel_size=size, data_parallel_rank=start,
                  data_parallel_size_local=local, data_parallel_start_rank=start,
                  eplb_config=ns.eplb_config or {})
    try:
        engine_args = EngineArgs.from_dict(fields)
    except ConfigError as e:
        head, dot, rest = e.field.partition(".")
        raise ConfigError("--" + head.replace("_", "-") + dot + rest, e.message) from None
    return ServeConfig(
        engine_args=engine_args, served_model_names=names, host=ns.host, port=ns.port,
        supervisor_port=ns.data_parallel_supervisor_port, api_key=ns.api_key or envs.VLLM_API_KEY,
        drain_timeout_s=ns.drain_timeout, restart_grace_s=ns.restart_grace_period,
        engine_start_timeout_s=ns.engine_start_timeout, log_level=ns.log_level or envs.WIDEEP_LOG_LEVEL.lower(),
    )
