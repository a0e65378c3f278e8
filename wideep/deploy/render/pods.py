"""One model-server pod of a role (shared by LeaderWorkerSet and Grove): the launch script, env,
ports, probes, volumes, resources, and on decode the routing sidecar as a native sidecar."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from wideep.deploy.commands import RankLayout, Raw, serve_argv, shell_join, sidecar_argv, vllm_serve_argv
from wideep.deploy.spec import DeploySpec, RoleSpec

CACHE_ROOT = "/var/cache/vllm"
HF_CACHE = "/var/cache/huggingface"


def model_label(spec: DeploySpec) -> str:
    """`llm-d.ai/model` label value: the model's last path segment, in label characters."""
    name = spec.model.name.rstrip("/").split("/")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "-", name)[:63].strip("-._")
    return name or "model"


def common_labels(spec: DeploySpec) -> dict[str, str]:
    gpu = spec.cluster.accelerator == "nvidia"
    return {"llm-d.ai/inference-serving": "true",
            "llm-d.ai/guide": spec.guide,
            "llm-d.ai/accelerator-variant": "gpu" if gpu else "cpu",
            "llm-d.ai/accelerator-vendor": "nvidia" if gpu else "none",
            "llm-d.ai/model": model_label(spec)}


def role_labels(spec: DeploySpec, role_name: str) -> dict[str, str]:
    return {**common_labels(spec), "llm-d.ai/role": role_name}


@dataclass
class Launch:
    """How a pod learns its place in the DP group: shell lines that set LEADER, DP_SIZE, START_RANK."""
    prelude: list[str]


def lws_launch() -> Launch:
    return Launch([
        'LEADER="${LWS_LEADER_ADDRESS}"',
        "DP_SIZE=$(( ${LWS_GROUP_SIZE:-1} * DP_SIZE_LOCAL ))",
        "START_RANK=$(( ${LWS_WORKER_INDEX:-0} * DP_SIZE_LOCAL ))",
    ])


def grove_launch(kind: str) -> Launch:
    """kind: 'single' (a clique whose pods are each a whole DP group), 'leader' or 'worker' of a scaling group."""
    if kind == "single":
        return Launch(['LEADER="127.0.0.1"', "DP_SIZE=${DP_SIZE_LOCAL}", "START_RANK=0"])
    lines = ['LEADER="${GROVE_PCLQ_NAME/worker/leader}-0.${GROVE_HEADLESS_SERVICE}"',
             "DP_SIZE=$(( GROVE_PCSG_TEMPLATE_NUM_PODS * DP_SIZE_LOCAL ))"]
    if kind == "leader":
        lines.append("START_RANK=0")
    else:
        lines.append("START_RANK=$(( (GROVE_PCLQ_POD_INDEX + 1) * DP_SIZE_LOCAL ))")
    return Launch(lines)


def launch_script(spec: DeploySpec, role: RoleSpec, launch: Launch, model_server: str) -> str:
    layout = RankLayout(port=str(role.port), supervisor_port=str(role.supervisor_port), dp_size=Raw("$DP_SIZE"),
                        dp_size_local=Raw("$DP_SIZE_LOCAL"), start_rank=Raw("$START_RANK"),
                        dp_address=Raw('"$LEADER"'), rpc_port=str(role.rpc_port))
    if model_server == "vllm":
        argv = vllm_serve_argv(spec, role, layout)
    else:
        argv = serve_argv(spec, role, layout)
    lines = ["set -euo pipefail",
             "# a crashed run's files fill /dev/shm and crash-loop the next start (llm-d#352)",
             "find /dev/shm -type f -delete || true",
             *launch.prelude,
             'echo "rank layout: leader=$LEADER dp_size=$DP_SIZE start_rank=$START_RANK local=$DP_SIZE_LOCAL"',
             "exec " + shell_join(argv)]
    return "\n".join(lines) + "\n"


def _env_list(d: dict[str, str]) -> list[dict[str, Any]]:
    return [{"name": k, "value": str(v)} for k, v in d.items()]


