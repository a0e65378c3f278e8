"""Shared helpers for router tests: endpoints that look scraped and ready."""
from __future__ import annotations

import time

from wideep.router.types import ROLE_LABEL, Endpoint, LLMRequest


def ep(name, role=None, waiting=0, running=0, kv=0.0, inflight=0, tokens=0, address=None):
    e = Endpoint(name=name, address=address or f"10.0.0.{abs(hash(name)) % 250}:8000",
                 labels={ROLE_LABEL: role} if role else {})
    e.metrics.waiting, e.metrics.running, e.metrics.kv_usage = waiting, running, kv
    e.metrics.updated_at = time.monotonic() + 3600
    e.healthy = True
    e.inflight_requests, e.inflight_tokens = inflight, tokens
    return e


def request(prompt="hello", model="m", headers=None, chat=False):
    from wideep.router.director import Director  # noqa: F401  (parsing lives there)
    import json

    body = {"model": model, "messages": [{"role": "user", "content": prompt}]} if chat else {"model": model, "prompt": prompt}
    req = LLMRequest(body=body, headers=headers or {}, path="/v1/chat/completions" if chat else "/v1/completions")
    req.model = model
    req.prompt_text = json.dumps(body["messages"]) if chat else prompt
    req.prompt_bytes = req.prompt_text.encode()
    req.data["parsed"] = True
    return req


# ---- processes and an in-process router ---------------------------------------------------------
import asyncio
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

FAKE = Path(__file__).parents[1] / "fake_openai_server.py"


class Backend:
    """A fake OpenAI server process that names itself in `x-backend-name`."""

    def __init__(self, name: str, ttft: float = 0.005, itl: float = 0.002):
        from wideep.utils.net import free_port

        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, str(FAKE), "--port", str(self.port), "--name", name,
                                      "--ttft", str(ttft), "--itl", str(itl), "--max-seconds", "300"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait(self, timeout=20.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend {self.name} exited")
            try:
                urllib.request.urlopen(f"http://{self.address}/health", timeout=0.5).read()
                return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"backend {self.name} not up")

    def stats(self):
        import json
        return json.loads(urllib.request.urlopen(f"http://{self.address}/stats", timeout=5).read())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def start_backends(names, **kw):
    bs = [Backend(n, **kw) for n in names]
    try:
        for b in bs:
            b.wait()
    except BaseException:
        for b in bs:
            b.kill()
        raise
    return bs


class RouterThread:
    """wideep.router.Router on its own event loop in a thread (tests talk to it over loopback)."""

    def __init__(self, opts):
        from wideep.router.app import Router

        self.loop = asyncio.new_event_loop()
        self.router = None
        self._opts = opts
        self._Router = Router
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        self.router = self.call(self._make())
        try:
            self.call(self.router.start(), timeout=60)
        except BaseException:
            self.call(self.router.stop())
            self._shutdown()
            raise
        return self

    async def _make(self):
        return self._Router(self._opts)

    def call(self, coro, timeout=30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc):
        try:
            self.call(self.router.stop())
        finally:
            self._shutdown()

    def _shutdown(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def router_options(**kw):
    from wideep.router.app import RouterOptions
    from wideep.utils.net import free_port

    base = dict(host="127.0.0.1", port=free_port(), grpc_port=free_port(), grpc_health_port=free_port(),
                metrics_port=free_port(), envoy_admin_port=free_port(), staleness_s=1.0)
    base.update(kw)
    return RouterOptions(**base)


def post(port, body, path="/v1/completions", headers=None, timeout=30):
    """POST JSON; returns (status, headers, body bytes) without raising on HTTP errors."""
    import json
    import urllib.error

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


async def serve_app(app):
    """Start an aiohttp app on loopback port 0 (the OS picks a free one, no race); returns (runner, port)."""
    from aiohttp import web

    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


async def until(cond, timeout=10.0):
    """Poll cond() on the event loop until it holds; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.01)
