"""The routing layer on a cluster: InferencePool v1, the Endpoint Picker (`wideep router`) with its
RBAC, ConfigMap, Deployment and Service, and the front door (standalone Envoy, a Gateway's
HTTPRoute, or the router's built-in proxy). deploy.md §2, router.md §4."""
from __future__ import annotations

from typing import Any

import yaml

from wideep.deploy.commands import router_argv
from wideep.deploy.spec import DeploySpec

PROXY_PORT = 8081          # the in-pod HTTP listener (Envoy or built-in), Service port 80
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
    """Standalone Envoy: ext_proc to the EPP on localhost, ORIGINAL_DST on x-gateway-destination-endpoint."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 19000}}},
        "static_resources": {
            "listeners": [{
                "name": "http",
                "address": {"socket_address": {"address": "0.0.0.0", "port_value": PROXY_PORT}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "http",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
                            "match": {"prefix": "/"},
                            "route": {"cluster": "model-servers", "timeout": "0s", "idle_timeout": "0s"}}]}]},
                        "http_filters": [
                            {"name": "envoy.filters.http.ext_proc", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                                "failure_mode_allow": spec.router.failure_mode == "FailOpen",
                                "message_timeout": "1000s",
                                "grpc_service": {"envoy_grpc": {"cluster_name": "epp"}},
                                "processing_mode": {"request_header_mode": "SEND", "response_header_mode": "SEND",
                                                    "request_body_mode": "FULL_DUPLEX_STREAMED",
                                                    "response_body_mode": "FULL_DUPLEX_STREAMED",
                                                    "request_trailer_mode": "SEND", "response_trailer_mode": "SEND"}}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    }}]}],
            }],
            "clusters": [
                {"name": "epp", "type": "STATIC", "connect_timeout": "5s",
                 "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                     "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                     "explicit_http_config": {"http2_protocol_options": {}}}},
                 "load_assignment": {"cluster_name": "epp", "endpoints": [{"lb_endpoints": [{"endpoint": {
                     "address": {"socket_address": {"address": "127.0.0.1",
                                                    "port_value": spec.router.grpc_port}}}}]}]}},
                {"name": "model-servers", "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                 "connect_timeout": "10s",
                 "original_dst_lb_config": {"use_http_header": True,
                                            "http_header_name": "x-gateway-destination-endpoint"}},
            ],
        },
    }


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