def role_env(spec: DeploySpec, role_name: str, role: RoleSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if spec.cluster.hf_token_secret:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": spec.cluster.hf_token_secret, "key": "HF_TOKEN", "optional": True}}})
    base = {"DP_SIZE_LOCAL": str(role.dp_per_node), "TP_SIZE": "1", "HF_HUB_CACHE": HF_CACHE,
            "VLLM_CACHE_ROOT": f"{CACHE_ROOT}/vllm", "VLLM_LOGGING_LEVEL": "INFO",
            "VLLM_RANDOMIZE_DP_DUMMY_INPUTS": "1"}
    if spec.cluster.accelerator == "nvidia":
        base.update({
            "CUDA_CACHE_PATH": f"{CACHE_ROOT}/cuda", "CCACHE_DIR": f"{CACHE_ROOT}/ccache",
            "FLASHINFER_WORKSPACE_BASE": f"{CACHE_ROOT}/flashinfer", "TRITON_LIBCUDA_PATH": "/usr/lib64",
            "VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS": "1", "VLLM_SKIP_P2P_CHECK": "1",
            "NVIDIA_GDRCOPY": "enabled", "NVSHMEM_REMOTE_TRANSPORT": "ibgda", "NVSHMEM_IB_ENABLE_IBGDA": "true",
            "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"})
    if role_name == "prefill":
        base.update({"VLLM_ENGINE_READY_TIMEOUT_S": "3000", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "120"})
    elif spec.cluster.accelerator == "nvidia":
        base.update({"VLLM_USE_DEEP_GEMM": "1", "NVSHMEM_SYMMETRIC_SIZE": "16G"})
    if spec.cluster.accelerator == "nvidia":
        # NIXL KV transfer as the llm-d guides configure it: RDMA (rc), shared memory and CUDA
        # copy/IPC lanes; the side channel's base port (rank r listens on base + r).
        base.update({"UCX_TLS": "rc,sm,self,cuda_copy,cuda_ipc", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600"})
    base.update(role.env)
    env += _env_list(base)
    # The P/D side channel (NIXL-compatible) advertises the pod IP to the other role.
    env.append({"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    return env


def role_resources(spec: DeploySpec, role: RoleSpec) -> dict[str, Any]:
    r = role.resources
    limits: dict[str, Any] = {}
    requests: dict[str, Any] = {}
    if spec.cluster.accelerator == "nvidia":
        gpus = str(r.gpus if r.gpus is not None else role.dp_per_node)
        limits[spec.cluster.gpu_resource] = gpus
    for key, value in (("memory", r.memory), ("ephemeral-storage", r.ephemeral_storage)):
        if value:
            limits[key] = str(value)
    for key, value in r.extra.items():
        limits[key] = str(value)
    requests.update(limits)
    if r.cpu:
        requests["cpu"] = str(r.cpu)
    out: dict[str, Any] = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def gpus_per_pod(spec: DeploySpec, role: RoleSpec) -> int:
    return role.resources.gpus if role.resources.gpus is not None else role.dp_per_node


def rank_port_name(i: int, decode_server: bool) -> str:
    return f"vllm-rank{i}" if decode_server else f"rank{i}"


def probes(spec: DeploySpec) -> dict[str, Any]:
    def get(path: str, period: int, threshold: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "supervisor"}, "periodSeconds": period,
                "timeoutSeconds": 5, "failureThreshold": threshold}
    return {"startupProbe": get("/health", 1, spec.cluster.startup_budget_s),
            "livenessProbe": get("/health", 30, 3),
            "readinessProbe": get("/readyz", 10, 3)}


def role_pod_spec(spec: DeploySpec, role_name: str, role: RoleSpec, launch: Launch, model_server: str) -> dict[str, Any]:
    decode = role_name == "decode"
    image = (role.vllm_image or "ghcr.io/llm-d/llm-d-cuda:v0.8.0") if model_server == "vllm" else spec.role_image(role)
    ports = [{"name": rank_port_name(i, decode), "containerPort": role.port + i, "protocol": "TCP"}
             for i in range(role.dp_per_node)]
    ports.append({"name": "supervisor", "containerPort": role.supervisor_port, "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": "vllm" if model_server == "vllm" else "wideep",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/bash", "-c"],
        "args": [launch_script(spec, role, launch, model_server)],
        "env": role_env(spec, role_name, role),
        "ports": ports,
        **probes(spec),
        "resources": role_resources(spec, role),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                         {"name": "hf-cache", "mountPath": HF_CACHE},
                         {"name": "jit-cache", "mountPath": CACHE_ROOT}],
    }
    if spec.cluster.accelerator == "nvidia":
        container["securityContext"] = {"capabilities": {"add": ["IPC_LOCK", "SYS_RAWIO"]},
                                        "runAsUser": 0, "runAsGroup": 0}
    pod: dict[str, Any] = {}
    if spec.cluster.service_account:
        pod["serviceAccountName"] = spec.cluster.service_account
    if decode:
        pod["initContainers"] = [sidecar_container(spec, role)]
    pod["containers"] = [container]
    pod["volumes"] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": role.resources.shm}},
        {"name": "hf-cache", "emptyDir": {}},
        {"name": "jit-cache", "emptyDir": {}},
    ]
    if spec.cluster.tolerations:
        pod["tolerations"] = list(spec.cluster.tolerations)
    if spec.cluster.node_selector:
        pod["nodeSelector"] = dict(spec.cluster.node_selector)
    return pod


def sidecar_container(spec: DeploySpec, role: RoleSpec) -> dict[str, Any]:
    """The decode routing proxy as a native sidecar (restartPolicy Always in initContainers)."""
    argv = sidecar_argv(role, port=role.sidecar_port, vllm_port=role.port)
    return {
        "name": "routing-proxy",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": argv[:1],
        "args": argv[1:],
        "ports": [{"name": f"rank{i}", "containerPort": role.sidecar_port + i, "protocol": "TCP"}
                  for i in range(role.dp_per_node)],
        "restartPolicy": "Always",
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True},
    }
