"""Review: a client that hangs up on a non-streaming request through the built-in proxy must make
the proxy hang up on the endpoint too, so the frontend (handler_cancellation) aborts the engine
request and frees its KV blocks, instead of generating every max_tokens for nobody."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

from aiohttp import web

from router_helpers import RouterThread, router_options
from wideep.utils.net import free_port


class SlowEndpoint:
    """A vLLM-looking endpoint whose completions take 30 s and that notices when its caller leaves
    (handler_cancellation=True, as wideep's frontend runs)."""

    def __init__(self):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = None

    async def _completions(self, request):
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return web.json_response({"choices": [{"text": "late"}]})

    async def _metrics(self, request):
        return web.Response(text='vllm:num_requests_running{model_name="m"} 0\n'
                                 'vllm:num_requests_waiting{model_name="m"} 0\n'
                                 'vllm:kv_cache_usage_perc{model_name="m"} 0.0\n', content_type="text/plain")

    async def _health(self, request):
        return web.Response(text="ok")

    async def _start(self):
        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __enter__(self):
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _wait_ready(rt, limit_s=15.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and not rt.router.datastore.ready():
        time.sleep(0.05)
    assert rt.router.datastore.ready(), "endpoint never became ready"


def test_client_hangup_on_non_streaming_request_reaches_the_endpoint():
    with SlowEndpoint() as up, RouterThread(router_options(endpoints=[up.address])) as rt:
        _wait_ready(rt)
        body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 400}).encode()
        s = socket.create_connection(("127.0.0.1", rt.router.opts.proxy_port), timeout=10)
        try:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            assert up.started.wait(10), "the request never reached the endpoint"
        finally:
            s.close()
        assert up.cancelled.wait(10), "the proxy kept the endpoint's request open after the client left"


def test_deeply_nested_body_is_routed_not_a_500():
    """The director routes a body it cannot parse at random (the endpoint answers 400); JSON nested
    past the recursion limit raised RecursionError (not a ValueError) out of parse_request."""
    from wideep.router.config import load_config_text
    from wideep.router.datastore import Datastore
    from wideep.router.director import Director

    from router_helpers import ep

    ds = Datastore()
    ds.set_endpoints([ep("e0")])
    director = Director(load_config_text("plugins: [{type: prefix-cache-scorer}]"), ds)
    req = director.parse_request(b"[" * 100_000, {}, "/v1/completions")
    assert not req.data.get("parsed") and req.body == {}
    assert director.schedule(req).target.name == "e0"
