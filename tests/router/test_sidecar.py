"""The routing sidecar against small real aiohttp servers standing in for prefill and decode servers.

The fakes record what they receive so the tests check the exact prefill-leg / decode-leg bodies the
nixlv2 protocol prescribes (docs/protocols.md, "P/D disaggregation"). The end-to-end test with real `wideep serve` processes
lives in test_pd_e2e.py.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web

from wideep.router.sidecar import Sidecar, SidecarConfig
from wideep.utils.net import free_port, free_port_range

RETURNED = {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "p_dp0",
            "remote_block_ids": [3, 4], "remote_request_id": "r1", "remote_host": "127.0.0.1",
            "remote_port": 5600, "tp_size": 1}


class FakeServer:
    """An OpenAI-ish server: completions answer JSON or SSE; the mode makes it misbehave."""

    def __init__(self, name: str, mode: str = "ok"):
        self.name, self.mode = name, mode
        self.requests: list[tuple[str, dict, dict]] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0) -> "FakeServer":
        app = web.Application()
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        app.router.add_get("/v1/models", self.models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.name}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path, dict(request.headers), body))
        if self.mode == "500":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if self.mode == "400":
            return web.json_response({"error": {"message": "bad prompt", "type": "invalid_request_error",
                                                "param": "prompt", "code": 400}}, status=400)
        if self.mode == "no_params":
            return web.json_response({"choices": [{"text": "x"}]})
        out = {"id": "cmpl-1", "object": "text_completion", "model": self.name,
               "choices": [{"index": 0, "text": f"{self.name}-out", "finish_reason": "length"}]}
        if self.name == "prefill":
            out["kv_transfer_params"] = RETURNED
        if not body.get("stream"):
            return web.json_response(out)
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {json.dumps({'choices': [{'text': str(i)}]})}\n\n".encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


async def _setup(dp: int = 2, prefill_mode: str = "ok", **cfg_kwargs):
    base = free_port_range(dp)
    decodes = [await FakeServer("decode").start(base + i) for i in range(dp)]
    prefill = await FakeServer("prefill", prefill_mode).start()
    cfg = SidecarConfig(port=free_port_range(dp), vllm_port=base, data_parallel_size=dp, host="127.0.0.1", **cfg_kwargs)
    sc = Sidecar(cfg)
    await sc.start()
    return sc, prefill, decodes


async def _teardown(sc, prefill, decodes):
    await sc.stop()
    await prefill.stop()
    for d in decodes:
        await d.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_pd_flow_both_ranks_nonstreamed():
    async def go():
        sc, prefill, decodes = await _setup(prefiller_allowlist=None)
        try:
            async with aiohttp.ClientSession() as s:
                for rank in range(2):
                    body = {"model": "m", "prompt": "hello", "max_tokens": 7, "stream": False,
                            "stream_options": {"include_usage": True}, "temperature": 0}
                    r = await s.post(f"http://127.0.0.1:{sc.ports[rank]}/v1/completions", json=body,
                                     headers={"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"})
                    assert r.status == 200
                    assert (await r.json())["choices"][0]["text"] == "decode-out"
                    path, headers, leg = prefill.requests[-1]
                    assert path == "/v1/completions"
                    assert leg["stream"] is False and "stream_options" not in leg
                    assert leg["max_tokens"] == 1 and leg["max_completion_tokens"] == 1
                    assert leg["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False,
                                                         "remote_engine_id": None, "remote_block_ids": None,
                                                         "remote_host": None, "remote_port": None}
                    assert {k.lower(): v for k, v in headers.items()}.get("x-request-id")
                    assert leg["prompt"] == "hello" and leg["temperature"] == 0
                    # the decode leg: the original request, verbatim, plus the producer's params
                    assert len(decodes[rank].requests) == 1
                    _, dh, dec = decodes[rank].requests[-1]
                    assert dec["kv_transfer_params"] == RETURNED
                    assert dec["max_tokens"] == 7 and dec["stream"] is False
                    assert dec["stream_options"] == {"include_usage": True}
                    assert "x-prefiller-host-port" not in {k.lower() for k in dh}
        finally:
            await _teardown(sc, prefill, decodes)
    run(go())


def test_pd_flow_streams_through_and_chat_path():
    async def go():
        sc, prefill, decodes = await _setup()
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
                r = await s.post(f"http://127.0.0.1:{sc.ports[1]}/v1/chat/completions", json=body,
                                 headers={"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"})
                assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
                chunks = []
                async for chunk in r.content.iter_any():
                    chunks.append(chunk)
                text = b"".join(chunks).decode()
                assert text.count("data: ") == 4 and text.endswith("data: [DONE]\n\n")
                assert prefill.requests[-1][0] == "/v1/chat/completions"
                assert decodes[1].requests[-1][2]["stream"] is True
                assert decodes[0].requests == []
        finally:
            await _teardown(sc, prefill, decodes)
    run(go())


def test_no_header_proxies_as_is():
    async def go():
        sc, prefill, decodes = await _setup()
        try:
            async with aiohttp.ClientSession() as s:
                body = {"model": "m", "prompt": "x", "max_tokens": 3}
                r = await s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", json=body)
                assert r.status == 200
                assert decodes[0].requests[-1][2] == body
                assert prefill.requests == []
                r = await s.get(f"http://127.0.0.1:{sc.ports[1]}/v1/models")
                assert (await r.json())["data"][0]["id"] == "decode"
        finally:
            await _teardown(sc, prefill, decodes)
    run(go())


def test_allowlist_rejects_other_hosts_with_403():
    async def go():
        prefill = await FakeServer("prefill").start()
        dbase = free_port_range(1)
        decodes = [await FakeServer("decode").start(dbase)]
        sc = Sidecar(SidecarConfig(port=free_port(), vllm_port=dbase, host="127.0.0.1",
                                   prefiller_allowlist=[f"127.0.0.1:{prefill.port}", "10.1.2.3"]))
        await sc.start()
        try:
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{sc.ports[0]}/v1/completions"
                body = {"model": "m", "prompt": "x"}
                other = free_port()
                r = await s.post(url, json=body, headers={"x-prefiller-host-port": f"127.0.0.1:{other}"})
                assert r.status == 403
                err = (await r.json())["error"]
                assert err["type"] == "permission_denied" and err["param"] == "x-prefiller-host-port"
                assert "allowlist" in err["message"]
                r = await s.post(url, json=body, headers={"x-prefiller-host-port": "169.254.169.254:80"})
                assert r.status == 403
                # one bad entry among several poisons the header
                r = await s.post(url, json=body,
                                 headers={"x-prefiller-host-port": f"127.0.0.1:{prefill.port},evil.example:80"})
                assert r.status == 403
                assert prefill.requests == [] and decodes[0].requests == []
                r = await s.post(url, json=body, headers={"x-prefiller-host-port": "not-a-host-port"})
                assert r.status == 400
                r = await s.post(url, json=body, headers={"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"})
                assert r.status == 200 and len(prefill.requests) == 1
                assert sc.stats["rejected_prefillers"] == 3
        finally:
            await sc.stop()
            await prefill.stop()
            await decodes[0].stop()

    run(go())


def test_prefiller_sampling_spreads_over_listed_hosts():
    async def go():
        p1 = await FakeServer("prefill").start()
        p2 = await FakeServer("prefill").start()
        dbase = free_port_range(1)
        decodes = [await FakeServer("decode").start(dbase)]
        sc = Sidecar(SidecarConfig(port=free_port(), vllm_port=dbase, host="127.0.0.1",
                                   enable_prefiller_sampling=True, seed=1,
                                   prefiller_allowlist=["127.0.0.1"]))
        await sc.start()
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(20):
                    r = await s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", json={"prompt": "x"},
                                     headers={"x-prefiller-host-port": f"127.0.0.1:{p1.port}, 127.0.0.1:{p2.port}"})
                    assert r.status == 200
            assert len(p1.requests) + len(p2.requests) == 20
            assert p1.requests and p2.requests
        finally:
            await sc.stop()
            await p1.stop()
            await p2.stop()
            await decodes[0].stop()
    run(go())


@pytest.mark.parametrize("mode", ["500", "down", "no_params"])
def test_prefill_failure_falls_back_to_local_prefill(mode):
    async def go():
        sc, prefill, decodes = await _setup(prefill_mode=mode if mode != "down" else "ok")
        target = f"127.0.0.1:{free_port() if mode == 'down' else prefill.port}"
        try:
            async with aiohttp.ClientSession() as s:
                body = {"prompt": "x", "max_tokens": 5, "kv_transfer_params": {"junk": 1}}
                r = await s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", json=body,
                                 headers={"x-prefiller-host-port": target})
                assert r.status == 200
                dec = decodes[0].requests[-1][2]
                assert "kv_transfer_params" not in dec and dec["max_tokens"] == 5
                assert sc.stats["local_prefill_fallbacks"] == 1
        finally:
            await _teardown(sc, prefill, decodes)
    run(go())


@pytest.mark.parametrize("mode", ["500", "down"])
def test_prefill_failure_error_policy_gives_502(mode):
    async def go():
        sc, prefill, decodes = await _setup(prefill_mode=mode if mode != "down" else "ok", on_prefill_failure="error")
        target = f"127.0.0.1:{free_port() if mode == 'down' else prefill.port}"
        try:
            async with aiohttp.ClientSession() as s:
                r = await s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", json={"prompt": "x"},
                                 headers={"x-prefiller-host-port": target})
                assert r.status == 502
                err = (await r.json())["error"]
                assert err["code"] == "prefill_failed" and target in err["message"]
                assert decodes[0].requests == []
        finally:
            await _teardown(sc, prefill, decodes)
    run(go())


def test_prefill_4xx_is_passed_through():
    async def go():
        sc, prefill, decodes = await _setup(prefill_mode="400")
        try:
            async with aiohttp.ClientSession() as s:
                r = await s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", json={"prompt": "x"},
                                 headers={"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"})
                assert r.status == 400
                assert (await r.json())["error"]["param"] == "prompt"
                assert decodes[0].requests == []
        finally:
            await _teardown(sc, prefill, decodes)
    run(go())


def test_decode_server_down_gives_502():
    async def go():
        sc = Sidecar(SidecarConfig(port=free_port(), vllm_port=free_port(), host="127.0.0.1"))
        await sc.start()
        try:
            async with aiohttp.ClientSession() as s:
                r = await s.post(f"http://127.0.0.1:{sc.ports[0]}/v1/completions", json={"prompt": "x"})
                assert r.status == 502 and "unreachable" in (await r.json())["error"]["message"]
        finally:
            await sc.stop()
    run(go())


def test_sidecar_cli_process_end_to_end(tmp_path):
    """`wideep sidecar` as a real process, allowlist from a file, DP=2 listeners."""
    async def serve_and_query(port: int, dbase: int):
        decodes = [await FakeServer("decode").start(dbase + i) for i in range(2)]
        prefill = await FakeServer("prefill").start()
        allow = tmp_path / "allow.txt"
        allow.write_text(f"# pool\n127.0.0.1:{prefill.port}\n")
        proc = subprocess.Popen([sys.executable, "-m", "wideep", "sidecar", "--port", str(port), "--vllm-port", str(dbase),
                                 "--data-parallel-size", "2", "--host", "127.0.0.1", "--allowlist-file", str(allow)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            async with aiohttp.ClientSession() as s:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        r = await s.get(f"http://127.0.0.1:{port + 1}/sidecar/stats")
                        if r.status == 200:
                            break
                    except aiohttp.ClientError:
                        pass
                    assert proc.poll() is None, proc.stderr.read().decode()
                    assert time.monotonic() < deadline, "sidecar did not start"
                    await asyncio.sleep(0.1)
                r = await s.post(f"http://127.0.0.1:{port + 1}/v1/completions", json={"prompt": "x", "stream": True},
                                 headers={"x-prefiller-host-port": f"127.0.0.1:{prefill.port}"})
                assert r.status == 200 and (await r.text()).endswith("[DONE]\n\n")
                assert decodes[1].requests[-1][2]["kv_transfer_params"] == RETURNED
                r = await s.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "x"},
                                 headers={"x-prefiller-host-port": "127.0.0.2:9"})
                assert r.status == 403
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            await prefill.stop()
            for d in decodes:
                await d.stop()

    run(serve_and_query(free_port_range(2), free_port_range(2)))


def test_cli_flags_build_the_config(tmp_path):
    import argparse

    from wideep.router import sidecar_cli as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    allow = tmp_path / "allow"
    allow.write_text("10.0.0.1:8000\n# comment\n10.0.0.2\n")
    ns = parser.parse_args(["sidecar", "--port", "9000", "--model-server-port", "9200", "--data-parallel-size", "4",
                            "--prefiller-allowlist", "10.0.0.3:8000", "--allowlist-file", str(allow),
                            "--on-prefill-failure", "error", "--enable-prefiller-sampling", "--kv-connector", "nixlv2"])
    cfg = cli.build_config(ns)
    assert (cfg.port, cfg.vllm_port, cfg.data_parallel_size) == (9000, 9200, 4)
    assert cfg.prefiller_allowlist == ["10.0.0.3:8000", "10.0.0.1:8000", "10.0.0.2"]
    assert cfg.on_prefill_failure == "error" and cfg.enable_prefiller_sampling
    # SSRF protection without an allowlist refuses every prefiller
    cfg = cli.build_config(parser.parse_args(["sidecar", "--enable-ssrf-protection"]))
    assert cfg.prefiller_allowlist == []
    assert Sidecar(cfg)._allowed("127.0.0.1:8000") is False
    with pytest.raises(SystemExit, match="nixlv2"):
        cli.build_config(parser.parse_args(["sidecar", "--connector", "lmcache"]))


def test_sidecar_process_exits_cleanly_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wideep", "sidecar", "--port", str(port), "--vllm-port",
                             str(free_port()), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                import urllib.request
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/sidecar/stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "sidecar did not start"
            time.sleep(0.1)
        proc.terminate()
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_sidecar_never_imports_torch():
    code = ("import sys, wideep.router.sidecar_cli as c, wideep.router.sidecar, wideep.kv_transfer.transport, "
            "wideep.kv_transfer.protocol, wideep.kv_transfer.params; "
            "import argparse; p = argparse.ArgumentParser(); c.register(p.add_subparsers()); "
            "c.build_config(p.parse_args(['sidecar'])); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
