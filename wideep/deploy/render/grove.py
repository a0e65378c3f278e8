"""A Grove PodCliqueSet (grove.io/v1alpha1; docs/protocols.md, "Deployment shapes") holding both roles.

A role of one node per DP group is one clique whose pods are each a whole group; a multi-node
role is a PodCliqueScalingGroup of a leader clique (1 pod) and a worker clique (nodes-1 pods),
gang-scheduled together. Leader and workers start together: the DP rendezvous needs every rank
before any pod is Ready, so a worker `startsAfter` its leader would deadlock. With
`grove.prefill_first` the decode cliques start after prefill is Ready (their sidecars need it).
"""
from __future__ import annotations

from typing import Any

from wideep.deploy.render.pods import gpus_per_pod, grove_launch, role_labels, role_pod_spec
from wideep.deploy.render.providers import apply_provider
from wideep.deploy.spec import DeploySpec


def _clique(spec: DeploySpec, role_name: str, clique: str, kind: str, replicas: int, *, provider: str,
            model_server: str) -> dict[str, Any]:
    role = getattr(spec, role_name)
    labels = role_labels(spec, role_name)
    if spec.grove.queue:
        labels["kai.scheduler/queue"] = spec.grove.queue
    template: dict[str, Any] = {"metadata": {},
                                "spec": role_pod_spec(spec, role_name, role, grove_launch(kind), model_server)}
    if spec.grove.scheduler_name:
        template["spec"]["schedulerName"] = spec.grove.scheduler_name
    nics = spec.cluster.rdma_nics or gpus_per_pod(spec, role)
    apply_provider(provider, template, role_name, nics, rdma_quantity="1")
    out: dict[str, Any] = {"name": clique, "labels": labels}
    if template["metadata"].get("annotations"):
        out["annotations"] = template["metadata"]["annotations"]
    out["spec"] = {"roleName": clique, "replicas": replicas, "minAvailable": replicas, "podSpec": template["spec"]}
    return out


def role_cliques(spec: DeploySpec, role_name: str, *, provider: str, model_server: str
                 ) -> tuple[list[dict[str, Any]], dict[str, Any] | None, str]:
    """(cliques, scaling group or None, the clique whose readiness means "this role is up")."""
    role = getattr(spec, role_name)
    if role.nodes == 1:
        c = _clique(spec, role_name, role_name, "single", role.replicas, provider=provider, model_server=model_server)
        return [c], None, role_name
    leader, worker = f"{role_name}-leader", f"{role_name}-worker"
    cliques = [
        _clique(spec, role_name, leader, "leader", 1, provider=provider, model_server=model_server),
        _clique(spec, role_name, worker, "worker", role.nodes - 1, provider=provider, model_server=model_server),
    ]
    sg = {"name": f"{role_name}-sg", "cliqueNames": [leader, worker], "replicas": role.replicas, "minAvailable": 1}
    return cliques, sg, leader


def render_pcs(spec: DeploySpec, *, provider: str, model_server: str) -> dict[str, Any]:
    cliques: list[dict[str, Any]] = []
    groups: list[dict[str, Any]] = []
    prefill_cliques, sg, prefill_ready = role_cliques(spec, "prefill", provider=provider, model_server=model_server)
    cliques += prefill_cliques
    if sg:
        groups.append(sg)
    decode_cliques, sg, _ = role_cliques(spec, "decode", provider=provider, model_server=model_server)
    if spec.grove.prefill_first:
        for c in decode_cliques:
            c["spec"]["startsAfter"] = [prefill_ready]
    cliques += decode_cliques
    if sg:
        groups.append(sg)
    template: dict[str, Any] = {
        "cliqueStartupType": "CliqueStartupTypeExplicit" if spec.grove.prefill_first else "CliqueStartupTypeAnyOrder",
        "cliques": cliques,
    }
    if groups:
        template["podCliqueScalingGroups"] = groups
    if spec.grove.pack:
        template["topologyConstraint"] = {"topologyName": spec.grove.topology_name,
                                          "pack": {"required": spec.grove.pack}}
    meta: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace,
                            "labels": {"llm-d.ai/guide": spec.guide}}
    if spec.grove.mnnvl_group:
        meta["annotations"] = {"grove.io/mnnvl-group": spec.grove.mnnvl_group}
    return {"apiVersion": "grove.io/v1alpha1", "kind": "PodCliqueSet", "metadata": meta,
            "spec": {"replicas": 1, "template": template}}
