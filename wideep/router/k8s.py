"""Endpoints from Kubernetes: the pods an InferencePool selects, one endpoint per targetPort.

Talks to the API server over REST with the pod's service-account token (in-cluster), polling:
GET the InferencePool (inference.networking.k8s.io/v1; spec.selector.matchLabels, spec.targetPorts)
then the Running+Ready pods matching it. Pod `p` with targetPorts [8000..8007] gives endpoints
`p-rank-0`..`p-rank-7` at podIP:8000.. with the pod's labels (llm-d.ai/role among them).
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from wideep.router.datastore import Datastore
from wideep.router.plugins.filters import selector_matches
from wideep.router.types import Endpoint

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
POOL_GROUPS = ("inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2")


@dataclass
class PoolSpec:
    match_labels: dict[str, str]
    target_ports: list[int]
    match_expressions: list = field(default_factory=list)


def parse_pool(doc: dict[str, Any]) -> PoolSpec:
    spec = doc.get("spec") or {}
    sel = spec.get("selector") or {}
    # v1: selector {matchLabels: {...}}; v1alpha2: selector is the label map itself
    if "matchLabels" in sel or "matchExpressions" in sel:
        labels, exprs = sel.get("matchLabels") or {}, sel.get("matchExpressions") or []
    else:
        labels, exprs = sel, []
    if "targetPorts" in spec:
        ports = [int(p["number"]) for p in spec["targetPorts"]]
    elif "targetPortNumber" in spec:
        ports = [int(spec["targetPortNumber"])]
    else:
        raise ValueError("InferencePool has neither spec.targetPorts nor spec.targetPortNumber")
    if not labels and not exprs:
        raise ValueError("InferencePool spec.selector is empty")
    return PoolSpec({str(k): str(v) for k, v in labels.items()}, ports, exprs)


def _pod_ready(pod: dict) -> bool:
    st = pod.get("status") or {}
    if st.get("phase") != "Running" or not st.get("podIP") or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or [])


def endpoints_from_pods(pod_list: dict[str, Any], pool: PoolSpec) -> list[Endpoint]:
    out = []
    for pod in pod_list.get("items") or []:
        meta = pod.get("metadata") or {}
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        if not _pod_ready(pod) or not selector_matches(labels, pool.match_labels, pool.match_expressions):
            continue
        ip = pod["status"]["podIP"]
        host = f"[{ip}]" if ":" in ip else ip
        for i, port in enumerate(pool.target_ports):
            out.append(Endpoint(name=f"{meta['name']}-rank-{i}", address=f"{host}:{port}", labels=dict(labels), rank=i))
    return out


def label_selector_query(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


class KubernetesSource:
    def __init__(self, datastore: Datastore, namespace: str, pool_name: str | None = None,
                 selector: dict[str, str] | None = None, target_ports: list[int] | None = None,
                 api_server: str | None = None, token: str | None = None, ca_file: str | None = None,
                 poll_s: float = 2.0):
        self.datastore = datastore
        self.namespace = namespace
        self.pool_name = pool_name
        self.static_pool = PoolSpec(selector or {}, target_ports or [8000]) if selector else None
        if not pool_name and not selector:
            raise ValueError("kubernetes source needs --pool-name or --pool-selector")
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.api_server = api_server or (f"https://{host}:{port}" if host else None)
        if not self.api_server:
            raise ValueError("kubernetes source: not in a cluster (no KUBERNETES_SERVICE_HOST) and no --k8s-api-server")
        tok_file = SA_DIR / "token"
        self.token = token if token is not None else (tok_file.read_text().strip() if tok_file.exists() else None)
        ca = ca_file or (str(SA_DIR / "ca.crt") if (SA_DIR / "ca.crt").exists() else None)
        self.ssl = ssl.create_default_context(cafile=ca) if self.api_server.startswith("https") else None
        self.poll_s = poll_s
        self._task: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None

    async def _get(self, path: str) -> dict:
        assert self.session is not None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.session.get(self.api_server + path, headers=headers, ssl=self.ssl) as r:
            if r.status != 200:
                raise RuntimeError(f"GET {path}: HTTP {r.status}: {(await r.text())[:200]}")
            return await r.json()

    async def pool(self) -> PoolSpec:
        if self.static_pool:
            return self.static_pool
        last = None
        for group in POOL_GROUPS:
            try:
                return parse_pool(await self._get(
                    f"/apis/{group}/namespaces/{self.namespace}/inferencepools/{self.pool_name}"))
            except RuntimeError as exc:
                last = exc
        raise RuntimeError(f"InferencePool {self.namespace}/{self.pool_name}: {last}")

    async def refresh(self) -> list[Endpoint]:
        pool = await self.pool()
        q = label_selector_query(pool.match_labels)
        pods = await self._get(f"/api/v1/namespaces/{self.namespace}/pods" + (f"?labelSelector={q}" if q else ""))
        eps = endpoints_from_pods(pods, pool)
        self.datastore.set_endpoints(eps)
        return eps

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("kubernetes source: first refresh failed: %s", exc)
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last known endpoints on API hiccups
                log.warning("kubernetes source: refresh failed: %s", exc)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self.session:
            await self.session.close()
