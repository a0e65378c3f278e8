"""PodMonitors (monitoring.coreos.com/v1) scraping every rank's /metrics and the EPP's metrics port."""
from __future__ import annotations

from typing import Any

from wideep.deploy.render.routing import epp_name
from wideep.deploy.spec import DeploySpec


def pod_monitors(spec: DeploySpec) -> list[dict[str, Any]]:
    out = []
    for role_name, role in spec.roles():
        # Prefill ranks serve on rank<i>; decode ranks are reached through the sidecar's rank<i>
        # listeners, which forward /metrics to the local server.
        endpoints = [{"port": f"rank{i}", "path": "/metrics", "interval": spec.monitoring.interval}
                     for i in range(role.dp_per_node)]
        out.append({
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "PodMonitor",
            "metadata": {"name": f"{spec.name}-{role_name}", "namespace": spec.namespace,
                         "labels": {"llm-d.ai/guide": spec.guide}},
            "spec": {"selector": {"matchLabels": {"llm-d.ai/guide": spec.guide, "llm-d.ai/role": role_name}},
                     "podMetricsEndpoints": endpoints},
        })
    out.append({
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": epp_name(spec), "namespace": spec.namespace, "labels": {"llm-d.ai/guide": spec.guide}},
        "spec": {"selector": {"matchLabels": {"app": epp_name(spec)}},
                 "podMetricsEndpoints": [{"port": "metrics", "path": "/metrics",
                                          "interval": spec.monitoring.interval}]},
    })
    return out
