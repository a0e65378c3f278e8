"""The deployment spec: one YAML file describes a wide-EP P/D stack for `wideep up` and `wideep render`.

Typed dataclasses; every key is checked, and an error names the dotted field path
(`decode.data_parallel_size`, `router.port`, ...) so a user knows exactly what to fix.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from wideep.errors import ConfigError
from wideep.typed_config import build, coerce

MAX_TARGET_PORTS = 8  # InferencePool v1 targetPorts maxItems (GAIE >= v1.1)


# A deployment spec field is wrong; `field` is its dotted path (the one ConfigError of wideep.errors).
SpecError = ConfigError


@dataclass
class ModelSpec:
    path: str = "models/tiny"          # a local directory or a Hugging Face id
    served_name: str | None = None     # --served-model-name; defaults to path
    make_tiny: bool = False            # `wideep up`: create the tiny checkpoint at `path` when absent

    @property
    def name(self) -> str:
        return self.served_name or self.path


@dataclass
class ResourcesSpec:
    gpus: int | None = None            # per pod; None = data-parallel ranks per node (GPU accelerators)
    cpu: str | None = None             # requests only (llm-d's guides leave CPU unlimited)
    memory: str | None = None
    ephemeral_storage: str | None = None
    shm: str = "2Gi"                   # /dev/shm emptyDir size (DeepEP/NCCL need it)
    extra: dict[str, str] = field(default_factory=dict)  # more requests=limits, e.g. rdma/ib: "1"


@dataclass
class RoleSpec:
    replicas: int = 1                  # LWS replicas = independent DP groups
    nodes: int = 1                     # pods per group (LWS size / Grove leader + workers)
    data_parallel_size: int = 2        # DP ranks per group, split evenly over `nodes`
    expert_parallel: bool = True
    all2all_backend: str = "allgather_reducescatter"
    port: int = 8000                   # first per-rank HTTP port of the model server
    supervisor_port: int = 8008        # /health and /readyz for all local ranks
    rpc_port: int = 5555               # --data-parallel-rpc-port (torch.distributed rendezvous)
    kv_role: str = "kv_both"
    engine_args: dict[str, Any] = field(default_factory=dict)   # `wideep serve` flags (EngineArgs names)
    vllm_args: dict[str, Any] = field(default_factory=dict)     # extra flags only for --model-server vllm
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    vllm_image: str | None = None
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    sidecar_port: int = 8000           # decode only: routing sidecar listeners (port+i -> model server port+i)

    @property
    def dp_per_node(self) -> int:
        return self.data_parallel_size // self.nodes


@dataclass
class RouterSpec:
    config: str = "default"            # "default" = the wide-EP EndpointPickerConfig, else a file path
    port: int = 8080                   # local: the router's HTTP port; cluster: proxy listener 8081
    image: str | None = None
    replicas: int = 1
    envoy_image: str = "docker.io/envoyproxy/envoy:v1.35.0"
    failure_mode: Literal["FailOpen", "FailClose"] = "FailOpen"
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090


@dataclass
class GatewaySpec:
    mode: Literal["builtin", "standalone", "gateway"] = "builtin"
    provider: Literal["none", "gke", "istio", "kgateway", "agentgateway"] = "none"
    gateway_name: str = "llm-d-inference-gateway"
    request_timeout: str = "0s"


@dataclass
class MonitoringSpec:
    enabled: bool = False
    interval: str = "5s"


@dataclass
class GroveSpec:
    topology_name: str = "cluster-topology"
    pack: Literal["region", "zone", "datacenter", "block", "rack", "host", "numa"] | None = "rack"
    scheduler_name: str | None = None  # e.g. kai-scheduler
    queue: str | None = None           # kai.scheduler/queue label
    mnnvl_group: str | None = None     # grove.io/mnnvl-group annotation
    prefill_first: bool = True         # decode cliques start after the prefill leader is Ready


@dataclass
class ClusterSpec:
    accelerator: Literal["nvidia", "cpu"] = "nvidia"
    gpu_resource: str = "nvidia.com/gpu"
    service_account: str | None = None
    hf_token_secret: str | None = "llm-d-hf-token"
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    rdma_nics: int | None = None       # provider patches; None = GPUs per pod
    startup_budget_s: int = 2700       # startupProbe failureThreshold x 1 s (45 min, as llm-d's guides)


@dataclass
class DeploySpec:
    name: str = "wideep"
    namespace: str = "default"
    guide: str = "wide-ep-lws"         # llm-d.ai/guide label: the InferencePool selector
    image: str = "ghcr.io/wideep/wideep:0.1.0"
    model: ModelSpec = field(default_factory=ModelSpec)
    prefill: RoleSpec = field(default_factory=RoleSpec)
    decode: RoleSpec = field(default_factory=lambda: RoleSpec(port=8200, supervisor_port=8208))
    router: RouterSpec = field(default_factory=RouterSpec)
    gateway: GatewaySpec = field(default_factory=GatewaySpec)
    monitoring: MonitoringSpec = field(default_factory=MonitoringSpec)
    grove: GroveSpec = field(default_factory=GroveSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    # NIXL KV layout of both roles: None = cross-layer blocks for wideep model servers (one descriptor per
    # block instead of per block and layer), per-layer for vLLM ones; false = per layer, to pair with vLLM pods
    kv_cross_layer_blocks: bool | None = None

    def roles(self) -> list[tuple[str, RoleSpec]]:
        return [("prefill", self.prefill), ("decode", self.decode)]

    def role_image(self, role: RoleSpec) -> str:
        return role.image or self.image

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------- loading

def load_spec(path: str | Path) -> DeploySpec:
    import yaml

    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SpecError("<file>", f"{path} is not valid YAML: {exc}") from None
    return spec_from_dict(data)


def spec_from_dict(data: Any) -> DeploySpec:
    if isinstance(data, dict) and "decode" in data and isinstance(data["decode"], (dict, type(None))):
        # decode's own defaults for a partial `decode:` section (its server sits behind the sidecar)
        data = {**data, "decode": {"port": 8200, "supervisor_port": 8208, **(data["decode"] or {})}}
    spec = build(DeploySpec, data, "")
    validate(spec)
    return spec


# -------------------------------------------------------------------------------- validation

def engine_arg_names() -> set[str]:
    """Keys `engine_args` may use: the EngineArgs fields (vLLM names), which `wideep serve` accepts."""
    from wideep.engine.config import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs) if "help" in f.metadata} - MANAGED_ENGINE_ARGS


def engine_arg_types() -> dict[str, Any]:
    from wideep.engine.config import EngineArgs

    return typing.get_type_hints(EngineArgs)


# set through the role's own fields (layout, ports, backend, P/D role), never through engine_args
MANAGED_ENGINE_ARGS = {"model", "served_model_name", "data_parallel_size", "data_parallel_rank",
                       "data_parallel_size_local", "data_parallel_start_rank", "data_parallel_address",
                       "data_parallel_rpc_port", "enable_expert_parallel", "all2all_backend", "kv_transfer_config"}


def validate(spec: DeploySpec) -> None:
    """Cross-field rules; each failure names the field to change."""
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", spec.name) or len(spec.name) > 40:
        raise SpecError("name", f"{spec.name!r} must be a lowercase DNS label of at most 40 characters")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", spec.namespace):
        raise SpecError("namespace", f"{spec.namespace!r} must be a lowercase DNS label")
    if not spec.model.path:
        raise SpecError("model.path", "must name a model directory or a Hugging Face id")
    allowed_args = engine_arg_names()
    arg_types = engine_arg_types()
    for role_name, role in spec.roles():
        if role.replicas < 0:
            raise SpecError(f"{role_name}.replicas", f"must be >= 0, got {role.replicas}")
        if role.nodes < 1:
            raise SpecError(f"{role_name}.nodes", f"must be >= 1, got {role.nodes}")
        if role.data_parallel_size < 1:
            raise SpecError(f"{role_name}.data_parallel_size", f"must be >= 1, got {role.data_parallel_size}")
        if role.data_parallel_size % role.nodes:
            raise SpecError(f"{role_name}.data_parallel_size",
                            f"{role.data_parallel_size} ranks cannot be split evenly over "
                            f"{role_name}.nodes={role.nodes} nodes")
        if role.dp_per_node > MAX_TARGET_PORTS:
            raise SpecError(f"{role_name}.data_parallel_size",
                            f"{role.data_parallel_size} ranks over {role.nodes} node(s) = {role.dp_per_node} ranks "
                            f"per node, but an InferencePool's targetPorts holds at most {MAX_TARGET_PORTS} "
                            f"(raise {role_name}.nodes)")
        for port_field in ("port", "supervisor_port", "rpc_port", "sidecar_port"):
            p = getattr(role, port_field)
            if not 1 <= p <= 65535:
                raise SpecError(f"{role_name}.{port_field}", f"{p} is not a TCP port")
        if role.supervisor_port in range(role.port, role.port + role.dp_per_node):
            raise SpecError(f"{role_name}.supervisor_port",
                            f"{role.supervisor_port} collides with the rank ports {role.port}..{role.port + role.dp_per_node - 1}")
        for key, value in role.engine_args.items():
            name = key.replace("-", "_")
            if name not in allowed_args:
                raise SpecError(f"{role_name}.engine_args.{key}",
                                "not a `wideep serve` engine argument (set it through the role's own fields, or "
                                "put vLLM-only flags in vllm_args)")
            coerce(arg_types[name], value, f"{role_name}.engine_args.{key}")  # the type `wideep serve` needs
    d = spec.decode
    if d.sidecar_port in range(d.port, d.port + d.dp_per_node) or \
            d.port in range(d.sidecar_port, d.sidecar_port + d.dp_per_node):
        raise SpecError("decode.sidecar_port", f"sidecar ports {d.sidecar_port}+i overlap the decode server ports {d.port}+i")
    if spec.prefill.dp_per_node != spec.decode.dp_per_node:
        # One InferencePool lists one set of targetPorts for both roles (8000..8000+n-1).
        raise SpecError("decode.data_parallel_size",
                        f"decode has {spec.decode.dp_per_node} ranks per node but prefill has "
                        f"{spec.prefill.dp_per_node}; one InferencePool needs the same ranks per node on both roles")
    if spec.prefill.port != spec.decode.sidecar_port:
        raise SpecError("decode.sidecar_port",
                        f"must equal prefill.port ({spec.prefill.port}): the InferencePool's targetPorts "
                        "serve both roles")
    if spec.gateway.mode == "gateway" and spec.gateway.provider == "none":
        pass  # a Gateway of any implementation; the HTTPRoute is the same
    if spec.router.config != "default" and not spec.router.config:
        raise SpecError("router.config", "use 'default' or a path to an EndpointPickerConfig file")


def serve_flag_args(args: dict[str, Any]) -> list[str]:
    """`engine_args` as `wideep serve` flags: like engine_flag_args, and a false boolean whose EngineArgs
    default is true becomes --no-<flag> (so `enable-prefix-caching: false` takes effect), a list becomes
    one flag followed by its items (nargs flags such as --cuda-graph-sizes)."""
    from wideep.engine.config import EngineArgs

    defaults = {f.name: f.default for f in dataclasses.fields(EngineArgs)}
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        name = str(key).replace("-", "_")
        if value is False and defaults.get(name) is True:
            out.append("--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += engine_flag_args({key: value})
    return out


def engine_flag_args(args: dict[str, Any]) -> list[str]:
    """`{max-num-seqs: 256, enable-dbo: true}` -> ['--max-num-seqs', '256', '--enable-dbo']."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (dict, list)):
            out += [flag, json.dumps(value, separators=(",", ":"))]
        else:
            out += [flag, str(value)]
    return out
