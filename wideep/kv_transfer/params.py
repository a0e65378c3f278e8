"""`kv_transfer_params` as vLLM's NixlConnector and llm-d's sidecar spell them, plus the env knobs.

The field names are the wire contract between router/sidecar, prefill server and decode server
(docs/protocols.md, "P/D disaggregation"); keep them exactly as vLLM names them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from wideep import envs
from wideep.errors import ConfigError
from wideep.typed_config import build

DEFAULT_SIDE_CHANNEL_PORT = 5600
# Asks a wideep frontend to check a completion request exactly as it would serve it and answer
# 200 {"valid": true} or the error, running nothing: the sidecar asks the decode rank before it
# spends prefill KV on a request decode would refuse.
VALIDATE_ONLY_HEADER = "x-wideep-validate-only"
DEFAULT_ABORT_TIMEOUT_S = 480.0

# What the sidecar sends on the prefill leg: "compute the prompt and hold the KV for me".
PREFILL_LEG_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def side_channel_base_port() -> int:
    """Base port of the side channel; rank r listens on base + r. WIDEEP_KV_SIDE_CHANNEL_PORT wins over
    vLLM's VLLM_NIXL_SIDE_CHANNEL_PORT so tests can give every server its own ephemeral range."""
    port = envs.WIDEEP_KV_SIDE_CHANNEL_PORT
    if port is None:
        port = envs.VLLM_NIXL_SIDE_CHANNEL_PORT
    return DEFAULT_SIDE_CHANNEL_PORT if port is None else port


def side_channel_host() -> str:
    """The address the consumer is told to dial (the pod IP on Kubernetes)."""
    return envs.WIDEEP_KV_SIDE_CHANNEL_HOST or envs.VLLM_NIXL_SIDE_CHANNEL_HOST or "127.0.0.1"


def abort_timeout_s() -> float:
    """How long a producer holds blocks nobody has read (vLLM's VLLM_NIXL_ABORT_REQUEST_TIMEOUT)."""
    return envs.VLLM_NIXL_ABORT_REQUEST_TIMEOUT


def engine_id_for_rank(base: str, dp_rank: int) -> str:
    """vLLM suffixes the engine id with the DP rank so each rank is its own NIXL agent."""
    return f"{base}_dp{dp_rank}"


@dataclass
class KVTransferConfig:
    """`--kv-transfer-config` JSON: which connector, which role, what to do when a KV read fails."""

    kv_connector: str = "NixlConnector"
    kv_role: Literal["kv_producer", "kv_consumer", "kv_both"] = "kv_both"
    kv_load_failure_policy: Literal["fail", "recompute"] = "recompute"
    engine_id: str | None = None             # base id; default: a random uuid per server start
    kv_connector_extra_config: dict[str, Any] | None = None

    TRANSPORTS = ("auto", "nixl", "tcp")

    def __post_init__(self) -> None:
        """The NIXL knobs in kv_connector_extra_config, checked once (other keys, e.g. vLLM's `backends`, pass)."""
        extra = self.kv_connector_extra_config
        if extra is not None and not isinstance(extra, dict):
            raise ConfigError("kv_transfer_config.kv_connector_extra_config", f"must be an object, got {extra!r}")
        if self.transport not in self.TRANSPORTS:
            raise ConfigError("kv_transfer_config.kv_connector_extra_config.transport",
                              f"must be one of {', '.join(self.TRANSPORTS)}, got {self.transport!r}")
        t = self.nixl_threads
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= 64:
            raise ConfigError("kv_transfer_config.kv_connector_extra_config.num_threads",
                              f"must be an integer 0..64, got {t!r}")
        if not isinstance(self.enforce_handshake_compat, bool):
            raise ConfigError("kv_transfer_config.kv_connector_extra_config.enforce_handshake_compat",
                              "must be true or false")
        v = (extra or {}).get("enable_cross_layers_blocks", False)
        # vLLM reads the key as str(value).lower() == "true", so its manifests carry "True"/"False" strings
        if isinstance(v, str) and v.lower() in ("true", "false"):
            v = v.lower() == "true"
        if not isinstance(v, bool):
            raise ConfigError("kv_transfer_config.kv_connector_extra_config.enable_cross_layers_blocks",
                              f"must be true or false, got {v!r}")
        self._cross_layers_blocks = v

    @property
    def transport(self) -> str:
        """auto: NIXL when importable, else the TCP side channel (logged once); nixl: NIXL or an error; tcp."""
        return (self.kv_connector_extra_config or {}).get("transport", "auto")

    @property
    def nixl_threads(self) -> int:
        """vLLM's kv_connector_extra_config.num_threads: UCX worker threads of the NIXL agent (default 4)."""
        return (self.kv_connector_extra_config or {}).get("num_threads", 4)

    @property
    def enforce_handshake_compat(self) -> bool:
        """vLLM's knob: refuse a producer whose compatibility hash differs (default true)."""
        return (self.kv_connector_extra_config or {}).get("enforce_handshake_compat", True)

    @property
    def cross_layers_blocks(self) -> bool:
        """vLLM's enable_cross_layers_blocks: one block-major cache registered with NIXL as a single region
        (block length = all layers of a block). Default false, as in vLLM (whose MLA backends never use it):
        a wideep-only P/D pair turns it on for both roles."""
        return self._cross_layers_blocks

    @property
    def is_producer(self) -> bool:
        return self.kv_role in ("kv_producer", "kv_both")

    @property
    def is_consumer(self) -> bool:
        return self.kv_role in ("kv_consumer", "kv_both")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "KVTransferConfig | None":
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ConfigError("kv_transfer_config", f"must be a JSON object, got {d!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        # vLLM's KVTransferConfig has more knobs (kv_buffer_device, kv_rank, ...) that manifests written for
        # vLLM carry; they do not apply to this connector and are left out before the typed check.
        return build(cls, {k: v for k, v in d.items() if k in known}, "kv_transfer_config")


@dataclass
class RemotePrefillParams:
    """What a consumer needs to pull a prompt's KV: parsed from the producer's returned params."""

    remote_engine_id: str
    remote_block_ids: list[int]
    remote_request_id: str
    remote_host: str
    remote_port: int
    tp_size: int = 1

    @classmethod
    def parse(cls, p: dict[str, Any]) -> "RemotePrefillParams":
        def need(name: str, typ: type) -> Any:
            v = p.get(name)
            if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
                raise ValueError(f"kv_transfer_params.{name} must be {typ.__name__}, got {v!r}")
            return v

        block_ids = p.get("remote_block_ids")
        if not isinstance(block_ids, list) or not all(isinstance(b, int) and b >= 0 for b in block_ids):
            raise ValueError(f"kv_transfer_params.remote_block_ids must be a list of block ids, got {block_ids!r}")
        try:
            tp_size = int(p.get("tp_size") or 1)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"kv_transfer_params.tp_size must be an integer, got {p.get('tp_size')!r}") from None
        return cls(
            remote_engine_id=need("remote_engine_id", str),
            remote_block_ids=block_ids,
            remote_request_id=str(p.get("remote_request_id") or ""),
            remote_host=need("remote_host", str),
            remote_port=need("remote_port", int),
            tp_size=tp_size,
        )


def wants_remote_decode(p: dict[str, Any] | None) -> bool:
    return bool(p and p.get("do_remote_decode"))


def wants_remote_prefill(p: dict[str, Any] | None) -> bool:
    return bool(p and p.get("do_remote_prefill"))
