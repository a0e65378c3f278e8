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
    # OpenAI surface of DeepSeek-R1 applications (reasoning, tools, templates, generation defaults)
    reasoning_parser: str | None = None
    reasoning_field: str = "reasoning"          # reasoning | reasoning_content | both
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    exclude_tools_when_tool_choice_none: bool = False
    chat_template: str | dict | None = None     # --chat-template's text (replaces the model's)
    trust_request_chat_template: bool = False
    generation_config: str = "auto"             # auto (the model's generation_config.json) | vllm | DIR

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
    p.add_argument("model", metavar="MODEL_DIR",
                   help="HF-format checkpoint directory (config.json, safetensors, tokenizer), or a hub id "
                        "(org/name) already in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME)")

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

    _flag(eng, "--compilation-config", type=json_object("--compilation-config"), default=None,
          help='vLLM\'s compilation config; only {"cudagraph_mode": "FULL_DECODE_ONLY"|"NONE"} and '
               '"cudagraph_capture_sizes" mean something here (decode steps are graphed)')
    _flag(par, "--data-parallel-hybrid-lb", action="store_true",
          help="accepted for vLLM compatibility: every local rank answers on its own port (port+i); "
               "balance across them with the router")
    _flag(par, "--moe-backend", default=None,
          help="accepted for vLLM compatibility: the expert GEMMs are wideep's own (logged at startup)")

    api = p.add_argument_group("OpenAI API: reasoning, tools, chat templates, generation defaults")
    _flag(api, "--reasoning-parser", choices=["deepseek_r1", "deepseek_v3"], default=None,
          help="split <think> reasoning from content (deepseek_v3: only when the request turns thinking on)")
    _flag(api, "--reasoning-field", choices=["reasoning", "reasoning_content", "both"], default="reasoning",
          help="response field of the reasoning: vLLM's 'reasoning' (default), DeepSeek's 'reasoning_content', or both")
    _flag(api, "--tool-call-parser", choices=["deepseek_v3", "deepseek_r1", "deepseek_v31"], default=None,
          help="parse DeepSeek's native tool-call tokens into OpenAI tool_calls")
    _flag(api, "--enable-auto-tool-choice", action="store_true",
          help='allow tool_choice "auto" (needs --tool-call-parser)')
    _flag(api, "--exclude-tools-when-tool-choice-none", action="store_true",
          help='do not render tools into the prompt when tool_choice is "none"')
    _flag(api, "--chat-template", default=None,
          help="the server's chat template: a file (jinja, or JSON with chat_template) or the template itself")
    _flag(api, "--chat-template-content-format", choices=["auto", "string"], default="auto",
          help="messages reach the template with string content (text parts joined)")
    _flag(api, "--trust-request-chat-template", action="store_true",
          help="let requests send their own chat_template (off: such a request is a 400)")
    _flag(api, "--generation-config", default="auto",
          help="'auto': the model's generation_config.json gives default sampling parameters (as vLLM); "
               "'vllm': no model defaults; or a directory holding generation_config.json")

    compat = p.add_argument_group("accepted for vLLM compatibility (no effect)")
    for name in COMPAT_FLAGS:
        _flag(compat, name, action="store_true", help=argparse.SUPPRESS)


# Flags that mean nothing here; each logs one line when given.
COMPAT_FLAGS = {
    "--trust-remote-code": "DeepSeek-V3/R1 run on wideep's own model code; no remote code is loaded",
    "--disable-uvicorn-access-log": "the HTTP server writes no access log",
    "--disable-log-requests": "requests are not logged",
    "--disable-log-stats": "no periodic stats log; stats are on /metrics",
}


def _compat_notes(ns: argparse.Namespace) -> list[str]:
    """One line per given flag that is accepted for compatibility but changes nothing."""
    notes = [f"{flag} is accepted for vLLM compatibility and means nothing here: {why}"
             for flag, why in COMPAT_FLAGS.items() if getattr(ns, flag[2:].replace("-", "_"))]
    if ns.data_parallel_hybrid_lb:
        notes.append("--data-parallel-hybrid-lb is accepted for vLLM compatibility: each local DP rank answers on "
                     "its own port (--port + i), there is no per-node balancing port; route across them")
    if ns.moe_backend is not None:
        notes.append(f"--moe-backend {ns.moe_backend} is accepted for vLLM compatibility and means nothing here: "
                     "the expert GEMMs are wideep's own kernels")
    from wideep.parallel.backend_names import ALIASES
    if ns.all2all_backend in ALIASES:
        notes.append(f"--all2all-backend {ns.all2all_backend}: DeepEP/pplx are not used here; MoE dispatch runs "
                     f"wideep's {ALIASES[ns.all2all_backend]!r} backend")
    return notes


