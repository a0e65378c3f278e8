"""A LeaderWorkerSet per role (leaderworkerset.x-k8s.io/v1; docs/protocols.md, "Deployment shapes").

One LWS group = one DP group of `nodes` pods; the worker template serves the leader too. The
defaults llm-d's guides rely on are written out: RecreateGroupOnPodRestart and LeaderCreated.
"""
from __future__ import annotations

import copy
from typing import Any

from wideep.deploy.render.pods import gpus_per_pod, lws_launch, role_labels, role_pod_spec
from wideep.deploy.render.providers import apply_provider
from wideep.deploy.spec import DeploySpec


def lws_name(spec: DeploySpec, role_name: str) -> str:
    return f"{spec.name}-{role_name}"


def render_lws(spec: DeploySpec, role_name: str, *, provider: str, model_server: str) -> dict[str, Any]:
    role = getattr(spec, role_name)
    labels = role_labels(spec, role_name)
    template: dict[str, Any] = {
        "metadata": {"labels": dict(labels)},
        "spec": role_pod_spec(spec, role_name, role, lws_launch(), model_server),
    }
    nics = spec.cluster.rdma_nics or gpus_per_pod(spec, role)
    apply_provider(provider, template, role_name, nics, rdma_quantity="0")
    return {
        "apiVersion": "leaderworkerset.x-k8s.io/v1",
        "kind": "LeaderWorkerSet",
        "metadata": {"name": lws_name(spec, role_name), "namespace": spec.namespace, "labels": copy.deepcopy(labels)},
        "spec": {
            "replicas": role.replicas,
            "startupPolicy": "LeaderCreated",
            "leaderWorkerTemplate": {
                "size": role.nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "workerTemplate": template,
            },
        },
    }
