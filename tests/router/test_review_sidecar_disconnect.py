"""Review: a client that hangs up on a non-streaming request through the sidecar must make the
sidecar hang up on the decode server too (its frontend then aborts the engine request and frees
its KV blocks); before, the sidecar waited for the decode server's full answer for nobody."""
from __future__ import annotations

import asyncio
import json

from aiohttp import web

from wideep.router.sidecar import Sidecar, SidecarConfig
from wideep.utils.net import free_port


def test_client_hangup_on_non_streaming_request_reaches_the_decode_server():
    async def main():
        started, cancelled = asyncio.Event(), asyncio.Event()

        async def completions(request):
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return web.json_response({"choices": [{"text": "late"}]})

        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        decode = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)  # as wideep's frontend
        await decode.setup()
        dport = free_port()
        await web.TCPSite(decode, "127.0.0.1", dport).start()
        sc = Sidecar(SidecarConfig(port=free_port(), vllm_port=dport, host="127.0.0.1"))
        await sc.start()
        writer = None
        try:
            body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 400}).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", sc.ports[0])
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            await asyncio.wait_for(started.wait(), 10)
            writer.transport.abort()
            writer = None
            try:
                await asyncio.wait_for(cancelled.wait(), 10)
            except asyncio.TimeoutError:
                raise AssertionError("the sidecar kept the decode request open after the client left") from None
        finally:
            if writer is not None:
                writer.close()
            await sc.stop()
            await decode.cleanup()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_deeply_nested_pd_body_is_400():
    """json.loads raises RecursionError (not ValueError) for JSON nested past the recursion limit."""
    async def main():
        sc = Sidecar(SidecarConfig(port=free_port(), vllm_port=free_port(), host="127.0.0.1"))
        await sc.start()
        try:
            import aiohttp

            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", data=b"[" * 100_000,
                                  headers={"x-prefiller-host-port": "127.0.0.1:1",
                                           "content-type": "application/json"}) as r:
                    assert r.status == 400, await r.text()
                    err = (await r.json())["error"]
                    assert err["code"] == 400 and "JSON" in err["message"]
        finally:
            await sc.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_body_nested_below_the_json_limit_reaches_the_prefill_leg():
    """json.loads takes ~1000 levels, copy.deepcopy of the prefill leg gave up near 300 (500)."""
    async def main():
        sc = Sidecar(SidecarConfig(port=free_port(), vllm_port=free_port(), host="127.0.0.1"))
        await sc.start()
        try:
            import aiohttp

            body = b'{"prompt": "hi", "user": ' + b"[" * 600 + b"]" * 600 + b"}"
            async with aiohttp.ClientSession() as s:
                async with s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", data=body,
                                  headers={"x-prefiller-host-port": f"127.0.0.1:{free_port()}",
                                           "content-type": "application/json"}) as r:
                    # prefiller and decode server are both down: the sidecar's own 502, not a crash
                    assert r.status == 502, await r.text()
                    assert (await r.json())["error"]["code"] == "upstream_unreachable"
            assert sc.stats["prefill_failures"] == 1
        finally:
            await sc.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