def _compilation_config(cfg: dict[str, Any] | None) -> tuple[bool | None, list[int] | None]:
    """(enforce_eager or None, cuda graph sizes or None) from vLLM's --compilation-config."""
    if not cfg:
        return None, None
    unknown = sorted(set(cfg) - {"cudagraph_mode", "cudagraph_capture_sizes"})
    if unknown:
        raise ValueError(f"--compilation-config keys {unknown} are not supported here (only cudagraph_mode and "
                         "cudagraph_capture_sizes: wideep graphs whole decode steps, there is no torch.compile)")
    eager = None
    mode = cfg.get("cudagraph_mode")
    if mode is not None:
        mode = str(mode).upper()
        if mode not in ("FULL_DECODE_ONLY", "NONE"):
            raise ValueError(f"--compilation-config cudagraph_mode {mode!r} is not available: wideep captures full "
                             "graphs of decode steps only (FULL_DECODE_ONLY) or none (NONE)")
        eager = mode == "NONE"
    sizes = cfg.get("cudagraph_capture_sizes")
    if sizes is not None and (not isinstance(sizes, list) or not all(isinstance(x, int) and x > 0 for x in sizes)):
        raise ValueError("--compilation-config cudagraph_capture_sizes must be a list of positive integers")
    return eager, sizes


def _chat_template_arg(raw: str | None) -> str | dict | None:
    """--chat-template: a path (jinja or JSON) or, like vLLM, the template text itself."""
    if raw is None:
        return None
    from wideep.utils.chat_template import ChatTemplateError, read_template_file
    if os.path.exists(raw):
        try:
            return read_template_file(raw)
        except (ChatTemplateError, ValueError, OSError) as e:
            raise ValueError(f"--chat-template {raw!r}: {e}") from None
    if "{" in raw:
        return raw
    raise ValueError(f"--chat-template {raw!r}: no such file (and it is not a template)")


def serve_config_from_args(ns: argparse.Namespace) -> ServeConfig:
    """Validated ServeConfig; raises ValueError with the flag's name on a bad combination."""
    from wideep.engine.kv_events import KVEventsConfig

    import logging

    from wideep.utils.hf_cache import resolve_model

    if ns.tensor_parallel_size != 1:
        raise ValueError("--tensor-parallel-size must be 1: wideep runs attention data-parallel (one rank per GPU)")
    model = resolve_model(ns.model)
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ValueError(f"MODEL_DIR {ns.model!r} has no config.json (make one with `wideep make-model tiny --out DIR`)")
    if ns.enable_auto_tool_choice and ns.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (deepseek_v3)")
    if ns.generation_config not in ("auto", "vllm") and not os.path.isdir(ns.generation_config):
        raise ValueError(f"--generation-config {ns.generation_config!r} must be 'auto', 'vllm' or a directory "
                         "holding generation_config.json")
    chat_template = _chat_template_arg(ns.chat_template)
    eager, graph_sizes = _compilation_config(ns.compilation_config)
    for note in _compat_notes(ns):
        logging.getLogger("wideep.serve").warning("%s", note)
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
    names = ns.served_model_name or [ns.model]   # a hub id is served under that id, as vLLM does
    fields = {f.name: getattr(ns, f.name) for f in engine_flag_fields()}
    fields.update(model=model, served_model_name=names[0], data_parallel_size=size, data_parallel_rank=start,
                  data_parallel_size_local=local, data_parallel_start_rank=start,
                  eplb_config=ns.eplb_config or {})
    if eager:
        fields["enforce_eager"] = True
    if graph_sizes:
        fields["cuda_graph_sizes"] = graph_sizes
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
        reasoning_parser=ns.reasoning_parser, reasoning_field=ns.reasoning_field,
        tool_call_parser=ns.tool_call_parser, enable_auto_tool_choice=ns.enable_auto_tool_choice,
        exclude_tools_when_tool_choice_none=ns.exclude_tools_when_tool_choice_none,
        chat_template=chat_template, trust_request_chat_template=ns.trust_request_chat_template,
        generation_config=ns.generation_config if ns.generation_config in ("auto", "vllm")
        else os.path.abspath(ns.generation_config),
    )
