"""Render a spec into files of Kubernetes objects plus a kustomization.yaml that lists them."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from wideep.deploy.render.grove import render_pcs
from wideep.deploy.render.lws import render_lws
from wideep.deploy.render.monitoring import pod_monitors
from wideep.deploy.render.providers import PROVIDERS
from wideep.deploy.render.routing import epp_objects, http_route, inference_pool
from wideep.deploy.router_config import router_config_text
from wideep.deploy.spec import DeploySpec

TARGETS = ("lws", "grove")
MODEL_SERVERS = ("wideep", "vllm")

Bundle = dict[str, list[dict[str, Any]]]   # file name -> objects, in write order


def render_bundle(spec: DeploySpec, *, target: str = "lws", provider: str = "none", model_server: str = "wideep",
                  base_dir: Path | None = None) -> Bundle:
    if target not in TARGETS:
        raise ValueError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if provider not in PROVIDERS:
        raise ValueError(f"--provider {provider!r} is not one of {', '.join(PROVIDERS)}")
    if model_server not in MODEL_SERVERS:
        raise ValueError(f"--model-server {model_server!r} is not one of {', '.join(MODEL_SERVERS)}")
    files: Bundle = {}
    if spec.cluster.service_account:
        files["serviceaccount.yaml"] = [{"apiVersion": "v1", "kind": "ServiceAccount",
                                         "metadata": {"name": spec.cluster.service_account,
                                                      "namespace": spec.namespace}}]
    if target == "lws":
        for role_name, _ in spec.roles():
            files[f"{role_name}.yaml"] = [render_lws(spec, role_name, provider=provider, model_server=model_server)]
    else:
        files["podcliqueset.yaml"] = [render_pcs(spec, provider=provider, model_server=model_server)]
    files["inferencepool.yaml"] = [inference_pool(spec)]
    files["epp.yaml"] = epp_objects(spec, router_config_text(spec, base_dir))
    if spec.gateway.mode == "gateway":
        files["httproute.yaml"] = [http_route(spec)]
    if spec.monitoring.enabled:
        files["monitoring.yaml"] = pod_monitors(spec)
    files["kustomization.yaml"] = [{
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": spec.namespace,
        "resources": [name for name in files],
    }]
    return files


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (launch scripts, embedded configs) as literal blocks, readable in review."""


def _str(dumper: yaml.SafeDumper, data: str):
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def dump_objects(objs: list[dict[str, Any]]) -> str:
    return "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=4096, allow_unicode=True) for o in objs)


def write_bundle(files: Bundle, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, objs in files.items():
        p = out / name
        p.write_text(dump_objects(objs), encoding="utf-8")
        written.append(p)
    return written
