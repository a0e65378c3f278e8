"""inference-perf's workload YAML as typed dataclasses, validated strictly.

The same file runs under the real inference-perf and under `wideep bench`, so the field names,
defaults and strictness (an unknown key is an error) follow inference-perf 0.7.0.
llm-d's run_only.sh templates (`endpoint:/harness:/workload:` sections) are accepted too: each
entry of `workload:` is one inference-perf config.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from wideep.errors import ConfigError
from wideep.typed_config import build, to_plain


__all__ = ["BenchConfig", "ConfigError", "Distribution", "load_workloads", "parse_config"]


# ---------------------------------------------------------------- sections

@dataclass
class Distribution:
    min: int = 10
    max: int = 1024
    mean: float = 512
    std_dev: Optional[float] = None   # None: sqrt(variance) when variance is given, else 200
    total_count: Optional[int] = None
    type: str = "normal"  # normal | skew_normal | lognormal | uniform | poisson | fixed
    variance: Optional[float] = None
    skew: float = 0.0

    def __post_init__(self) -> None:
        if self.std_dev is None and self.variance is None:
            self.std_dev = DEFAULT_STD_DEV

    def validate(self, where: str) -> None:
        if self.type not in DISTRIBUTION_TYPES:
            raise ConfigError(f"{where}.type", f"unknown distribution {self.type!r} (one of {', '.join(DISTRIBUTION_TYPES)})")
        if self.variance is not None:
            if self.std_dev is not None:
                raise ConfigError(where, "give either std_dev or variance, not both")
            if self.variance < 0:
                raise ConfigError(f"{where}.variance", "cannot be negative")
            self.std_dev = self.variance ** 0.5
        if self.min > self.max:
            raise ConfigError(where, f"min ({self.min}) is greater than max ({self.max})")
        if self.std_dev < 0:
            raise ConfigError(f"{where}.std_dev", "cannot be negative")


DEFAULT_STD_DEV = 200.0  # inference-perf's default
DISTRIBUTION_TYPES = ("normal", "skew_normal", "lognormal", "uniform", "poisson", "fixed")


@dataclass
class APIConfig:
    type: str = "completion"  # completion | chat
    streaming: bool = False
    headers: Optional[dict] = None
    slo_unit: Optional[str] = None
    slo_tpot_header: Optional[str] = None
    slo_ttft_header: Optional[str] = None
    session_id_header_key: Optional[str] = None
    session_token_header: Optional[str] = None


@dataclass
class SharedPrefixConfig:
    num_groups: int = 10
    num_prompts_per_group: int = 10
    system_prompt_len: Union[int, Distribution] = 100
    question_len: Union[int, Distribution] = 50
    output_len: Union[int, Distribution] = 50
    seed: Optional[int] = None
    question_distribution: Optional[Distribution] = None
    output_distribution: Optional[Distribution] = None
    enable_multi_turn_chat: bool = False

    ALIASES = {"num_unique_system_prompts": "num_groups", "num_users_per_system_prompt": "num_prompts_per_group"}


@dataclass
class DataConfig:
    type: str = "mock"  # random | synthetic | shared_prefix | mock (others: not supported here)
    path: Optional[str] = None
    corpus_file_path: Optional[str] = None
    input_distribution: Optional[Distribution] = None
    output_distribution: Optional[Distribution] = None
    shared_prefix: Optional[SharedPrefixConfig] = None
    use_chat_template: bool = False
    multimodal: Optional[dict] = None
    trace: Optional[dict] = None


@dataclass
class LoadStage:
    rate: Optional[float] = None
    duration: Optional[float] = None
    num_requests: Optional[int] = None
    concurrency_level: Optional[int] = None


@dataclass
class SweepConfig:
    type: str = "geometric"  # geometric | linear
    num_requests: int = 2000
    timeout: float = 60
    num_stages: int = 5
    stage_duration: int = 180
    saturation_percentile: float = 95


@dataclass
class LoadConfig:
    type: str = "constant"  # constant | poisson | concurrent
    interval: float = 1.0
    stages: list[LoadStage] = field(default_factory=list)
    sweep: Optional[SweepConfig] = None
    num_workers: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    worker_max_concurrency: int = 100
    worker_max_tcp_connections: int = 2500
    request_timeout: Optional[float] = None
    request_retries: int = 0
    request_retry_backoff_sec: float = 0.5
    stage_teardown_grace_seconds: float = 120.0
    base_seed: Optional[int] = None
    trace: Optional[dict] = None
    circuit_breakers: list = field(default_factory=list)
    lora_traffic_split: Optional[list] = None


@dataclass
class ServerConfig:
    type: str = "vllm"
    model_name: Optional[str] = None
    base_url: str = "http://127.0.0.1:8000"
    ignore_eos: bool = True
    api_key: Optional[str] = None
    cert_path: Optional[str] = None
    key_path: Optional[str] = None


@dataclass
class TokenizerConfig:
    pretrained_model_name_or_path: Optional[str] = None
    trust_remote_code: Optional[bool] = None
    token: Optional[str] = None
    load_timeout: Optional[float] = None


@dataclass
class PerRequestFields:
    request: bool = True
    response: bool = True
    info: bool = True
    response_chunks: bool = True
    computed_metrics: bool = False


@dataclass
class RequestLifecycleReport:
    summary: bool = True
    per_stage: bool = True
    per_request: bool = False
    per_request_fields: PerRequestFields = field(default_factory=PerRequestFields)
    per_adapter: bool = True
    per_adapter_stage: bool = False
    percentiles: list[float] = field(default_factory=lambda: [0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9])
    use_server_output_tokens: bool = False
    max_error_messages: int = 100


@dataclass
class ReportConfig:
    request_lifecycle: RequestLifecycleReport = field(default_factory=RequestLifecycleReport)
    prometheus: Optional[dict] = None
    session_lifecycle: Optional[dict] = None
    goodput: Optional[dict] = None


@dataclass
class LocalStorage:
    path: str = "reports-{timestamp}"
    report_file_prefix: Optional[str] = None


@dataclass
class StorageConfig:
    local_storage: LocalStorage = field(default_factory=LocalStorage)
    google_cloud_storage: Optional[dict] = None
    simple_storage_service: Optional[dict] = None


@dataclass
class BenchConfig:
    """One inference-perf run: what to send, how hard, where, and what to report."""

    api: APIConfig = field(default_factory=APIConfig)
    data: DataConfig = field(default_factory=DataConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    metrics: Optional[dict] = None
    report: ReportConfig = field(default_factory=ReportConfig)
    storage: Optional[StorageConfig] = field(default_factory=StorageConfig)
    server: Optional[ServerConfig] = None
    tokenizer: Optional[TokenizerConfig] = None
    circuit_breakers: Optional[list] = None

    def to_dict(self) -> dict:
        return to_plain(self)


# ---------------------------------------------------------------- loading

SUPPORTED = {
    "api.type": ("completion", "chat"),
    "data.type": ("random", "synthetic", "shared_prefix", "mock"),
    "load.type": ("constant", "poisson", "concurrent"),
    "load.sweep.type": ("geometric", "linear"),
}
TEMPLATE_SECTIONS = {"endpoint", "control", "harness", "env", "hooks", "workload"}


def _validate(cfg: BenchConfig) -> BenchConfig:
    for dotted, allowed in SUPPORTED.items():
        obj: Any = cfg
        for part in dotted.split(".")[:-1]:
            obj = getattr(obj, part)
            if obj is None:
                break
        if obj is None:
            continue
        value = getattr(obj, dotted.split(".")[-1])
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not supported by wideep bench (supported: {', '.join(allowed)})")
    for name in ("input_distribution", "output_distribution"):
        dist = getattr(cfg.data, name)
        if dist is not None:
            dist.validate(f"data.{name}")
    if cfg.data.type in ("random", "synthetic"):
        for name in ("input_distribution", "output_distribution"):
            if getattr(cfg.data, name) is None:
                raise ConfigError(f"data.{name} is required for data.type {cfg.data.type!r}")
    if cfg.data.type == "shared_prefix" and cfg.data.shared_prefix is None:
        raise ConfigError("data.shared_prefix is required for data.type 'shared_prefix'")
    if cfg.data.type == "random" and cfg.api.type != "completion":
        raise ConfigError("data.type 'random' supports only api.type 'completion' (as in inference-perf)")
    for field_name in ("multimodal", "trace"):
        if getattr(cfg.data, field_name):
            raise ConfigError(f"data.{field_name} is not supported by wideep bench")
    load = cfg.load
    if not load.stages and load.sweep is None:
        raise ConfigError("load.stages: give at least one stage (or load.sweep)")
    if load.type == "concurrent":
        if load.sweep is not None:
            raise ConfigError("load.sweep cannot be used with load.type 'concurrent'")
        for i, st in enumerate(load.stages):
            if not st.num_requests or not st.concurrency_level or st.num_requests <= 0 or st.concurrency_level <= 0:
                raise ConfigError(f"load.stages[{i}]: a concurrent stage needs positive num_requests and concurrency_level")
    else:
        for i, st in enumerate(load.stages):
            if st.num_requests is not None or st.concurrency_level is not None:
                raise ConfigError(f"load.stages[{i}]: num_requests/concurrency_level are only for load.type 'concurrent'")
            if not st.rate or st.rate <= 0 or not st.duration or st.duration <= 0:
                raise ConfigError(f"load.stages[{i}]: a {load.type} stage needs positive rate and duration")
    if cfg.server is None:
        raise ConfigError("server: missing (give server.base_url, or --base-url)")
    return cfg


def _expand_env(text: str) -> str:
    """envsubst for the variables that are set; unset ${X} stay so the error can name them."""
    return re.sub(r"\$\{(\w+)\}", lambda m: os.environ.get(m.group(1), m.group(0)), text)


def parse_config(data: dict, where: str = "") -> BenchConfig:
    """A validated BenchConfig from one inference-perf config mapping."""
    cfg = build(BenchConfig, data, where)
    try:
        return _validate(cfg)
    except ConfigError as exc:
        if where:
            raise ConfigError(f"{where}.{exc.field}" if exc.field else where, exc.message) from None
        raise


def load_workloads(path: str | os.PathLike, workload: str | None = None) -> dict[str, BenchConfig]:
    """Workload name -> config. A plain inference-perf file yields one entry named after the file;
    a run_only.sh template yields one per `workload:` entry (or just `workload` if named)."""
    text = Path(path).read_text()
    data = yaml.safe_load(_expand_env(text)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    if "workload" in data and set(data) <= TEMPLATE_SECTIONS:
        entries = data["workload"]
        if not isinstance(entries, dict) or not entries:
            raise ConfigError(f"{path}: 'workload' must map workload names to inference-perf configs")
        if workload is not None:
            if workload not in entries:
                raise ConfigError(f"{path}: no workload named {workload!r} (have: {', '.join(entries)})")
            entries = {workload: entries[workload]}
        return {name: parse_config(body, f"workload.{name}") for name, body in entries.items()}
    if "workload" in data:
        extra = sorted(set(data) - TEMPLATE_SECTIONS)
        raise ConfigError(f"unknown key '{extra[0]}' in a run_only.sh template (known: {', '.join(sorted(TEMPLATE_SECTIONS))})")
    name = Path(path).stem
    if workload is not None and workload != name:
        raise ConfigError(f"{path} is a single inference-perf config; --workload {workload!r} does not apply")
    return {name: parse_config(data)}
