"""The routing layer on a cluster: InferencePool v1, the Endpoint Picker (`wideep router`) with its
RBAC, ConfigMap, Deployment and Service, and the front door (standalone Envoy, a Gateway's
HTTPRoute, or the router's built-in proxy). See docs/protocols.md, "Router" and "Deployment shapes"."""
from __future__ import annotations

from typing import Any

import yaml

from wideep.deploy.commands import router_argv
from wideep.deploy.spec import DeploySpec
from wideep.router.envoy import envoy_config as router_envoy_config

PROXY_PORT = 8081          # the in-pod HTTP listener (Envoy or built-in), Service port 80
ENVOY_ADMIN_PORT = 19000
CONFIG_DIR = "/etc/wideep/router"


def epp_name(spec: DeploySpec) -> str:
    return f"{spec.name}-epp"


def _meta(spec: DeploySpec, name: str, **labels: str) -> dict[str, Any]:
    m: dict[str, Any] = {"name": name, "namespace": spec.namespace}
    if labels:
        m["labels"] = dict(labels)
    return m


def inference_pool(spec: DeploySpec) -> dict[str, Any]:
    ranks = spec.prefill.dp_per_node  # validated equal to decode's; one targetPort per DP rank on a node
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": _meta(spec, spec.name),
        "spec": {
            "targetPorts": [{"number": spec.prefill.port + i} for i in range(ranks)],
            "appProtocol": "http",
            "selector": {"matchLabels": {"llm-d.ai/guide": spec.guide}},
            "endpointPickerRef": {"name": epp_name(spec), "port": {"number": spec.router.grpc_port},
                                  "failureMode": spec.router.failure_mode},
        },
    }


def envoy_config(spec: DeploySpec) -> dict[str, Any]:
    """Standalone Envoy in the EPP pod: the router's own config (wideep.router.envoy), on the pod's ports."""
    return router_envoy_config("0.0.0.0", PROXY_PORT, spec.router.grpc_port, ENVOY_ADMIN_PORT,
                               failure_mode=spec.router.failure_mode)


def epp_objects(spec: DeploySpec, config_text: str) -> list[dict[str, Any]]:
    name = epp_name(spec)
    mode = spec.gateway.mode
    labels = {"app": name, "llm-d.ai/guide": spec.guide}
    data = {"config.yaml": config_text}
    if mode == "standalone":
        data["envoy.yaml"] = yaml.safe_dump(envoy_config(spec), sort_keys=False)
    argv = router_argv(spec, config_path=f"{CONFIG_DIR}/config.yaml",
                       port=PROXY_PORT if mode == "builtin" else None,
                       grpc_port=spec.router.grpc_port, health_port=spec.router.health_port,
                       metrics_port=spec.router.metrics_port, pool=(spec.name, spec.namespace),
                       mode="builtin" if mode == "builtin" else "ext-proc")
    ports = [{"name": "grpc-ext-proc", "containerPort": spec.router.grpc_port, "protocol": "TCP"},
             {"name": "grpc-health", "containerPort": spec.router.health_port, "protocol": "TCP"},
             {"name": "metrics", "containerPort": spec.router.metrics_port, "protocol": "TCP"}]
    if mode == "builtin":
        ports.append({"name": "http", "containerPort": PROXY_PORT, "protocol": "TCP"})
    epp = {
        "name": "epp",
        "image": spec.router.image or spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": argv[:1],
        "args": argv[1:],
        "ports": ports,
        "livenessProbe": {"grpc": {"port": spec.router.health_port, "service": "liveness"},
                          "initialDelaySeconds": 5, "periodSeconds": 10},
        "readinessProbe": {"grpc": {"port": spec.router.health_port, "service": "readiness"},
                           "periodSeconds": 2},
        "resources": {"requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR}],
    }
    containers = [epp]
    if mode == "standalone":
        containers.append({
            "name": "envoy",
            "image": spec.router.envoy_image,
            "imagePullPolicy": "IfNotPresent",
            "args": ["-c", f"{CONFIG_DIR}/envoy.yaml", "--log-level", "warn", "--concurrency", "8",
                     "--drain-strategy", "immediate"],
            "ports": [{"name": "http", "containerPort": PROXY_PORT, "protocol": "TCP"}],
            "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR}],
        })
    svc_ports = [{"name": "grpc-ext-proc", "port": spec.router.grpc_port, "targetPort": spec.router.grpc_port,
                  "protocol": "TCP", "appProtocol": "http2"},
                 {"name": "http-metrics", "port": spec.router.metrics_port, "targetPort": spec.router.metrics_port,
                  "protocol": "TCP"}]
    if mode in ("standalone", "builtin"):
        svc_ports.append({"name": "http", "port": 80, "targetPort": PROXY_PORT, "protocol": "TCP"})
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(spec, name)},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(spec, name),
         "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                   {"apiGroups": ["inference.networking.k8s.io"], "resources": ["inferencepools"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(spec, name),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": spec.namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(spec, f"{name}-config"), "data": data},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(spec, name, **labels),
         "spec": {"replicas": spec.router.replicas, "selector": {"matchLabels": {"app": name}},
                  "template": {"metadata": {"labels": labels},
                               "spec": {"serviceAccountName": name, "containers": containers,
                                        "volumes": [{"name": "config",
                                                     "configMap": {"name": f"{name}-config"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(spec, name, **labels),
         "spec": {"type": "ClusterIP", "selector": {"app": name}, "ports": svc_ports}},
    ]


def http_route(spec: DeploySpec) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": spec.name}],
        "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
    }
    if spec.gateway.provider != "gke":  # GKE's Gateway rejects timeouts.request
        rule["timeouts"] = {"request": spec.gateway.request_timeout}
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": _meta(spec, spec.name),
        "spec": {"parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                 "name": spec.gateway.gateway_name}],
                 "rules": [rule]},
    }
