"""Endpoints from Kubernetes: the pods an InferencePool selects, one endpoint per targetPort.

Talks to the API server over REST with the pod's service-account token (in-cluster):
GET the InferencePool (inference.networking.k8s.io/v1; spec.selector.matchLabels, spec.targetPorts)
then the Running+Ready pods matching it. Pod `p` with targetPorts [8000..8007] gives endpoints
`p-rank-0`..`p-rank-7` at podIP:8000.. with the pod's labels (llm-d.ai/role among them).

Pods are followed with a watch (the informer pattern): LIST gives the pods and the list's
resourceVersion, then `?watch=1&resourceVersion=RV&allowWatchBookmarks=true` streams one JSON event
per line (ADDED/MODIFIED/DELETED/BOOKMARK/ERROR); every event moves RV on, so a watch that ends
(server timeout) resumes where it stopped. ERROR 410 Gone (RV compacted away) forces a fresh LIST.
The InferencePool is re-read every `poll_s`; a changed selector or ports restarts LIST+watch.
`watch=False` keeps the plain LIST-every-poll_s mode.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from wideep import envs
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


class WatchExpired(Exception):
    """The API server no longer has our resourceVersion (HTTP/ERROR 410): LIST again."""


class KubernetesSource:
    def __init__(self, datastore: Datastore, namespace: str, pool_name: str | None = None,
                 selector: dict[str, str] | None = None, target_ports: list[int] | None = None,
                 api_server: str | None = None, token: str | None = None, ca_file: str | None = None,
                 poll_s: float = 2.0, watch: bool = True, watch_timeout_s: int = 300):
        self.datastore = datastore
        self.namespace = namespace
        self.pool_name = pool_name
        self.static_pool = PoolSpec(selector or {}, target_ports or [8000]) if selector else None
        if not pool_name and not selector:
            raise ValueError("kubernetes source needs --pool-name or --pool-selector")
        host, port = envs.KUBERNETES_SERVICE_HOST, envs.KUBERNETES_SERVICE_PORT
        self.api_server = api_server or (f"https://{host}:{port}" if host else None)
        if not self.api_server:
            raise ValueError("kubernetes source: not in a cluster (no KUBERNETES_SERVICE_HOST) and no --k8s-api-server")
        tok_file = SA_DIR / "token"
        self.token = token if token is not None else (tok_file.read_text().strip() if tok_file.exists() else None)
        ca = ca_file or (str(SA_DIR / "ca.crt") if (SA_DIR / "ca.crt").exists() else None)
        self.ssl = ssl.create_default_context(cafile=ca) if self.api_server.startswith("https") else None
        self.poll_s = poll_s
        self.watch = watch
        self.watch_timeout_s = watch_timeout_s
        self._tasks: list[asyncio.Task] = []
        self._watch_task: asyncio.Task | None = None
        self.session: aiohttp.ClientSession | None = None
        # informer state
        self.current_pool: PoolSpec | None = None
        self.pods: dict[str, dict] = {}
        self.resource_version: str | None = None
        self.lists = 0            # LIST calls (relists after 410 or pool changes show up here)
        self.events = 0           # watch events applied

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _get(self, path: str) -> dict:
        assert self.session is not None
        async with self.session.get(self.api_server + path, headers=self._headers(), ssl=self.ssl) as r:
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

    def _pods_path(self, pool: PoolSpec) -> str:
        q = label_selector_query(pool.match_labels)
        return f"/api/v1/namespaces/{self.namespace}/pods" + (f"?labelSelector={q}" if q else "")

    def _publish(self) -> list[Endpoint]:
        assert self.current_pool is not None
        pods = [self.pods[k] for k in sorted(self.pods)]
        eps = endpoints_from_pods({"items": pods}, self.current_pool)
        self.datastore.set_endpoints(eps)
        return eps

    async def refresh(self) -> list[Endpoint]:
        """LIST: the pool, then its pods; remembers the list's resourceVersion for the watch."""
        pool = await self.pool()
        doc = await self._get(self._pods_path(pool))
        self.lists += 1
        self.current_pool = pool
        self.pods = {(p.get("metadata") or {}).get("name", f"#{i}"): p for i, p in enumerate(doc.get("items") or [])}
        self.resource_version = (doc.get("metadata") or {}).get("resourceVersion") or None
        return self._publish()

    def apply_event(self, ev: dict) -> None:
        """One watch event; raises WatchExpired on ERROR 410."""
        kind, obj = ev.get("type"), ev.get("object") or {}
        meta = obj.get("metadata") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise WatchExpired(obj.get("message", "resourceVersion too old"))
            raise RuntimeError(f"watch error: {obj.get('code')} {obj.get('message')}")
        if meta.get("resourceVersion"):
            self.resource_version = meta["resourceVersion"]
        if kind == "BOOKMARK":
            return
        name = meta.get("name")
        if not name:
            return
        self.events += 1
        if kind in ("ADDED", "MODIFIED"):
            self.pods[name] = obj
        elif kind == "DELETED":
            self.pods.pop(name, None)
        self._publish()

    async def watch_once(self) -> None:
        """One watch request from resource_version until the server ends it."""
        assert self.session is not None and self.current_pool is not None
        path = self._pods_path(self.current_pool)
        sep = "&" if "?" in path else "?"
        path += (f"{sep}watch=1&resourceVersion={self.resource_version or ''}&allowWatchBookmarks=true"
                 f"&timeoutSeconds={self.watch_timeout_s}")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.watch_timeout_s + 30)
        async with self.session.get(self.api_server + path, headers=self._headers(), ssl=self.ssl,
                                    timeout=timeout) as r:
            if r.status == 410:
                raise WatchExpired("HTTP 410")
            if r.status != 200:
                raise RuntimeError(f"watch pods: HTTP {r.status}: {(await r.text())[:200]}")
            buf = b""
            async for chunk in r.content.iter_any():
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self.apply_event(json.loads(line))

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            await self.refresh()
        except Exception as exc:
            log.warning("kubernetes source: first refresh failed: %s", exc)
        if self.watch:
            self._tasks = [asyncio.create_task(self._watch_loop()), asyncio.create_task(self._pool_loop())]
        else:
            self._tasks = [asyncio.create_task(self._poll_loop())]

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep the last known endpoints on API hiccups
                log.warning("kubernetes source: refresh failed: %s", exc)

    async def _watch_loop(self) -> None:
        backoff = 0.2
        while True:
            try:
                if self.resource_version is None or self.current_pool is None:
                    await self.refresh()
                self._watch_task = asyncio.create_task(self.watch_once())
                try:
                    await self._watch_task
                except asyncio.CancelledError:
                    if self._watch_task.cancelled() and not asyncio.current_task().cancelling():
                        continue      # the pool changed: _pool_loop cancelled the watch and reset RV
                    raise
                backoff = 0.2
            except WatchExpired as exc:
                log.info("kubernetes source: watch expired (%s); listing again", exc)
                self.resource_version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep the last known endpoints; retry with backoff
                log.warning("kubernetes source: watch failed: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _pool_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.static_pool:
                continue
            try:
                pool = await self.pool()
            except Exception as exc:
                log.warning("kubernetes source: reading the InferencePool failed: %s", exc)
                continue
            if pool != self.current_pool:
                log.info("kubernetes source: InferencePool changed; listing pods again")
                self.current_pool = pool
                self.resource_version = None
                if self._watch_task is not None and not self._watch_task.done():
                    self._watch_task.cancel()

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.session:
            await self.session.close()
