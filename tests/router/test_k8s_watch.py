"""Kubernetes source in watch mode against a loopback fake API server: LIST + resourceVersion,
streamed ADDED/MODIFIED/DELETED/BOOKMARK events, resume after the server ends a watch, relist on 410,
restart on an InferencePool change."""
from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path

from aiohttp import web

from wideep.router.datastore import Datastore
from wideep.router.k8s import KubernetesSource

from router_helpers import serve_app, until

DATA = Path(__file__).with_name("data")
POOL_PATH = "/apis/inference.networking.k8s.io/v1/namespaces/llm-d/inferencepools/wide-ep-lws"
PODS_PATH = "/api/v1/namespaces/llm-d/pods"


def pod(name, ip, role="decode", ready=True, rv="1"):
    return {"metadata": {"name": name, "namespace": "llm-d", "resourceVersion": rv,
                         "labels": {"llm-d.ai/guide": "wide-ep-lws", "llm-d.ai/role": role}},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


class FakeAPIServer:
    """LIST answers with the pod list at resourceVersion `list_rv`; each watch request gets its own
    queue of events the test pushes (None ends that watch response)."""

    def __init__(self):
        self.pool = json.loads((DATA / "inferencepool.json").read_text())
        self.list_doc = json.loads((DATA / "pods.json").read_text())
        self.lists, self.watches = [], []
        self.watch_queues: list[asyncio.Queue] = []
        self.new_watch = asyncio.Event()

    async def get_pool(self, request):
        return web.json_response(self.pool)

    async def pods(self, request):
        q = request.query
        if q.get("watch") != "1":
            self.lists.append(dict(q))
            return web.json_response(self.list_doc)
        self.watches.append(dict(q))
        queue: asyncio.Queue = asyncio.Queue()
        self.watch_queues.append(queue)
        self.new_watch.set()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        while True:
            ev = await queue.get()
            if ev is None:
                break
            await resp.write(json.dumps(ev).encode() + b"\n")
        await resp.write_eof()
        return resp

    async def serve(self):
        app = web.Application()
        app.router.add_get(POOL_PATH, self.get_pool)
        app.router.add_get(PODS_PATH, self.pods)
        return await serve_app(app)

    async def push(self, ev):
        await self.watch_queues[-1].put(ev)

    async def next_watch(self, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while len(self.watches) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"watch #{n} never came ({len(self.watches)} so far)")
            await asyncio.sleep(0.01)


def test_watch_follows_pods_and_handles_resource_versions():
    async def main():
        api = FakeAPIServer()
        runner, port = await api.serve()
        ds = Datastore()
        src = KubernetesSource(ds, "llm-d", pool_name="wide-ep-lws", api_server=f"http://127.0.0.1:{port}",
                               token="t", poll_s=0.1, watch_timeout_s=60)
        names = lambda: sorted(e.name for e in ds.all())
        try:
            await src.start()
            # LIST then watch from the list's resourceVersion
            assert len(api.lists) == 1 and len(names()) == 4
            await api.next_watch(1)
            w = api.watches[0]
            assert (w["watch"], w["resourceVersion"], w["allowWatchBookmarks"], w["labelSelector"]) == (
                "1", "812400", "true", "llm-d.ai/guide=wide-ep-lws")
            # ADDED: a new ready pod gives one endpoint per targetPort
            await api.push({"type": "ADDED", "object": pod("wide-ep-decode-9", "10.4.9.9", rv="812401")})
            await until(lambda: "wide-ep-decode-9-rank-1" in names())
            assert ds.get("wide-ep-decode-9-rank-1").address == "10.4.9.9:8001"
            # MODIFIED: not ready any more -> its endpoints leave
            await api.push({"type": "MODIFIED", "object": pod("wide-ep-decode-9", "10.4.9.9", ready=False, rv="812402")})
            await until(lambda: "wide-ep-decode-9-rank-0" not in names())
            # MODIFIED: the not-ready prefill-1 of the list becomes ready
            await api.push({"type": "MODIFIED", "object": pod("wide-ep-prefill-1", "10.4.2.10", "prefill", rv="812403")})
            await until(lambda: "wide-ep-prefill-1-rank-0" in names())
            # DELETED
            await api.push({"type": "DELETED", "object": pod("wide-ep-decode-0", "10.4.1.17", rv="812404")})
            await until(lambda: not any(n.startswith("wide-ep-decode-0-") for n in names()))
            # BOOKMARK moves the resourceVersion only; the server ends the watch -> resume from it
            await api.push({"type": "BOOKMARK", "object": {"kind": "Pod", "metadata": {"resourceVersion": "812450"}}})
            await api.push(None)
            await api.next_watch(2)
            assert api.watches[1]["resourceVersion"] == "812450" and len(api.lists) == 1   # no relist needed
            # 410 Gone: the RV was compacted away -> LIST again, then watch from the new list RV
            api.list_doc = copy.deepcopy(api.list_doc)
            api.list_doc["metadata"]["resourceVersion"] = "900000"
            await api.push({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                        "message": "too old resource version"}})
            await api.next_watch(3)
            assert len(api.lists) == 2 and api.watches[2]["resourceVersion"] == "900000"
            assert "wide-ep-decode-0-rank-0" in names()          # the relist is the truth again
            # the InferencePool's ports change -> relist + new watch, two endpoints per pod -> one
            api.pool = copy.deepcopy(api.pool)
            api.pool["spec"]["targetPorts"] = [{"number": 9000}]
            await api.next_watch(4)
            await until(lambda: ds.get("wide-ep-decode-0-rank-0") is not None
                        and ds.get("wide-ep-decode-0-rank-0").address == "10.4.1.17:9000")
            assert "wide-ep-decode-0-rank-1" not in names() and len(api.lists) == 3
            assert src.events == 4
        finally:
            for q in api.watch_queues:
                q.put_nowait(None)
            await src.stop()
            await runner.cleanup()

    asyncio.run(main())


def test_poll_mode_still_lists():
    async def main():
        api = FakeAPIServer()
        runner, port = await api.serve()
        src = KubernetesSource(Datastore(), "llm-d", pool_name="wide-ep-lws", api_server=f"http://127.0.0.1:{port}",
                               poll_s=0.05, watch=False)
        try:
            await src.start()
            await until(lambda: len(api.lists) >= 3)
            assert api.watches == []
        finally:
            await src.stop()
            await runner.cleanup()

    asyncio.run(main())
