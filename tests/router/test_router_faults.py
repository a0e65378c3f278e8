"""The built-in proxy when its endpoint dies: a stream cut mid-way ends with an OpenAI error event and
[DONE] (not a silent truncation), and what comes next is a JSON 502/503, never plain text."""
from __future__ import annotations

import json
import threading
import urllib.request

from router_helpers import RouterThread, post, router_options, start_backends


def test_endpoint_killed_mid_stream_ends_the_stream_with_an_error_event():
    (b,) = start_backends(["victim"], ttft=0.01, itl=0.05)
    try:
        with RouterThread(router_options(endpoints=[b.address])) as rt:
            port = rt.router.opts.proxy_port
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", method="POST",
                data=json.dumps({"model": "m", "prompt": "x", "max_tokens": 2000, "stream": True}).encode(),
                headers={"Content-Type": "application/json"})
            lines: list[str] = []
            first = threading.Event()
            with urllib.request.urlopen(req, timeout=60) as r:
                for raw in r:
                    line = raw.decode().strip()
                    if not line:
                        continue
                    lines.append(line)
                    if len(lines) == 3:
                        b.kill()          # the endpoint dies mid-stream (kill -9)
                        first.set()
            assert first.is_set()
            assert lines[-1] == "data: [DONE]", lines[-3:]
            err = json.loads(lines[-2][len("data: "):])["error"]
            assert err["code"] == 502 and err["type"] == "BadGatewayError" and b.address in err["message"]
            st, hdr, body = post(port, {"model": "m", "prompt": "again"})
            assert st in (502, 503) and json.loads(body)["error"]["code"] == st
            assert hdr.get("Content-Type", hdr.get("content-type", "")).startswith("application/json")
    finally:
        b.kill()
