"""Built-in mode: an asyncio HTTP reverse proxy (no Envoy) around the Director.

The request body is read whole (the scheduler needs the prompt), the response is streamed back
chunk by chunk as it arrives, unbuffered. A connection refused by the chosen endpoint (it died
since the last scrape) takes it out of the pool and the request is scheduled once more.
"""
from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from wideep.router.headers import forwardable
from wideep.router.director import Decision, Director
from wideep.router.errors import error_body, error_headers
from wideep.router.types import PARSED, PluginState, SchedulingError

log = logging.getLogger(__name__)



class BuiltinProxy:
    def __init__(self, director: Director, connect_timeout_s: float = 5.0):
        self.director = director
        self.connect_timeout_s = connect_timeout_s
        self.session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app):
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
            auto_decompress=False)

    async def _close(self, app):
        if self.session:
            await self.session.close()

    async def health(self, request: web.Request) -> web.Response:
        ok = bool(self.director.datastore.ready())
        return web.Response(status=200 if ok else 503, text="ok" if ok else "no ready endpoint")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        req = self.director.parse_request(body, headers, request.path)
        for attempt in range(2):
            try:
                decision = await self.director.route(req)
            except SchedulingError as exc:
                return web.Response(status=exc.status, body=error_body(exc), headers=error_headers(exc))
            try:
                return await self._forward(request, body, headers, decision)
            except aiohttp.ClientConnectorError as exc:
                # nothing reached the client yet: drop the dead endpoint and reschedule once
                self.director.finish(decision)
                decision.target.healthy = False
                log.warning("endpoint %s refused the connection (%s)%s", decision.target.name, exc,
                            "; rescheduling" if attempt == 0 else "")
                req.data = PluginState({PARSED: req.data.get(PARSED, False)})
        exc = SchedulingError(503, "upstream-unavailable", "the chosen endpoints refused the connection")
        return web.Response(status=503, body=error_body(exc), headers=error_headers(exc))

    async def _forward(self, request: web.Request, body: bytes, headers: dict[str, str],
                       d: Decision) -> web.StreamResponse:
        assert self.session is not None
        fwd = forwardable(request.headers.items())
        fwd.update(d.request_headers)
        url = f"http://{d.target_address}{request.path_qs}"
        resp: web.StreamResponse | None = None
        try:
            async with self.session.request(request.method, url, headers=fwd, data=body or None) as up:
                out_headers = forwardable(up.headers.items())
                hooks: dict[str, str] = {}
                self.director.response_headers(d, hooks)
                out_headers.update(hooks)
                resp = web.StreamResponse(status=up.status, reason=up.reason, headers=out_headers)
                if up.content_length is not None:
                    resp.content_length = up.content_length
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                    self.director.response_body(d, chunk, False)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionResetError) as exc:
            if resp is not None:
                raise  # mid-stream: the client sees the cut, as it would from the endpoint
            err = SchedulingError(502, "upstream-error", f"endpoint {d.target.name} failed: {exc}")
            return web.Response(status=502, body=error_body(err), headers=error_headers(err))
        finally:
            self.director.finish(d)
