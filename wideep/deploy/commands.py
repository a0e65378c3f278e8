"""Command lines of the stack's processes, shared by the local launcher and the Kubernetes renderer.

A pod runs exactly what `wideep up` runs locally; only the values differ (a shell expression such
as `$START_RANK` in a pod, a number on this host). `Raw` marks a word the pod's shell expands.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from wideep.deploy.spec import DeploySpec, RoleSpec, SpecError, engine_flag_args, serve_flag_args


class Raw(str):
    """A shell word left unquoted in a pod script (e.g. "$START_RANK")."""


Word = str  # str or Raw


def kv_transfer_config(role: RoleSpec, cross_layers: bool = False) -> str:
    """NixlConnector on both roles. cross_layers: one block-major KV region per engine instead of one per
    layer, so a transfer is one descriptor per block rather than per block and layer (both roles must agree;
    vLLM's MLA backends register per layer, so a vLLM pod never gets it)."""
    cfg: dict = {"kv_connector": "NixlConnector", "kv_role": role.kv_role, "kv_load_failure_policy": "fail"}
    if cross_layers:
        cfg["kv_connector_extra_config"] = {"enable_cross_layers_blocks": True}
    return json.dumps(cfg, separators=(",", ":"))


@dataclass
class RankLayout:
    """Where one node's ranks sit in the role's DP group; numbers locally, shell words in a pod."""
    port: Word
    supervisor_port: Word
    dp_size: Word
    dp_size_local: Word
    start_rank: Word
    dp_address: Word
    rpc_port: Word
    host: Word = "0.0.0.0"


def serve_argv(spec: DeploySpec, role: RoleSpec, layout: RankLayout, *, executable: list[str] | None = None,
               kv_events_config: dict | None = None) -> list[Word]:
    """`wideep serve MODEL ...` for one node of a role (the pod entrypoint, vLLM flag names)."""
    argv: list[Word] = list(executable or ["wideep"]) + ["serve", spec.model.path]
    argv += ["--served-model-name", spec.model.name,
             "--host", layout.host,
             "--port", layout.port,
             "--data-parallel-supervisor-port", layout.supervisor_port,
             "--data-parallel-size", layout.dp_size,
             "--data-parallel-size-local", layout.dp_size_local,
             "--data-parallel-start-rank", layout.start_rank,
             "--data-parallel-address", layout.dp_address,
             "--data-parallel-rpc-port", layout.rpc_port]
    if role.expert_parallel:
        argv.append("--enable-expert-parallel")
    argv += ["--all2all-backend", role.all2all_backend,
             "--kv-transfer-config", kv_transfer_config(role, spec.kv_cross_layer_blocks is not False)]
    args = dict(role.engine_args)
    if kv_events_config is not None:
        args = {k: v for k, v in args.items() if k.replace("_", "-") != "kv-events-config"}
        args["kv-events-config"] = kv_events_config
    argv += serve_flag_args(args)
    return argv


def vllm_serve_argv(spec: DeploySpec, role: RoleSpec, layout: RankLayout) -> list[Word]:
    """llm-d's wide-ep-lws `vllm serve` line (multi-port external LB) for one node."""
    if spec.kv_cross_layer_blocks:
        raise SpecError("kv_cross_layer_blocks", "vLLM's MLA backends register the KV cache per layer; "
                        "leave it unset or false with --model-server vllm")
    argv: list[Word] = ["vllm", "serve", spec.model.path,
                        "--served-model-name", spec.model.name,
                        "--port", layout.port,
                        "--trust-remote-code",
                        "--disable-uvicorn-access-log",
                        "--data-parallel-multi-port-external-lb",
                        "--data-parallel-supervisor-port", layout.supervisor_port]
    if role.expert_parallel:
        argv.append("--enable-expert-parallel")
    argv += ["--tensor-parallel-size", Raw("$TP_SIZE"),
             "--data-parallel-size", layout.dp_size,
             "--data-parallel-size-local", layout.dp_size_local,
             "--data-parallel-address", layout.dp_address,
             "--data-parallel-rpc-port", layout.rpc_port,
             "--data-parallel-start-rank", layout.start_rank,
             "--kv_transfer_config", kv_transfer_config(role),
             "--all2all-backend", role.all2all_backend]
    argv += engine_flag_args(role.engine_args) + engine_flag_args(role.vllm_args)
    return argv


def sidecar_argv(role: RoleSpec, *, port: int, vllm_port: int, executable: list[str] | None = None,
                 allowlist: list[str] | None = None, host: str | None = None) -> list[str]:
    """`wideep sidecar`: decode listener port+i forwards to the decode server vllm_port+i."""
    argv = list(executable or ["wideep"]) + [
        "sidecar", f"--port={port}", f"--vllm-port={vllm_port}",
        f"--data-parallel-size={role.dp_per_node}", "--kv-connector=nixlv2", "--enable-prefiller-sampling"]
    if allowlist:
        argv.append("--prefiller-allowlist=" + ",".join(allowlist))
    if host:
        argv.append(f"--host={host}")
    return argv


def router_argv(spec: DeploySpec, *, config_path: str, port: int | None, grpc_port: int, health_port: int,
                metrics_port: int, executable: list[str] | None = None, endpoints_file: str | None = None,
                pool: tuple[str, str] | None = None, mode: str = "builtin",
                envoy_admin_port: int | None = None, host: str | None = None) -> list[str]:
    """`wideep router`: the Endpoint Picker. mode: builtin (its own HTTP proxy on `port`), envoy (it
    starts Envoy on `port` in front of its ext_proc), ext-proc (gRPC only; a Gateway or an Envoy
    container fronts it)."""
    argv = list(executable or ["wideep"]) + ["router", "--config", config_path]
    if mode == "envoy":
        argv.append("--envoy")
    elif mode == "ext-proc":
        argv.append("--ext-proc")
    if host:
        argv += ["--host", host]
    if port is not None:
        argv += ["--port", str(port)]
    argv += ["--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port),
             "--metrics-port", str(metrics_port), "--failure-mode", spec.router.failure_mode]
    if envoy_admin_port is not None:
        argv += ["--envoy-admin-port", str(envoy_admin_port)]
    if endpoints_file:
        argv += ["--endpoints-file", endpoints_file]
    if pool:
        argv += ["--pool-name", pool[0], "--pool-namespace", pool[1]]
    return argv


def shell_join(argv: list[Word], indent: str = "  ") -> str:
    """One flag per line, quoted except for `Raw` words, so a rendered script reads like llm-d's guides."""
    lines: list[str] = []
    cur: list[str] = []
    for w in argv:
        q = str(w) if isinstance(w, Raw) else shlex.quote(str(w))
        if str(w).startswith("--") and cur:
            lines.append(" ".join(cur))
            cur = []
        cur.append(q)
    if cur:
        lines.append(" ".join(cur))
    return (" \\\n" + indent).join(lines)
