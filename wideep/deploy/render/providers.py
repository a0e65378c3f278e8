"""Provider RDMA/network patches applied to a model-server pod template (the providers' overlays of llm-d's guides)."""
from __future__ import annotations

import json
from typing import Any

PROVIDERS = ("none", "gke", "coreweave")


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = container.setdefault("env", [])
    for e in env:
        if e.get("name") == name:
            e.clear()
            e.update({"name": name, "value": value})
            return
    env.append({"name": name, "value": value})


def _add_resource(container: dict[str, Any], key: str, value: str) -> None:
    res = container.setdefault("resources", {})
    res.setdefault("limits", {})[key] = value
    res.setdefault("requests", {})[key] = value


def _host_path_caches(pod: dict[str, Any], root: str) -> None:
    for v in pod["volumes"]:
        if v["name"] in ("hf-cache", "jit-cache"):
            v.pop("emptyDir", None)
            v["hostPath"] = {"path": f"{root}/{v['name']}", "type": "DirectoryOrCreate"}


def apply_provider(provider: str, template: dict[str, Any], role_name: str, nics: int, *,
                   rdma_quantity: str = "0") -> None:
    """Patch a pod template ({metadata, spec}) in place for `provider`.

    gke: `rdma_quantity` "0" is the llm-d#1730 workaround under LWS (GKE Warden then injects only
    the `.IP` networks); the Grove GB200 manifest requests "1".
    """
    if provider == "none":
        return
    pod = template["spec"]
    main = pod["containers"][0]
    if provider == "gke":
        _set_env(main, "NCCL_TUNER_PLUGIN", "none")
        _set_env(main, "NCCL_NET_PLUGIN", "")
        _set_env(main, "DEEP_EP_DEVICE_TO_HCA_MAPPING", ",".join(f"{i}:mlx5_{i}:1" for i in range(nics)))
        _set_env(main, "NVSHMEM_DISABLED_GDRCOPY", "true")
        main.setdefault("securityContext", {})["privileged"] = True
        for i in range(nics):
            _add_resource(main, f"networking.gke.io.networks/rdma-{i}", rdma_quantity)
        interfaces = [{"interfaceName": "eth0", "network": "default"}] + [
            {"interfaceName": f"eth{i + 2}", "network": f"rdma-{i}"} for i in range(nics)]
        ann = template.setdefault("metadata", {}).setdefault("annotations", {})
        ann["networking.gke.io/default-interface"] = "eth0"
        ann["networking.gke.io/interfaces"] = json.dumps(interfaces)
        term = {"weight": 2, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"llm-d.ai/role": role_name}},
            "topologyKey": "cloud.google.com/gce-topology-block"}}
        sub = {"weight": 1, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"llm-d.ai/role": role_name}},
            "topologyKey": "cloud.google.com/gce-topology-subblock"}}
        pod.setdefault("affinity", {})["podAffinity"] = {
            "preferredDuringSchedulingIgnoredDuringExecution": [term, sub]}
        _host_path_caches(pod, "/mnt/stateful_partition/kube-ephemeral-ssd/shared_disk")
    elif provider == "coreweave":
        _set_env(main, "NCCL_IB_HCA", "ibp")
        _set_env(main, "NVSHMEM_HCA_PREFIX", "ibp")
        _add_resource(main, "rdma/ib", "1")
        _host_path_caches(pod, "/mnt/local")
    else:
        raise ValueError(f"--provider {provider!r} is not one of {', '.join(PROVIDERS)}")
